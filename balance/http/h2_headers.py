# -*- test-case-name: tests.http.test_h2_headers -*-
"""
HTTP/2 header lists in and out of an L{balance.http.proxy.Exchange}: a
client's request fields checked and turned into what an HTTP/1.1 backend
gets, and a response (a backend's, or Balance's own) turned into the field
list of a HEADERS frame.

The frame layer (L{balance.http.h2_conn}) does not look into header
lists; the checks here refuse what matters when a request goes on as
HTTP/1.1, which is the request smuggling surface of a downgrade:

  - names that are empty, not tokens, or not lower case; values with NUL,
    CR, LF (or any other control character but HTAB), or with leading or
    trailing whitespace: each could split or forge a header or a request
    line on the HTTP/1.1 side;
  - connection-specific fields (C{connection}, C{keep-alive},
    C{proxy-connection}, C{transfer-encoding}, C{upgrade}, and C{te} other
    than C{trailers}): HTTP/2 has no use for them, and an HTTP/1.1 backend
    would frame the body by C{transfer-encoding};
  - pseudo-header rules: only C{:method}, C{:scheme}, C{:authority},
    C{:path}, each at most once, all before the regular fields; C{:method}
    a token, C{:path} origin-form (or C{*} for OPTIONS) without space,
    control characters or fragment; C{:authority} and C{host} agreeing;
  - C{content-length} that is not one decimal number.  (The connection,
    L{balance.http.h2}, checks DATA against C{content-length}, always:
    more or less than announced is a connection error, so a short or long
    body never reaches a backend.)

Everything here is pure and works on bytes.
"""

from __future__ import annotations

import re

from balance.http.headers import forwarded_for
from balance.http.message import HOP_BY_HOP, NO_BODY_STATUS, connection_tokens, valid_host

__all__ = [
    "grpc_local_fields",
    "grpc_status",
    "grpc_timeout",
    "is_grpc",
    "RequestError",
    "read_request",
    "response_fields",
    "local_fields",
    "route_reply",
    "request_fields",
    "response_head_fields",
    "safe_trailers",
]

# As in HTTP/1.1 (balance.http.h1): more fields than this is a 431.
MAX_FIELDS = 128

_VIA = b"1.1 balance"

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9a-z"
# Regular field names joined by "\n": each a non-empty lower-case token.
_NAMES = re.compile(rb"[%s]+(?:\n[%s]+)*\Z" % (_TCHAR, _TCHAR))
# Control characters but HTAB (and NUL, which joins values; see _bad_values).
_CONTROLS = bytes([c for c in range(1, 32) if c != 9]) + b"\x7f"
_BLANKS = (b" ", b"\t")
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# An origin-form target: visible ASCII, no fragment.
_PATH = re.compile(rb"/[!-\"$-~]*\Z")

# Request field names handled one by one; every other name is copied.
_PSEUDO = 1
_HOST = 2
_LENGTH = 3
_COOKIE = 4
_TE = 5
_EXPECT = 6
_CONNECTION = 7
_GRPC_TIMEOUT = 8
_SPECIAL = {
    b":method": _PSEUDO,
    b":scheme": _PSEUDO,
    b":path": _PSEUDO,
    b":authority": _PSEUDO,
    b"host": _HOST,
    b"content-length": _LENGTH,
    b"cookie": _COOKIE,
    b"te": _TE,
    b"expect": _EXPECT,
    b"connection": _CONNECTION,
    b"keep-alive": _CONNECTION,
    b"proxy-connection": _CONNECTION,
    b"transfer-encoding": _CONNECTION,
    b"upgrade": _CONNECTION,
    b"grpc-timeout": _GRPC_TIMEOUT,
}

#: The units of C{grpc-timeout}, in seconds.
_GRPC_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}

#: gRPC status codes (by name, for local replies).
GRPC_OK = 0
GRPC_UNKNOWN = 2
GRPC_DEADLINE_EXCEEDED = 4
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNIMPLEMENTED = 12
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16

