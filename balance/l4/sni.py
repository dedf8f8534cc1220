# -*- test-case-name: tests.l4.test_sni -*-
"""
Peek at a TLS ClientHello without terminating TLS: the server name (SNI)
and ALPN protocols a client asks for, so that a tcp listener can choose a
cluster by name and pass the encrypted bytes through untouched.

L{ClientHelloParser} is sans-IO: bytes in through L{ClientHelloParser.feed},
a decision out once there are enough of them.  It buffers across TCP
segments and TLS records (a ClientHello may be split anywhere, and large
ones, with post-quantum key shares, span several records), decides "not
TLS" from the first byte when it can, and gives up beyond a size limit.

L{SNIRouter} maps a server name to a cluster name, from a tcp listener's
C{routes}.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from attrs import frozen

from balance.config import model

#: Bytes a parser buffers at most before giving up.
MAX_CLIENT_HELLO = 16 * 1024

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0x0000
_EXT_ALPN = 0x0010
_HOST_NAME = re.compile(rb"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")


@frozen
class ClientHello:
    """
    What a ClientHello asks for.

    :ivar server_name: the SNI host name, lower case without a trailing
        dot, or L{None} when the client sent none.
    :ivar alpn: the ALPN protocols offered, in the client's order.
    """

    server_name: str | None = None
    alpn: tuple[bytes, ...] = ()


@frozen
class NotTLS:
    """
    The bytes are not a TLS ClientHello this parser can read.

    :ivar reason: why, in a few words, for a log line.
    """

    reason: str


class _Malformed(Exception):
    pass


class _Reader:
    """Bounds-checked reads over one ClientHello body."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None):
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, n: int) -> bytes:
        start, stop = self.pos, self.pos + n
        if stop > self.end:
            raise _Malformed("truncated")
        self.pos = stop
        return self.data[start:stop]

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> _Reader:
        n = self.uint(length_bytes)
        sub = _Reader(self.data, self.pos, self.pos + n)
        if sub.end > self.end:
            raise _Malformed("truncated")
        self.pos = sub.end
        return sub

    @property
    def remaining(self) -> int:
        return self.end - self.pos


def _server_name(ext: _Reader) -> str | None:
    names = ext.vector(2)
    while names.remaining:
        kind = names.uint(1)
        name = names.vector(2)
        if kind == 0:
            raw = name.take(name.remaining).lower().rstrip(b".")
            # A host name (RFC 6066 3): nothing else may reach routing and
            # log lines (a "\n" in a name would forge one).
            if _HOST_NAME.fullmatch(raw) is None:
                raise _Malformed("bad server name")
            return raw.decode("ascii")
    return None


def _alpn(ext: _Reader) -> tuple[bytes, ...]:
    protocols = ext.vector(2)
    found = []
    while protocols.remaining:
        found.append(protocols.take(protocols.uint(1)))
    return tuple(found)


def parse_client_hello(body: bytes) -> ClientHello:
    """
    Read the server name and ALPN list out of a complete ClientHello
    message body (after the 4-byte handshake header).

    :raise ValueError: if the body is malformed.
    """
    r = _Reader(body)
    try:
        r.take(2 + 32)  # legacy_version, random
        r.vector(1)  # legacy_session_id
        r.vector(2)  # cipher_suites
        r.vector(1)  # legacy_compression_methods
        server_name, alpn = None, ()
        if r.remaining:
            extensions = r.vector(2)
            while extensions.remaining:
                kind = extensions.uint(2)
                ext = extensions.vector(2)
                if kind == _EXT_SERVER_NAME:
                    server_name = _server_name(ext)
                elif kind == _EXT_ALPN:
                    alpn = _alpn(ext)
    except _Malformed as e:
        raise ValueError(f"malformed ClientHello: {e}") from None
    return ClientHello(server_name, alpn)


