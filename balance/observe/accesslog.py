"""
Access logs: one line per request, JSON or the combined log format.

Lines are written to a buffered file object and flushed once a second (and
on stop), so that logging costs a formatting call per request and no
system call.
"""

from __future__ import annotations

import json
import sys
import time

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _header(ex, name: bytes) -> str:
    for n, v in ex.headers or ():
        if len(n) == len(name) and n.lower() == name:
            return v.decode("latin-1")
    return "-"


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
        if path == "-":
            self._file = sys.stdout
        else:
            self._file = open(path, "a", encoding="utf-8", buffering=1 << 16)
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = reactor
        self._flusher.start(1.0, now=False)

    def write(self, ctx, conn, ex) -> None:
        """Write the line of one exchange."""
        route = ex.route
        backend = ex.backend
        now = self._clock()
        if self.format == "json":
            line = json.dumps(
                {
                    "time": now,
                    "listener": ctx.name,
                    "client": conn.client_ip.decode("ascii"),
                    "method": ex.method.decode("latin-1"),
                    "host": ex.host.decode("latin-1"),
                    "target": ex.target.decode("latin-1"),
                    "status": ex.status,
                    "request_bytes": ex.body_received,
                    "response_bytes": ex.response_bytes,
                    "duration_ms": round((ctx.reactor.seconds() - ex.started) * 1000, 3)
                    if ex.started
                    else 0,
                    "route": route.index if route is not None else None,
                    "cluster": route.cluster if route is not None else None,
                    "backend": backend.address if backend is not None else None,
                    "reason": ex.reason or None,
                },
                separators=(",", ":"),
            )
        else:
            t = time.gmtime(now)
            stamp = "%02d/%s/%04d:%02d:%02d:%02d +0000" % (
                t.tm_mday,
                _MONTHS[t.tm_mon - 1],
                t.tm_year,
                t.tm_hour,
                t.tm_min,
                t.tm_sec,
            )
            request = "%s %s HTTP/%s" % (
                ex.method.decode("latin-1"),
                ex.target.decode("latin-1"),
                "1.1" if ex.http11 else "1.0",
            )
            line = '%s - - [%s] "%s" %d %d "%s" "%s"' % (
                conn.client_ip.decode("ascii"),
                stamp,
                request if ex.method else "-",
                ex.status,
                ex.response_bytes,
                _header(ex, b"referer"),
                _header(ex, b"user-agent"),
            )
            if ex.reason:
                line += ' reason="%s"' % ex.reason.replace('"', "'")
        self._file.write(line + "\n")

    def flush(self) -> None:
        """Push buffered lines to the file."""
        try:
            self._file.flush()
        except OSError as e:
            self._log.error("cannot write access log {path}: {error}", path=self.path, error=e)

    def close(self) -> None:
        """Flush and close (on stop or reload)."""
        if self._flusher.running:
            self._flusher.stop()
        self.flush()
        if self._file is not sys.stdout:
            self._file.close()