# What a gRPC client gets instead of the HTTP status of a local reply: the
# gRPC project's HTTP-to-gRPC mapping (doc/http-grpc-status-mapping.md),
# except where the proxy knows better (see grpc_status).
_GRPC_STATUS = {
    400: GRPC_INTERNAL,
    401: GRPC_UNAUTHENTICATED,
    403: GRPC_PERMISSION_DENIED,
    404: GRPC_UNIMPLEMENTED,
    405: GRPC_UNIMPLEMENTED,
    408: GRPC_DEADLINE_EXCEEDED,
    413: GRPC_RESOURCE_EXHAUSTED,
    429: GRPC_RESOURCE_EXHAUSTED,
    431: GRPC_RESOURCE_EXHAUSTED,
    501: GRPC_UNIMPLEMENTED,
    502: GRPC_UNAVAILABLE,
    503: GRPC_UNAVAILABLE,
    504: GRPC_UNAVAILABLE,
}

_STATUS = {code: b"%d" % code for code in range(100, 600)}
_TEXT_PLAIN = (b"content-type", b"text/plain; charset=utf-8")
_RESPONSE_SPECIAL = HOP_BY_HOP | {b"via", b"content-length"}


def _bad_values(values: bytes) -> bool:
    """
    Whether field values joined by "\\0" (whose count is checked apart)
    hold a control character but HTAB, or whitespace at either end of a
    value: a few passes in C, cheaper than one regular expression.
    """
    return (
        len(values.translate(None, _CONTROLS)) != len(values)
        or values.startswith(_BLANKS)
        or values.endswith(_BLANKS)
        or b"\x00 " in values
        or b" \x00" in values
        or b"\x00\t" in values
        or b"\t\x00" in values
    )


class RequestError(Exception):
    """
    A request that must not be forwarded: answer C{status} on its stream.

    :ivar reason: why, for the access log.
    """

    def __init__(self, status: int, reason: str):
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