class ClientHelloParser:
    """
    Incremental ClientHello reader.

    Feed it every byte the client sends until L{feed} returns a decision;
    L{buffered} holds everything fed so far (to be relayed unchanged).

    :ivar buffered: the bytes fed so far.
    """

    __slots__ = ("buffered", "_limit", "_record", "_handshake")

    def __init__(self, limit: int = MAX_CLIENT_HELLO):
        """
        :param limit: the most bytes to buffer; a ClientHello that does not
            fit is L{NotTLS}.
        """
        self.buffered = bytearray()
        self._limit = limit
        # Offset in `buffered` of the next TLS record header.
        self._record = 0
        self._handshake = bytearray()

    def feed(self, data: bytes) -> ClientHello | NotTLS | None:
        """
        Add C{data}, and decide if possible.

        :return: a L{ClientHello} once the whole message has arrived, a
            L{NotTLS} as soon as the bytes cannot be one (or exceed the
            limit), or L{None} while more bytes are needed.  Feeding more
            after a decision is not supported.
        """
        buf = self.buffered
        buf += data
        # Each record header is checked as soon as its first bytes arrive:
        # a TLS record starts with 0x16 (handshake) and major version 3,
        # which tells most other protocols apart on their first byte.
        while True:
            start = self._record
            available = len(buf) - start
            if available >= 1 and buf[start] != _HANDSHAKE:
                if start == 0:
                    return NotTLS("not a TLS handshake record")
                return NotTLS("a non-handshake record before the ClientHello ended")
            if available >= 2 and buf[start + 1] != 3:
                return NotTLS("not a TLS record version")
            if available < 5:
                break
            length = int.from_bytes(buf[start + 3 : start + 5], "big")
            if length == 0 or length > 16384:
                return NotTLS("bad TLS record length")
            end = start + 5 + length
            if end > len(buf):
                break
            self._handshake += buf[start + 5 : end]
            self._record = end
            decision = self._check_handshake()
            if decision is not None:
                return decision
        if len(buf) >= self._limit:
            return NotTLS(f"no complete ClientHello within {self._limit} bytes")
        return None

    def _check_handshake(self) -> ClientHello | NotTLS | None:
        hs = self._handshake
        if hs[0] != _CLIENT_HELLO:
            return NotTLS("the first handshake message is not a ClientHello")
        if len(hs) < 4:
            return None
        length = int.from_bytes(hs[1:4], "big")
        if length + 4 + 5 > self._limit:
            return NotTLS(f"a ClientHello of {length} bytes is larger than the limit")
        if len(hs) < 4 + length:
            return None
        try:
            return parse_client_hello(bytes(hs[4 : 4 + length]))
        except ValueError as e:
            return NotTLS(str(e))


class SNIRouter:
    """
    The cluster for a server name, from a tcp listener's routes: the first
    route (in configuration order) whose C{match.sni} is the name, or a
    C{*.domain} wildcard covering one more label, wins; else the listener's
    own cluster.
    """

    def __init__(self, routes: Sequence[model.Route], default: str | None):
        """
        :param routes: routes with C{match.sni} (validated).
        :param default: the listener's C{cluster}, or L{None}.
        """
        self.default = default
        self._exact: dict[str, tuple[int, str]] = {}
        self._wildcard: dict[str, tuple[int, str]] = {}
        for index, route in enumerate(routes):
            pattern = route.match.sni
            if pattern is None or route.cluster is None:
                continue
            if pattern.startswith("*."):
                self._wildcard.setdefault(pattern[2:], (index, route.cluster))
            else:
                self._exact.setdefault(pattern.rstrip("."), (index, route.cluster))

    def route(self, server_name: str | None) -> str | None:
        """
        :param server_name: a normalized name (see L{ClientHello}), or
            L{None} for a client that sent none or no TLS at all.
        :return: a cluster name, or L{None} when no route matches and the
            listener has no cluster.
        """
        if server_name:
            exact = self._exact.get(server_name)
            _, dot, domain = server_name.partition(".")
            wild = self._wildcard.get(domain) if dot else None
            if exact is not None or wild is not None:
                return min(m for m in (exact, wild) if m is not None)[1]
        return self.default
