"""
Tests for L{balance.cluster.lb.keys}: extracting the hash key a cluster's
C{hash_on} names from a request.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.lb.keys import (
    connection_key,
    cookie_value,
    extract,
    header_value,
    key_function,
    parse,
)

HEADERS = [
    (b"Host", b"example.com"),
    (b"X-User", b"alice"),
    (b"x-user", b"bob"),
    (b"Cookie", b"theme=dark; session=abc123"),
    (b"cookie", b'cart="x y"; empty='),
]


class ExtractTests(SynchronousTestCase):
    """Each kind of C{hash_on} finds its key, or None."""

    def test_client_ip(self):
        """client_ip is the client's address."""
        self.assertEqual(extract("client_ip", b"203.0.113.7", HEADERS, b"/"), b"203.0.113.7")

    def test_header(self):
        """
        header:NAME is the first header of that name, whatever the case of
        either the config or the request.
        """
        self.assertEqual(extract("header:x-user", b"", HEADERS, b"/"), b"alice")
        self.assertEqual(extract("header:X-USER", b"", HEADERS, b"/"), b"alice")
        self.assertIsNone(extract("header:x-tenant", b"", HEADERS, b"/"))

    def test_cookie(self):
        """cookie:NAME finds the cookie in any Cookie header."""
        self.assertEqual(extract("cookie:session", b"", HEADERS, b"/"), b"abc123")
        self.assertEqual(extract("cookie:theme", b"", HEADERS, b"/"), b"dark")
        self.assertEqual(extract("cookie:cart", b"", HEADERS, b"/"), b"x y")
        self.assertEqual(extract("cookie:empty", b"", HEADERS, b"/"), b"")
        self.assertIsNone(extract("cookie:sess", b"", HEADERS, b"/"))
        self.assertIsNone(extract("cookie:Session", b"", HEADERS, b"/"))

    def test_path(self):
        """path is the request path without the query string."""
        self.assertEqual(extract("path", b"", [], b"/a/b?c=1"), b"/a/b")
        self.assertEqual(extract("path", b"", [], b"/a/b"), b"/a/b")

    def test_key_function(self):
        """C{key_function} parses once and extracts many times."""
        f = key_function("cookie:session")
        self.assertEqual(f(b"1.2.3.4", HEADERS, b"/"), b"abc123")
        self.assertIsNone(f(b"1.2.3.4", [], b"/"))

    def test_bad_spec(self):
        """Anything else is a ValueError naming the accepted forms."""
        for spec in ("ip", "header:", "cookie", "query:x"):
            e = self.assertRaises(ValueError, parse, spec)
            self.assertIn("client_ip | header:NAME | cookie:NAME | path", str(e))

    def test_connection_key(self):
        """Over TCP only client_ip gives a key; the rest fall back to round robin."""
        self.assertEqual(connection_key("client_ip", b"10.1.1.1"), b"10.1.1.1")
        self.assertIsNone(connection_key("header:x-user", b"10.1.1.1"))
        self.assertIsNone(connection_key("path", b"10.1.1.1"))


class HelperTests(SynchronousTestCase):
    """The header and cookie readers."""

    def test_header_value(self):
        self.assertEqual(header_value(HEADERS, b"host"), b"example.com")
        self.assertIsNone(header_value([], b"host"))

    def test_cookie_edge_cases(self):
        """Spaces around pairs are dropped; pairs without '=' are not cookies."""
        headers = [(b"Cookie", b"  a = 1 ;b;c=2=3")]
        self.assertEqual(cookie_value(headers, b"a"), b"1")
        self.assertIsNone(cookie_value(headers, b"b"))
        self.assertEqual(cookie_value(headers, b"c"), b"2=3")