def read_request(ex, fields, max_header_bytes: int, max_body_bytes: int) -> bool:
    """
    Check a request's header list and fill in C{ex} as the HTTP/1.1 parser
    would have: C{method}, C{target}, C{path}, C{host}, C{headers} (what the
    backend gets: the regular fields, C{host} first when only
    C{:authority} gave it, cookies joined into one field as RFC 9113 8.2.3
    asks), C{content_length} and C{expect_continue}.  Body framing towards
    the backend (C{content-length} or chunked) is the caller's to choose,
    once it knows whether a body follows.

    :param fields: the decoded header list, C{(name, value)} pairs of bytes.
    :return: whether the request has a C{content-length}.
    :raise RequestError: the request is malformed (400), too large (413,
        431), or asks for what Balance does not do (405, 417, 501).
    """
    if len(fields) > MAX_FIELDS:
        raise RequestError(431, "more than %d request header fields" % (MAX_FIELDS,))
    method = scheme = path = authority = host = length = None
    cookies = None
    headers = []
    append = headers.append
    special = _SPECIAL.get
    pseudo = 0
    regular_special = False
    for field in fields:
        name = field[0]
        kind = special(name)
        if kind is None:
            if name[:1] == b":":
                raise RequestError(400, "pseudo-header field %r" % (name,))
            append(field)
            continue
        value = field[1]
        if kind == _PSEUDO:
            if headers or regular_special:
                raise RequestError(400, "pseudo-header field after a regular field")
            pseudo += 1
            if name == b":method":
                if method is not None:
                    raise RequestError(400, "repeated :method")
                method = value
            elif name == b":path":
                if path is not None:
                    raise RequestError(400, "repeated :path")
                path = value
            elif name == b":scheme":
                if scheme is not None:
                    raise RequestError(400, "repeated :scheme")
                scheme = value
            else:
                if authority is not None:
                    raise RequestError(400, "repeated :authority")
                authority = value
            continue
        regular_special = True
        if kind == _HOST:
            if host is not None:
                raise RequestError(400, "more than one host field")
            host = value
            append(field)
        elif kind == _LENGTH:
            if not value.isdigit() or (length is not None and value != length):
                raise RequestError(400, "invalid content-length")
            if length is None:
                length = value
                append(field)
        elif kind == _COOKIE:
            if cookies is None:
                cookies = [value]
            else:
                cookies.append(value)
        elif kind == _TE:
            # RFC 9113 8.2.2: "trailers" only; TE is hop-by-hop either way.
            if value.lower() != b"trailers":
                raise RequestError(400, "te other than trailers")
            ex.te_trailers = True
        elif kind == _EXPECT:
            if value.lower() != b"100-continue":
                raise RequestError(417, "unsupported expect: %r" % (value,))
            ex.expect_continue = True
        elif kind == _GRPC_TIMEOUT:
            # The client's deadline: it bounds the route's timeout, and
            # the backend sees it too.
            ex.grpc_timeout = grpc_timeout(value)
            append(field)
        else:
            raise RequestError(400, "connection-specific field %s" % (name.decode("ascii"),))

    size = 0
    if pseudo < len(fields):
        # One pass in C over every regular name, and one over every value,
        # rather than a loop per field: these are the smuggling checks.
        regular = fields[pseudo:] if pseudo else fields
        names = b"\n".join([f[0] for f in regular])
        if _NAMES.match(names) is None:
            raise RequestError(400, "invalid header field name")
        values = b"\x00".join([f[1] for f in regular])
        if values.count(b"\x00") != len(regular) - 1:
            raise RequestError(400, "NUL in a header field value")
        if _bad_values(values):
            raise RequestError(400, "invalid header field value")
        # As HTTP/1.1 counts a head: "name: value\r\n" per field.
        size = len(names) + len(values) + 3 * len(regular)

    if method is None or path is None or scheme is None:
        if method == b"CONNECT":
            raise RequestError(405, "CONNECT is not supported")
        raise RequestError(400, "missing :method, :scheme or :path")
    if _METHOD.match(method) is None:
        raise RequestError(400, "invalid :method")
    if scheme != b"https" and scheme != b"http":
        raise RequestError(400, "unsupported :scheme %r" % (scheme,))
    if path == b"*":
        if method != b"OPTIONS":
            raise RequestError(400, "asterisk-form :path with %s" % (method.decode(),))
    elif _PATH.match(path) is None:
        raise RequestError(400, "invalid :path")
    size += len(method) + len(path)
    if authority is not None:
        if host is not None and host != authority:
            raise RequestError(400, "host field differs from :authority")
        size += len(authority)
        if host is None:
            headers.insert(0, (b"host", authority))
        host = authority
    elif host is None:
        raise RequestError(400, "missing :authority and host")
    if not host or not valid_host(host):
        raise RequestError(400, "invalid :authority or host")
    if cookies is not None:
        cookie = cookies[0] if len(cookies) == 1 else b"; ".join(cookies)
        headers.append((b"cookie", cookie))
    if size > max_header_bytes:
        raise RequestError(431, "request head larger than max_header_bytes")
    if length is not None:
        ex.content_length = int(length)
        if ex.content_length > max_body_bytes:
            raise RequestError(413, "content-length above max_body_bytes")
    ex.method = method
    ex.target = path
    query = path.find(b"?")
    ex.path = path if query < 0 else path[:query]
    ex.host = host
    ex.headers = headers
    return length is not None


def grpc_timeout(value: bytes) -> float:
    """
    The seconds of a C{grpc-timeout} value (at most 8 digits and a unit,
    gRPC over HTTP/2).

    :raise RequestError: 400, for anything else.
    """
    unit = _GRPC_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not 0 < len(digits) <= 8 or not digits.isdigit():
        raise RequestError(400, "invalid grpc-timeout %r" % (value,))
    return int(digits) * unit


def is_grpc(ex) -> bool:
    """Whether the request of C{ex} is a gRPC call (C{content-type: application/grpc...})."""
    for name, value in ex.headers or ():
        if name == b"content-type":
            return value[:16].lower() == b"application/grpc"
    return False


def grpc_status(status: int, reason: str) -> int:
    """
    The gRPC status of a local reply of HTTP C{status} for C{reason}: a
    response that did not come in time is DEADLINE_EXCEEDED, not the
    UNAVAILABLE of a 504 (clients retry UNAVAILABLE, and the backend may
    have done the work); a connection that was never made, UNAVAILABLE.
    """
    if status == 504 and "timeout" in reason and "connect timeout" not in reason:
        return GRPC_DEADLINE_EXCEEDED
    return _GRPC_STATUS.get(status, GRPC_UNKNOWN)


