"""
Access logs: one line per request (per connection on tcp listeners), JSON
or the combined log format.

Lines are held in a list and written together once a second (or every
4096 lines, and on stop and reopen), so that logging costs a formatting
call per request and about one system call per second.  L{AccessLog.reopen} (SIGUSR1) closes and reopens the file,
for logrotate's rename-then-signal.
"""

from __future__ import annotations

import json
import sys
import time
from json.encoder import encode_basestring as _json_str

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_UNREAD = object()
# Lines held in memory at most between flushes (about 2 MB).
_MAX_HELD = 4096


# Bytes that may appear in a JSON string or a combined-format field as they
# are: printable ASCII but the quote and the backslash.
_PLAIN = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')


def _header(ex, name: bytes) -> bytes:
    for n, v in ex.headers or ():
        if len(n) == len(name) and n.lower() == name:
            return v
    return b"-"


def _json_bytes(value: bytes) -> bytes:
    """Request bytes as a JSON string (bytes beyond ASCII read as Latin-1)."""
    if not value.translate(None, _PLAIN):
        return b'"%s"' % (value,)
    return _json_str(value.decode("latin-1")).encode("utf-8")


def _clf_bytes(value: bytes) -> bytes:
    """Request bytes for a quoted combined-format field: \\xHH for the unusual ones."""
    if not value.translate(None, _PLAIN):
        return value
    return b"".join(
        bytes((c,)) if c in _PLAIN else b"\\x%02x" % c for c in value
    )


def protocol_version(conn, ex) -> str:
    """C{"2"}, C{"1.1"} or C{"1.0"}: the HTTP version the client spoke."""
    if getattr(conn, "http2", False):
        return "2"
    return "1.1" if ex.http11 else "1.0"


def tls_version(conn) -> str | None:
    """
    The TLS version of a client connection (C{"TLSv1.3"}), or L{None} for
    cleartext; read once per connection and kept on it (an HTTP/2 stream
    reads its connection's).
    """
    holder = getattr(conn, "conn", conn)
    version = getattr(holder, "tls_version", _UNREAD)
    if version is _UNREAD:
        version = None
        transport = getattr(holder, "transport", None)
        if isinstance(transport, TLSMemoryBIOProtocol):
            handle = transport.getHandle()
            if handle is not None:
                version = handle.get_protocol_version_name()
                if version == "Unknown":
                    # Not negotiated yet: ask again next time.
                    return None
        try:
            holder.tls_version = version
        except AttributeError:
            pass
    return version


def _stamp(now: float) -> str:
    """The combined log format's time: C{[10/Oct/2000:13:55:36 +0000]}."""
    t = time.gmtime(now)
    return "%02d/%s/%04d:%02d:%02d:%02d +0000" % (
        t.tm_mday,
        _MONTHS[t.tm_mon - 1],
        t.tm_year,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
    )


