"""
HTTP/1.1 message facts shared by the downstream and upstream sides: which
headers are hop-by-hop, how a head is written, what a valid target and Host
look like.  Everything here is pure and works on bytes.
"""

from __future__ import annotations

import re
from http import HTTPStatus

CRLF = b"\r\n"

# RFC 9110 7.6.1: connection-specific fields a proxy must not forward, plus
# the ones every proxy strips in practice.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Status codes whose responses never have a body (RFC 9110 6.4.1).
NO_BODY_STATUS = frozenset({204, 304}) | frozenset(range(100, 200))

_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}

# A Host header: reg-name or IPv4 or [IPv6], with an optional port.
_HOST = re.compile(rb"^(?:[A-Za-z0-9._~!$&'()*+,;=%-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?$")


def reason(status: int) -> bytes:
    """The standard reason phrase of C{status}, or C{b"Unknown"}."""
    return _REASONS.get(status, b"Unknown")


def status_line(status: int) -> bytes:
    """C{HTTP/1.1 404 Not Found\\r\\n}."""
    return b"HTTP/1.1 %d %s\r\n" % (status, reason(status))


def valid_host(value: bytes) -> bool:
    """Whether C{value} is a syntactically valid Host header value."""
    return _HOST.match(value) is not None


# Fields a peer may name in Connection that must still be forwarded: without
# them the next hop would lose the request's authority, or its body framing
# (the body of "Connection: content-length" would be read as a next request).
_END_TO_END = frozenset({b"host", b"content-length"})


def connection_tokens(values: list[bytes]) -> set[bytes]:
    """
    The lower-cased tokens of the C{Connection} header values: the fields to
    drop with it, except C{Host} and C{Content-Length}, never dropped.
    """
    tokens = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens - _END_TO_END


def split_absolute(target: bytes) -> tuple[bytes, bytes] | None:
    """
    Split an absolute-form target C{http://host[:port]/path?q} into its
    authority and origin-form path.

    :return: C{(authority, path)}, or L{None} if C{target} is not an
        absolute http(s) URI.
    """
    lower = target[:8].lower()
    if lower.startswith(b"http://"):
        rest = target[7:]
    elif lower.startswith(b"https://"):
        rest = target[8:]
    else:
        return None
    slash = rest.find(b"/")
    query = rest.find(b"?")
    end = min(i for i in (slash, query, len(rest)) if i >= 0)
    authority, path = rest[:end], rest[end:]
    if not authority or b"@" in authority:
        return None
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path


def trailer_block(fields) -> bytes:
    """The last chunk of a chunked body, carrying C{fields} as trailers."""
    return b"0\r\n" + b"".join([n + b": " + v + b"\r\n" for n, v in fields]) + b"\r\n"
