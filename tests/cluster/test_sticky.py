"""
Tests for L{balance.cluster.sticky}: cookie tokens that pin a client to a
backend.
"""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.sticky import StickyCookie, derive_secret
from tests.cluster.support import backends


class StickyCookieTests(SynchronousTestCase):
    """Opaque, stable tokens, and the cookie round trip."""

    def setUp(self):
        self.backends = backends(1, 1, 1)
        self.sticky = StickyCookie("srv", derive_secret("api"), self.backends)

    def test_token_opaque(self):
        """A token is 16 hex digits and does not contain the address."""
        for b in self.backends:
            token = self.sticky.token_for(b)
            self.assertTrue(re.fullmatch("[0-9a-f]{16}", token), token)
            self.assertNotIn(b.host, token)
        self.assertEqual(len({self.sticky.token_for(b) for b in self.backends}), 3)

    def test_token_stable(self):
        """
        Another process (or a reload) with the same cluster computes the
        same tokens, also for equal backend objects it built itself.
        """
        other = StickyCookie("srv", derive_secret("api"), backends(1, 1, 1))
        self.assertEqual(
            [self.sticky.token_for(b) for b in self.backends],
            [other.token_for(b) for b in other._tokens],
        )

    def test_token_keyed(self):
        """Another cluster name or secret gives other tokens."""
        b = self.backends[0]
        self.assertNotEqual(
            self.sticky.token_for(b),
            StickyCookie("srv", derive_secret("web"), self.backends).token_for(b),
        )
        self.assertNotEqual(
            self.sticky.token_for(b),
            StickyCookie("srv", derive_secret("api", b"s3cret"), self.backends).token_for(b),
        )

    def test_backend_for(self):
        """Tokens map back to their backend; unknown tokens to None."""
        for b in self.backends:
            self.assertIs(self.sticky.backend_for(self.sticky.token_for(b)), b)
            self.assertIs(self.sticky.backend_for(self.sticky.token_for(b).encode()), b)
        self.assertIsNone(self.sticky.backend_for("0123456789abcdef"))
        self.assertIsNone(self.sticky.backend_for("é"))

    def test_from_request(self):
        """
        The request's cookie names its backend while that backend is
        eligible and not excluded; otherwise pick as usual (None).
        """
        b = self.backends[1]
        headers = [(b"Cookie", b"a=1; srv=" + self.sticky.token_for(b).encode())]
        self.assertIs(self.sticky.from_request(headers), b)
        self.assertIsNone(self.sticky.from_request(headers, exclude=[b]))
        b.healthy = False
        self.assertIsNone(self.sticky.from_request(headers))
        self.assertIsNone(self.sticky.from_request([]))
        self.assertIsNone(self.sticky.from_request([(b"Cookie", b"srv=forged")]))

    def test_set_cookie(self):
        """The Set-Cookie value is NAME=TOKEN; Path=/; HttpOnly."""
        b = self.backends[2]
        token = self.sticky.token_for(b).encode()
        self.assertEqual(self.sticky.set_cookie(b), b"srv=" + token + b"; Path=/; HttpOnly")

    def test_set_cookie_for(self):
        """A response gets a cookie only when the request's does not already name its backend."""
        a, b, _ = self.backends
        headers = [(b"Cookie", b"srv=" + self.sticky.token_for(a).encode())]
        self.assertIsNone(self.sticky.set_cookie_for(headers, a))
        self.assertEqual(self.sticky.set_cookie_for(headers, b), self.sticky.set_cookie(b))
        self.assertEqual(self.sticky.set_cookie_for([], a), self.sticky.set_cookie(a))

    def test_update(self):
        """After an update, removed backends' tokens no longer resolve."""
        a, b, c = self.backends
        token = self.sticky.token_for(c)
        self.sticky.update([a, b])
        self.assertIsNone(self.sticky.backend_for(token))
        self.assertIs(self.sticky.backend_for(self.sticky.token_for(a)), a)