def _grpc_message(reason: str) -> bytes:
    # gRPC's percent-encoding: what is not printable ASCII, and "%".
    return b"".join(
        bytes((c,)) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c
        for c in reason.encode("utf-8")
    )


def grpc_local_fields(status: int, reason: str, extra: bytes = b"") -> list:
    """
    The fields of a local reply to a gRPC call: a Trailers-Only response
    (HTTP 200, C{grpc-status} and C{grpc-message}, no body), as Envoy sends,
    so that the client sees a gRPC status rather than an HTTP one.

    :param extra: further header lines, each ending in CRLF (the 429's).
    """
    out = [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % grpc_status(status, reason)),
    ]
    if reason:
        out.append((b"grpc-message", _grpc_message(reason)))
    if extra:
        out += _extra_fields(extra)
    return out


def _extra_fields(extra: bytes) -> list:
    """HTTP/1.1 header lines (each ending in CRLF) as HTTP/2 fields."""
    out = []
    for line in extra.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            out.append((name.strip().lower(), value.strip()))
    return out


def response_fields(ex, status: int, headers, set_cookie: bytes | None = None) -> list:
    """
    The fields of the HEADERS frame for a backend's response, with the same
    rewriting as L{balance.http.headers.response_head}: hop-by-hop fields
    and those C{Connection} names dropped, C{via} appended to, the route's
    edits applied, names lower-cased.  Sets C{ex.until_close} when the
    backend ends the body by closing (which the upstream side needs).

    :param headers: the backend's fields, C{(name, value)} pairs of bytes.
    :param set_cookie: the value of a C{set-cookie} field Balance adds (the
        cluster's sticky cookie), or L{None}.
    """
    route = ex.route
    remove = route.response_remove
    out = [(b":status", _STATUS.get(status) or b"%d" % status)]
    append = out.append
    conn_values = via = length = None
    chunked = te = False
    for name, value in headers:
        lname = name.lower()
        if lname in _RESPONSE_SPECIAL:
            if lname == b"content-length":
                length = value
            elif lname == b"connection":
                conn_values = [value] if conn_values is None else conn_values + [value]
            elif lname == b"transfer-encoding":
                te = True
                chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"
            elif lname == b"via":
                via = value if via is None else via + b", " + value
            continue
        if remove and lname in remove:
            continue
        append((lname, value))
    if conn_values is not None:
        tokens = connection_tokens(conn_values)
        out = [f for f in out if f[0] not in tokens]
    no_body = ex.method == b"HEAD" or status in NO_BODY_STATUS
    if te:
        length = None
    if length is not None and status != 204:
        out.append((b"content-length", length))
    ex.until_close = not no_body and length is None and not chunked
    out.append((b"via", via + b", " + _VIA if via else _VIA))
    if route.response_set:
        out.extend(route.response_set)
    if set_cookie is not None:
        out.append((b"set-cookie", set_cookie))
    return out


def local_fields(status: int, body: bytes, extra: bytes = b"") -> list:
    """
    The fields of a response Balance answers itself (as
    L{balance.http.proxy.local_response} for HTTP/1.1).

    :param extra: further header lines, each ending in CRLF (the 429's).
    """
    out = [
        (b":status", _STATUS.get(status) or b"%d" % status),
        _TEXT_PLAIN,
        (b"content-length", b"%d" % len(body)),
    ]
    if extra:
        out += _extra_fields(extra)
    return out


def route_reply(reply: bytes) -> tuple[list, bytes]:
    """
    The fields and body of a C{direct_response} or C{redirect} route, from
    the HTTP/1.1 bytes the router prepared
    (L{balance.http.router.CompiledRoute.local_reply}); parsed once per
    route and kept by the caller.
    """
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    out = [(b":status", _STATUS.get(status) or b"%d" % status)]
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name not in HOP_BY_HOP:
            out.append((name, value.strip()))
    return out, body


