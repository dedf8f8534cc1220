# -*- test-case-name: tests.cluster.test_sticky -*-
"""
Sticky sessions by cookie: pin a client to the backend that served it.

The cookie holds an opaque token per backend, the first 16 hex digits of
a BLAKE2b MAC of the backend's name keyed with a per-cluster secret: stable
across restarts, reloads and worker processes (so that a client keeps its
backend), different from cluster to cluster, and not the backend's address
(which stays private).  Pure: headers in, bytes out.

The HTTP side, per request of a cluster whose ``cluster.sticky`` is not
``None``:

1. ``backend = cluster.sticky.from_request(headers, exclude=tried)``; when
   that is ``None``, pick as usual.
2. On the response: ``value = cluster.sticky.set_cookie_for(headers,
   backend)``; when not ``None``, add ``Set-Cookie: value``.
"""

from __future__ import annotations

import hashlib

from balance.cluster.lb.keys import Headers, cookie_value


def derive_secret(cluster: str, secret: bytes | None = None) -> bytes:
    """
    The key of a cluster's tokens: ``secret`` when given, else one derived
    from the cluster name, so that every process computes the same one.

    A derived key keeps addresses out of cookies but is not secret from
    someone who knows the cluster name and this code; pass a real
    ``secret`` (the same in every process) where that matters.
    """
    material = secret if secret is not None else b"balance sticky cookie:" + cluster.encode()
    return hashlib.blake2b(material, digest_size=32).digest()


class StickyCookie:
    """
    The sticky cookie of one cluster: tokens for its backends and back.

    :ivar name: The cookie's name (``sticky_cookie:``), as ``str``.
    """

    __slots__ = ("name", "_name", "_key", "_tokens", "_backends")

    def __init__(self, name: str, secret: bytes, backends=()):
        """
        :param name: The cookie name.
        :param secret: The per-cluster key (see :func:`derive_secret`);
            at most 64 bytes are used.
        :param backends: The cluster's backends.
        """
        self.name = name
        self._name = name.encode("latin-1")
        self._key = secret[:64]
        self._tokens: dict = {}
        self._backends: dict[bytes, object] = {}
        self.update(backends)

    def update(self, backends) -> None:
        """Replace the backends (a reload or a DNS change)."""
        self._tokens = {b: self._token(b) for b in backends}
        self._backends = {token.encode("ascii"): b for b, token in self._tokens.items()}

    def _token(self, backend) -> str:
        mac = hashlib.blake2b(backend.name.encode(), key=self._key, digest_size=8)
        return mac.hexdigest()

    def token_for(self, backend) -> str:
        """The token of ``backend``: 16 lowercase hex digits."""
        token = self._tokens.get(backend)
        return token if token is not None else self._token(backend)

    def backend_for(self, token: bytes | str):
        """
        The backend whose token is ``token``, eligible or not, or ``None``
        when none of the current backends has it (a forged cookie, or a
        backend since removed).
        """
        if isinstance(token, str):
            token = token.encode("ascii", "replace")
        return self._backends.get(token)

    def from_request(self, headers: Headers, exclude=()):
        """
        The backend a request's cookie pins it to, when that backend is
        eligible and not in ``exclude``; else ``None`` (pick as usual).

        :param headers: The request's ``(name, value)`` pairs.
        """
        token = cookie_value(headers, self._name)
        if token is None:
            return None
        backend = self._backends.get(token)
        if backend is None or not backend.eligible or backend in exclude:
            return None
        return backend

    def set_cookie(self, backend) -> bytes:
        """
        The ``Set-Cookie`` value that pins a client to ``backend``:
        ``NAME=TOKEN; Path=/; HttpOnly``.
        """
        return b"%s=%s; Path=/; HttpOnly" % (self._name, self.token_for(backend).encode("ascii"))

    def set_cookie_for(self, headers: Headers, backend) -> bytes | None:
        """
        The ``Set-Cookie`` value to add to the response of a request that
        ``backend`` served, or ``None`` when the request's cookie already
        names it.
        """
        token = self.token_for(backend).encode("ascii")
        if cookie_value(headers, self._name) == token:
            return None
        return b"%s=%s; Path=/; HttpOnly" % (self._name, token)