def _iso(now: float) -> str:
    """ISO 8601 in UTC with milliseconds: C{2023-11-14T22:13:20.123Z}."""
    t = time.gmtime(now)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (
        t.tm_year,
        t.tm_mon,
        t.tm_mday,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
        int(now * 1000) % 1000,
    )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class AccessLog:
    """
    An access log file.

    :param path: a file path, or C{"-"} for standard output.
    :param fmt: C{"json"} or C{"combined"}.
    """

    _log = Logger()

    def __init__(self, path: str, fmt: str, reactor, clock=time.time):
        self.path = path
        self.format = fmt
        self._clock = clock
        self._second = -1
        self._iso_prefix = self._clf = b""
        # Per route object: its JSON and combined fragments.
        self._routes: dict = {}
        # JSON strings of listener and backend names and of methods.
        self._names: dict = {}
        # Lines not yet written: flushed once a second, or at _MAX_HELD.
        self._lines: list[bytes] = []
        self._file = self._open()
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = reactor
        self._flusher.start(1.0, now=False)

    def _open(self):
        if self.path == "-":
            return sys.stdout.buffer
        return open(self.path, "ab", buffering=1 << 16)

    def _stamps(self, now: float) -> tuple[bytes, bytes]:
        """The ISO 8601 and combined-format times of second C{now}, cached per second."""
        second = int(now)
        if second != self._second:
            self._second = second
            t = time.gmtime(second)
            self._iso_prefix = b"%04d-%02d-%02dT%02d:%02d:%02d" % t[:6]
            self._clf = b"%02d/%s/%04d:%02d:%02d:%02d +0000" % (
                t.tm_mday,
                _MONTHS[t.tm_mon - 1].encode("ascii"),
                t.tm_year,
                t.tm_hour,
                t.tm_min,
                t.tm_sec,
            )
        return self._iso_prefix, self._clf

    def _route_fields(self, route) -> tuple[bytes, bytes]:
        """C{route}'s JSON and combined fragments, computed once per route object."""
        fields = self._routes.get(route)
        if fields is None:
            if route is None:
                fields = (b'"route":null,"cluster":null', b"route=- cluster=-")
            else:
                cluster = route.cluster
                fields = (
                    (
                        '"route":%s,"cluster":%s'
                        % (
                            _json_str(route.label),
                            "null" if cluster is None else _json_str(cluster),
                        )
                    ).encode("utf-8"),
                    ("route=%s cluster=%s" % (route.label, cluster or "-")).encode("utf-8"),
                )
            if len(self._routes) < 4096:
                self._routes[route] = fields
        return fields

    def _name(self, name: str) -> bytes:
        """A listener or backend name as a JSON string, cached."""
        encoded = self._names.get(name)
        if encoded is None:
            encoded = _json_str(name).encode("utf-8")
            if len(self._names) < 4096:
                self._names[name] = encoded
        return encoded

    def _method(self, method: bytes) -> bytes:
        """A request method as a JSON string, cached (methods are few)."""
        encoded = _json_bytes(method)
        if len(self._names) < 4096:
            self._names[method] = encoded
        return encoded

    def write(self, ctx, conn, ex) -> None:
        """Write the line of one HTTP exchange."""
        now = self._clock()
        if int(now) == self._second:
            iso = self._iso_prefix
            clf = self._clf
        else:
            iso, clf = self._stamps(now)
        started = ex.started
        duration = (ctx.reactor.seconds() - started) * 1000 if started else 0.0
        backend = ex.backend
        upstream = (
            b"%.3f" % ((ex.t_head - ex.t_sent) * 1000) if ex.t_head and backend is not None else None
        )
        span = ex.span
        trace_id = None if span is None else span.trace_id
        holder = getattr(conn, "conn", conn)
        tls = getattr(holder, "tls_version", _UNREAD)
        if tls is _UNREAD:
            tls = tls_version(conn)
        if getattr(conn, "http2", False):
            protocol = b"HTTP/2.0"
        else:
            protocol = b"HTTP/1.1" if ex.http11 else b"HTTP/1.0"
        route = ex.route
        fields = self._routes.get(route)
        route_json, route_clf = fields if fields is not None else self._route_fields(route)
        method = ex.method
        if self.format == "json":
            target = ex.target
            if target.translate(None, _PLAIN):
                target = _json_bytes(target)
                path = _json_bytes(ex.path)
            else:
                # The path is a prefix of the target: plain too.
                target = b'"%s"' % (target,)
                path = b'"%s"' % (ex.path,)
            line = (
                b'{"time":"%s.%03dZ","listener":%s,"client":"%s","method":%s,"host":%s,'
                b'"target":%s,"path":%s,"protocol":"%s","status":%d,"request_bytes":%d,'
                b'"response_bytes":%d,"duration_ms":%.3f,%s,"backend":%s,'
                b'"upstream_duration_ms":%s,"tls_version":%s,"trace_id":%s,"reason":%s}\n'
                % (
                    iso,
                    int(now * 1000) % 1000,
                    self._names.get(ctx.name) or self._name(ctx.name),
                    conn.client_ip,
                    self._names.get(method) or self._method(method),
                    _json_bytes(ex.host),
                    target,
                    path,
                    protocol,
                    ex.status,
                    ex.body_received,
                    ex.response_bytes,
                    duration,
                    route_json,
                    b"null"
                    if backend is None
                    else self._names.get(backend.address) or self._name(backend.address),
                    b"null" if upstream is None else upstream,
                    b"null" if tls is None else b'"%s"' % (tls.encode("ascii"),),
                    b"null" if trace_id is None else b'"%s"' % (trace_id,),
                    _json_str(ex.reason).encode("utf-8") if ex.reason else b"null",
                )
            )
        else:
            line = (
                b'%s - - [%s] "%s" %d %d "%s" "%s" request_bytes=%d duration_ms=%.3f '
                b"%s backend=%s upstream_ms=%s tls=%s trace_id=%s%s\n"
                % (
                    conn.client_ip,
                    clf,
                    b"%s %s %s" % (method, _clf_bytes(ex.target), protocol) if method else b"-",
                    ex.status,
                    ex.response_bytes,
                    _clf_bytes(_header(ex, b"referer")),
                    _clf_bytes(_header(ex, b"user-agent")),
                    ex.body_received,
                    duration,
                    route_clf,
                    b"-" if backend is None else backend.address.encode("utf-8"),
                    b"-" if upstream is None else upstream,
                    b"-" if tls is None else tls.encode("ascii"),
                    trace_id or b"-",
                    b' reason="%s"' % ex.reason.replace('"', "'").encode("utf-8")
                    if ex.reason
                    else b"",
                )
            )
        lines = self._lines
        lines.append(line)
        if len(lines) >= _MAX_HELD:
            self.flush()

    def write_connection(
        self,
        listener: str,
        client: str,
        backend: str | None,
        bytes_in: int,
        bytes_out: int,
        duration: float,
        reason: str,
        tls: str | None = None,
    ) -> None:
        """
        Write the line of one tcp listener connection.

        :param client: the client's address.
        :param backend: the backend it was relayed to, or L{None}.
        :param bytes_in: bytes received from the client.
        :param bytes_out: bytes sent to the client.
        :param duration: seconds from accept to close.
        :param reason: why it ended, when not by the peers closing
            normally, else C{""}.
        """
        now = self._clock()
        if self.format == "json":
            line = json.dumps(
                {
                    "time": _iso(now),
                    "listener": listener,
                    "client": client,
                    "protocol": "TCP",
                    "backend": backend,
                    "request_bytes": bytes_in,
                    "response_bytes": bytes_out,
                    "duration_ms": _ms(duration),
                    "tls_version": tls,
                    "reason": reason or None,
                },
                separators=(",", ":"),
            )
        else:
            line = '%s - - [%s] "TCP" - %d "-" "-" request_bytes=%d duration_ms=%s backend=%s' % (
                client,
                _stamp(now),
                bytes_out,
                bytes_in,
                _ms(duration),
                backend or "-",
            )
            if reason:
                line += ' reason="%s"' % reason.replace('"', "'")
        self._lines.append(line.encode("utf-8") + b"\n")
        if len(self._lines) >= _MAX_HELD:
            self.flush()

    def flush(self) -> None:
        """Write the lines held so far to the file, in one system call."""
        lines = self._lines
        if lines:
            self._lines = []
            data = b"".join(lines)
        else:
            data = b""
        try:
            if data:
                self._file.write(data)
            self._file.flush()
        except OSError as e:
            self._log.error("cannot write access log {path}: {error}", path=self.path, error=e)

    def reopen(self) -> None:
        """
        Flush, close and open the file again by its path (after logrotate
        renamed it: new lines go to a new file of that name).
        """
        if self.path == "-":
            return
        self.flush()
        old = self._file
        try:
            self._file = self._open()
        except OSError as e:
            # Keep writing to the old file rather than lose lines.
            self._log.error("cannot reopen access log {path}: {error}", path=self.path, error=e)
            return
        old.close()

    def close(self) -> None:
        """Flush and close (on stop or reload)."""
        if self._flusher.running:
            self._flusher.stop()
        self.flush()
        if self.path != "-":
            self._file.close()