# Request fields an HTTP/2 backend does not get as they came: hop-by-hop
# ones, those Balance writes itself, and host (sent as :authority).
_UPSTREAM_SPECIAL = HOP_BY_HOP | {
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"forwarded",
    b"via",
    b"expect",
    b"host",
}
# Never in trailers (RFC 9110 6.5.1): framing, routing, and our own.
_NOT_TRAILERS = _UPSTREAM_SPECIAL | {
    b"content-length",
    b"content-type",
    b"content-encoding",
    b"authorization",
    b"set-cookie",
    b"cookie",
}


def request_fields(
    ex,
    client_ip: bytes,
    proto: bytes,
    scheme: bytes,
    cert_header: bytes | None = None,
    subject: bytes | None = None,
) -> list:
    """
    The HEADERS of the request of C{ex} for an HTTP/2 backend: the same
    rewriting as L{balance.http.headers.request_head} (hop-by-hop fields
    dropped, forwarding fields set, the route's edits), names lower-cased,
    C{host} as C{:authority}, and C{te: trailers} kept when the client
    sent it (gRPC needs it).

    :param proto: C{b"http"} or C{b"https"}: how the client came in.
    :param scheme: C{:scheme} for the backend (C{b"https"} over backend TLS).
    """
    route = ex.route
    remove = route.request_remove
    setters = route.request_set
    tokens = ex.connection_tokens
    target = ex.target
    if route.rewrite is not None:
        target = route.rewrite(target)
    host = ex.host
    out = [
        (b":method", ex.method),
        (b":scheme", scheme),
        (b":authority", host or ex.backend.address.encode("ascii")),
        (b":path", target),
    ]
    append = out.append
    xff = forwarded = via = None
    te = ex.te_trailers
    for name, value in ex.headers:
        lname = name.lower()
        if lname in _UPSTREAM_SPECIAL:
            if lname == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
            elif lname == b"forwarded":
                forwarded = value if forwarded is None else forwarded + b", " + value
            elif lname == b"via":
                via = value if via is None else via + b", " + value
            elif lname == b"te" and b"trailers" in value.lower():
                te = True
            continue
        if (tokens and lname in tokens) or (remove and lname in remove):
            continue
        if setters and lname in route.request_set_names:
            continue
        if cert_header is not None and lname == cert_header:
            continue
        append((lname, value))
    if te:
        append((b"te", b"trailers"))
    if subject is not None:
        append((cert_header, subject))
    append((b"x-forwarded-for", xff + b", " + client_ip if xff else client_ip))
    append((b"x-forwarded-proto", proto))
    element = b"for=" + forwarded_for(client_ip)
    if host:
        append((b"x-forwarded-host", host))
        element += b';host="' + host + b'"'
    element += b";proto=" + proto
    append((b"forwarded", forwarded + b", " + element if forwarded else element))
    append((b"via", via + b", " + _VIA if via else _VIA))
    for name, value in setters:
        append((name.lower(), value))
    return out


def response_head_fields(fields) -> tuple[int, list]:
    """
    The status and regular fields of an HTTP/2 backend's response HEADERS
    (already checked by C{h2}).

    :raise ValueError: the status is missing or not three digits.
    """
    status = None
    headers = []
    for field in fields:
        if field[0] == b":status":
            status = field[1]
        elif field[0][:1] != b":":
            headers.append(field)
    if status is None or len(status) != 3 or not status.isdigit():
        raise ValueError("invalid :status %r" % (status,))
    return int(status), headers


def safe_trailers(fields) -> list:
    """
    The trailer fields that may be passed on (to an HTTP/2 peer, or in the
    last chunk of an HTTP/1.1 body): lower-case tokens with clean values,
    no pseudo-header and nothing that frames, routes or authenticates.  A
    list with a malformed field is dropped whole.
    """
    kept = [f for f in fields if f[0] not in _NOT_TRAILERS and f[0][:1] != b":"]
    if not kept:
        return kept
    names = b"\n".join([f[0] for f in kept])
    values = b"\x00".join([f[1] for f in kept])
    if _NAMES.match(names) is None or values.count(b"\x00") != len(kept) - 1 or _bad_values(values):
        return []
    return kept
