# -*- test-case-name: tests.http.test_headers -*-
"""
Rewriting heads on their way through the proxy (RFC 9110 7.6, RFC 9112):
hop-by-hop fields and those named in C{Connection} are dropped, the
forwarding fields (C{X-Forwarded-*}, C{Forwarded}, C{Via}) are set, the
route's header edits applied, and the body framing chosen.
"""

from __future__ import annotations

from balance.http.message import HOP_BY_HOP, NO_BODY_STATUS, connection_tokens, reason

# Request fields Balance writes itself (or must not forward): one set lookup
# per header sorts the common ones from these.
_REQUEST_SPECIAL = HOP_BY_HOP | {
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"forwarded",
    b"via",
    b"expect",
}
_RESPONSE_SPECIAL = HOP_BY_HOP | {b"via", b"content-length"}
_VIA = b"1.1 balance"
_ALREADY_DROPPED = HOP_BY_HOP | {b"close"}


def _codings(te: bytes) -> bytes:
    """The transfer codings of C{te} other than chunked, each followed by C{", "}."""
    return b"".join(
        c.strip() + b", " for c in te.split(b",") if c.strip() and c.strip().lower() != b"chunked"
    )


def forwarded_for(client_ip: bytes) -> bytes:
    """The C{for=} value of C{Forwarded} (RFC 7239): IPv6 quoted in brackets."""
    if b":" in client_ip:
        return b'"[%s]"' % client_ip
    return client_ip


def request_head(
    ex,
    client_ip: bytes,
    proto: bytes,
    cert_header: bytes | None = None,
    subject: bytes | None = None,
    extra: bytes = b"",
) -> bytes:
    """
    The head Balance sends upstream for the request of C{ex}.

    :param ex: the L{balance.http.proxy.Exchange}, already routed.
    :param client_ip: the downstream peer's address, for C{X-Forwarded-For}.
    :param proto: C{b"http"} or C{b"https"}.
    :param cert_header: on an mTLS listener, the (lower-case) header that
        carries the verified client certificate subject upstream; a value
        the client sent itself is dropped.
    :param subject: that subject, when the client presented a certificate.
    :param extra: further header lines (the trace context), each ending
        in CRLF.
    """
    route = ex.route
    remove = route.request_remove
    setters = route.request_set
    tokens = ex.connection_tokens
    target = ex.target
    if route.rewrite is not None:
        target = route.rewrite(target)
    parts = [b"%s %s HTTP/1.1\r\n" % (ex.method, target)]
    append = parts.append
    xff = forwarded = via = None
    for name, value in ex.headers:
        lname = name.lower()
        if lname in _REQUEST_SPECIAL:
            if lname == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
            elif lname == b"forwarded":
                forwarded = value if forwarded is None else forwarded + b", " + value
            elif lname == b"via":
                via = value if via is None else via + b", " + value
            continue
        if (tokens and lname in tokens) or (remove and lname in remove):
            continue
        if setters and lname in route.request_set_names:
            continue
        if cert_header is not None and lname == cert_header:
            continue
        append(name + b": " + value + b"\r\n")
    if subject is not None:
        append(cert_header + b": " + subject + b"\r\n")
    append(b"X-Forwarded-For: " + (xff + b", " + client_ip if xff else client_ip) + b"\r\n")
    append(b"X-Forwarded-Proto: " + proto + b"\r\n")
    host = ex.host
    element = b"for=" + forwarded_for(client_ip)
    if host:
        append(b"X-Forwarded-Host: " + host + b"\r\n")
        element += b';host="' + host + b'"'
    element += b";proto=" + proto
    append(b"Forwarded: " + (forwarded + b", " + element if forwarded else element) + b"\r\n")
    append(b"Via: " + (via + b", " + _VIA if via else _VIA) + b"\r\n")
    if extra:
        append(extra)
    if ex.chunked_in:
        append(b"Transfer-Encoding: " + ex.te_value + b"\r\n")
    elif ex.upgrade is not None:
        # The one hop-by-hop pair that goes on, offering websocket alone
        # (the only upgrade Balance lets through).
        append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
    for name, value in setters:
        append(name + b": " + value + b"\r\n")
    append(b"\r\n")
    return b"".join(parts)


def response_head(
    ex, status: int, phrase: bytes, headers, draining: bool, set_cookie: bytes | None = None
) -> bytes:
    """
    The head Balance sends downstream for a backend's response, choosing
    the framing of the body on the way.

    Sets on C{ex}: C{chunked_out} (re-chunk the body for the client),
    C{until_close} (the backend ends the body by closing) and
    C{close_after} (the client connection must close after this response).

    :param set_cookie: the value of a C{Set-Cookie} field Balance adds (the
        cluster's sticky cookie), or L{None}.
    """
    route = ex.route
    remove = route.response_remove
    setters = route.response_set
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, phrase or reason(status))]
    append = parts.append
    conn_values = None
    via = None
    length = None
    chunked = False
    te = None
    for name, value in headers:
        lname = name.lower()
        if lname in _RESPONSE_SPECIAL:
            if lname == b"content-length":
                length = value
            elif lname == b"connection":
                conn_values = [value] if conn_values is None else conn_values + [value]
            elif lname == b"transfer-encoding":
                te = value if te is None else te + b", " + value
                # As the parser decides: chunked only as the last coding.
                chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"
                length = None
                ex.until_close = not chunked
            elif lname == b"via":
                via = value if via is None else via + b", " + value
            continue
        if (remove and lname in remove) or (setters and lname in route.response_set_names):
            continue
        append(name + b": " + value + b"\r\n")
    if conn_values is not None:
        # Fields named in Connection are hop-by-hop too (RFC 9110 7.6.1).
        # The usual "keep-alive" or "close" name fields already dropped.
        tokens = connection_tokens(conn_values) - _ALREADY_DROPPED
        if tokens:
            parts[1:] = [p for p in parts[1:] if p.split(b":", 1)[0].lower() not in tokens]
            append = parts.append
    if ex.method == b"HEAD" or status in NO_BODY_STATUS:
        # A 204 must not have Content-Length (RFC 9110 8.6); for HEAD and
        # 304 it states the length of the body a GET would have had.
        if length is not None and status != 204:
            append(b"Content-Length: " + length + b"\r\n")
        ex.until_close = False
    elif length is not None:
        append(b"Content-Length: " + length + b"\r\n")
    else:
        # Chunked from the backend, or delimited by its closing: re-chunk for
        # an HTTP/1.1 client; an HTTP/1.0 client reads until we close.
        ex.until_close = not chunked
        if ex.http11:
            ex.chunked_out = True
            if te is None or chunked and te.lower() == b"chunked":
                append(b"Transfer-Encoding: chunked\r\n")
            else:
                # The body passes through still in its other codings (gzip):
                # the client must be told, with chunked as the last one.
                append(b"Transfer-Encoding: " + _codings(te) + b"chunked\r\n")
        else:
            ex.close_after = True
    append(b"Via: " + (via + b", " + _VIA if via else _VIA) + b"\r\n")
    for name, value in setters:
        append(name + b": " + value + b"\r\n")
    if set_cookie is not None:
        append(b"Set-Cookie: " + set_cookie + b"\r\n")
    if ex.close_after or not ex.keep_alive or draining:
        ex.close_after = True
        append(b"Connection: close\r\n\r\n")
    elif not ex.http11:
        append(b"Connection: keep-alive\r\n\r\n")
    else:
        append(b"\r\n")
    return b"".join(parts)


def upgrade_response_head(ex, phrase: bytes, headers) -> bytes:
    """
    The head Balance sends downstream for a backend's C{101 Switching
    Protocols}: as L{response_head} for the end-to-end fields and the
    route's edits, with C{Connection: Upgrade} and the backend's
    C{Upgrade} kept, and no body framing (the connection is a tunnel
    from here on).
    """
    route = ex.route
    remove = route.response_remove
    setters = route.response_set
    parts = [b"HTTP/1.1 101 " + (phrase or reason(101)) + b"\r\n"]
    append = parts.append
    upgrade = None
    via = None
    for name, value in headers:
        lname = name.lower()
        if lname in _RESPONSE_SPECIAL:
            if lname == b"upgrade":
                upgrade = value if upgrade is None else upgrade + b", " + value
            elif lname == b"via":
                via = value if via is None else via + b", " + value
            continue
        if (remove and lname in remove) or (setters and lname in route.response_set_names):
            continue
        append(name + b": " + value + b"\r\n")
    append(b"Connection: Upgrade\r\nUpgrade: " + (upgrade or ex.upgrade) + b"\r\n")
    append(b"Via: " + (via + b", " + _VIA if via else _VIA) + b"\r\n")
    for name, value in setters:
        append(name + b": " + value + b"\r\n")
    append(b"\r\n")
    return b"".join(parts)
