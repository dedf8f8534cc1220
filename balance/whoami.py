# -*- test-case-name: tests.test_whoami -*-
"""
The built-in demo upstream, in the manner of traefik/whoami.

A connection that starts with an HTTP/1.x request line is answered as HTTP:
every request gets the upstream's name and an echo of its request line and
headers. Any other connection is a raw TCP echo. This lets the shipped example
config run on a machine with no other server, and lets users see what a
backend actually receives through Balance.

A few paths exist for tests and benchmarks:

  - ``/health`` answers ``ok``;
  - ``/status/NNN`` answers status NNN (200..599) with the usual echo body;
  - ``/data?size=N`` answers N bytes of ``a`` (at most ``DATA_MAX``), streamed
    under back-pressure rather than built in memory.

Any method is accepted on any path; HEAD gets the headers only.
"""

from __future__ import annotations

import enum
import re
import socket
from collections import deque
from http import HTTPStatus

import httptools
from twisted.internet import interfaces, protocol
from zope.interface import implementer

#: Largest body ``/data?size=N`` sends; bigger sizes are capped to this.
DATA_MAX = 1 << 30

#: Bytes buffered while deciding between HTTP and raw echo; a stream that has
#: not shown a whole request line by then is echoed.
SNIFF_LIMIT = 8192

# Methods are upper-case tokens; '-' and '_' appear in real ones (M-SEARCH).
_METHOD_PREFIX = re.compile(rb"[A-Z_-]{0,20}")
_METHOD = re.compile(rb"[A-Z_-]{1,20}")
_TARGET_PREFIX = re.compile(rb"[\x21-\x7e]*")
_VERSIONS = (b"HTTP/1.1\r\n", b"HTTP/1.0\r\n")

# One shared read-only chunk, so /data allocates nothing per chunk sent.
_CHUNK = b"a" * 65536

_PHRASES = {status.value: status.phrase.encode() for status in HTTPStatus}
_STATUS_LINES = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, _PHRASES.get(code, b"Status"))
    for code in range(200, 600)
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def sniff_http(data: bytes, limit: int = SNIFF_LIMIT) -> bool | None:
    """
    Decide whether ``data`` starts with an HTTP/1.x request line.

    The line is ``METHOD SP target SP HTTP/1.0|1.1 CRLF``, with a method of 1
    to 20 upper-case token characters and a target of visible ASCII.

    :param data: the first bytes of a stream, however many have arrived.
    :param limit: the length at which an undecided prefix counts as raw.
    :return: ``True`` for HTTP, ``False`` when no continuation of ``data`` can be
        HTTP, ``None`` when more bytes are needed to tell.
    """
    sp1 = data.find(b" ", 0, 21)
    if sp1 == -1:
        return None if len(data) <= 20 and _METHOD_PREFIX.fullmatch(data) else False
    if not _METHOD.fullmatch(data, 0, sp1):
        return False
    sp2 = data.find(b" ", sp1 + 1)
    if sp2 == -1:
        if not _TARGET_PREFIX.fullmatch(data, sp1 + 1):
            return False
        return None if len(data) < limit else False
    if sp2 == sp1 + 1 or not _TARGET_PREFIX.fullmatch(data, sp1 + 1, sp2):
        return False
    version = data[sp2 + 1 : sp2 + 11]
    if not any(v.startswith(version) for v in _VERSIONS):
        return False
    if len(version) == 10:
        return True
    return None if len(data) < limit else False


class _Mode(enum.Enum):
    SNIFF = "sniff"
    RAW = "raw"
    HTTP = "http"


class _Filler:
    """The part of a ``/data`` body still to be sent."""

    def __init__(self, remaining: int) -> None:
        self.remaining = remaining


# Queued after the last response of a connection that must then close.
_CLOSE = object()


@implementer(interfaces.IHalfCloseableProtocol, interfaces.IPushProducer)
class WhoamiProtocol(protocol.Protocol):
    """
    One whoami connection: sniffs the first bytes, then echoes or answers HTTP.

    In HTTP mode the protocol is the transport's push producer: responses go
    through an ordered queue, which holds still while the transport's buffer
    is full, and reading stops meanwhile so a client that pipelines without
    reading cannot make us buffer without bound.
    """

    def __init__(self, factory: WhoamiFactory) -> None:
        self.factory = factory
        self._mode = _Mode.SNIFF
        self._sniffed = b""
        self._parser: httptools.HttpRequestParser | None = None
        self._out: deque = deque()
        self._paused = False
        self._closing = False
        self._read_closed = False
        self._head: bytes | None = None
        self._url: list[bytes] = []
        self._headers: list[bytes] = []
        self._body_bytes = 0
        self._expect = False

    def connectionMade(self) -> None:
        self.factory.openConnections += 1

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.factory.openConnections -= 1
        self._out.clear()
        self._parser = None

    def dataReceived(self, data: bytes) -> None:
        if self._mode is _Mode.RAW:
            self.transport.write(data)
        elif self._mode is _Mode.HTTP:
            self._feed(data)
        else:
            # TCP may cut the request line anywhere, so decide on everything
            # received so far, never on this segment alone.
            self._sniffed += data
            verdict = sniff_http(self._sniffed)
            if verdict is not None:
                data, self._sniffed = self._sniffed, b""
                (self._start_http if verdict else self._start_raw)(data)

    def readConnectionLost(self) -> None:
        """The client has sent everything: finish our side, then close it."""
        self._read_closed = True
        if self._mode is _Mode.SNIFF:
            data, self._sniffed = self._sniffed, b""
            self._start_raw(data)
        if self._mode is _Mode.RAW:
            # Unregister first: a paused transport would otherwise resume
            # reading a socket already at EOF, and loseWriteConnection waits
            # for no producer.
            self.transport.unregisterProducer()
            self.transport.loseWriteConnection()
        elif not self._closing:
            self._close_after_responses()

    def writeConnectionLost(self) -> None:
        """Both directions are done; release the socket."""
        self.transport.loseConnection()

    # Raw mode

    def _start_raw(self, data: bytes) -> None:
        self._mode = _Mode.RAW
        # The transport produces into itself, so it stops reading from the
        # client while the client is not reading our echo (portforward does
        # the same across two transports).
        self.transport.registerProducer(self.transport, True)
        self.transport.write(data)

    # HTTP mode

    def _start_http(self, data: bytes) -> None:
        self._mode = _Mode.HTTP
        self._parser = httptools.HttpRequestParser(self)
        self.transport.registerProducer(self, True)
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        if self._closing:
            # A close is already queued; what the client sends after it will
            # not be answered.
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            raise  # a bug here, not a bad request: let Twisted log it
        except httptools.HttpParserUpgrade:
            pass  # answered in on_message_complete, with a close queued
        except httptools.HttpParserError:
            if not self._closing:
                body = b"Bad Request: malformed HTTP/1.x\n"
                self._send(self._response(400, body, False))
                self._close_after_responses()

    def on_message_begin(self) -> None:
        """Start of a request (httptools callback)."""
        self._url = []
        self._headers = []
        self._body_bytes = 0
        self._expect = False

    def on_url(self, url: bytes) -> None:
        """A piece of the request target; it may arrive in several (httptools callback)."""
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """One complete header, kept as received (httptools callback)."""
        self._headers.append(b"%s: %s\n" % (name, value))
        if len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            self._expect = True

    def on_headers_complete(self) -> None:
        """Headers done: release a client waiting for 100 Continue (httptools callback)."""
        if self._expect and self._parser.get_http_version() == "1.1":
            self._send(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        """Request body bytes, counted and dropped (httptools callback)."""
        self._body_bytes += len(body)

    def on_message_complete(self) -> None:
        """A whole request has arrived: answer it (httptools callback)."""
        parser = self._parser
        # llhttp stops parsing after Upgrade and CONNECT; we never switch
        # protocols, so such a connection ends with its answer.
        keep_alive = parser.should_keep_alive() and not parser.should_upgrade()
        head_only = parser.get_method() == b"HEAD"
        code, body, size = self._route(b"".join(self._url))
        self._send(self._response(code, body, keep_alive, head_only, size))
        if size and not head_only:
            self._send(_Filler(size))
        if not keep_alive:
            self._close_after_responses()

    def _route(self, url: bytes) -> tuple[int, bytes, int]:
        """Status, body and ``/data`` size (sent after the body) for a request target."""
        path, _, query = url.partition(b"?")
        if path == b"/health":
            return 200, b"ok", 0
        if path == b"/data":
            size = _parse_size(query)
            if size is None:
                return 400, b"Bad Request: /data needs size=N, N a non-negative integer\n", 0
            return 200, b"", size
        if path.startswith(b"/status/"):
            code = path[8:]
            if not (len(code) == 3 and code.isdigit() and 200 <= int(code) <= 599):
                return 400, b"Bad Request: /status/NNN needs NNN in 200..599\n", 0
            return int(code), self._echo(url), 0
        return 200, self._echo(url), 0

    def _echo(self, url: bytes) -> bytes:
        """The whoami body: who answered, to whom, and the request as received."""
        if self._head is None:
            self._head = b"Name: %s\nHostname: %s\nIP: %s\nRemoteAddr: %s\n" % (
                self.factory.name.encode(),
                self.factory.hostname.encode(),
                _address(self.transport.getHost(), False),
                _address(self.transport.getPeer(), True),
            )
        parser = self._parser
        version = parser.get_http_version().encode()
        line = b"%s %s HTTP/%s\n" % (parser.get_method(), url, version)
        tail = b"Body-Bytes: %d\n" % self._body_bytes if self._body_bytes else b""
        return b"".join((self._head, line, *self._headers, tail))

    def _response(
        self, code: int, body: bytes, keep_alive: bool, head_only: bool = False, extra: int = 0
    ) -> bytes:
        """Status line, headers and (unless HEAD) body, as one write; ``extra`` bytes follow."""
        if code in (204, 304):
            framing, body = b"", b""  # these never carry a body
        else:
            framing = b"Content-Length: %d\r\n" % (len(body) + extra)
        if not keep_alive:
            connection = b"Connection: close\r\n"
        elif self._parser.get_http_version() == "1.0":
            connection = b"Connection: keep-alive\r\n"
        else:
            connection = b""
        return b"%s%s%s%s\r\n%s" % (
            _STATUS_LINES[code],
            self.factory.response_headers,
            framing,
            connection,
            b"" if head_only else body,
        )

    # Output queue and IPushProducer

    def _send(self, item) -> None:
        if not self._out and not self._paused and type(item) is bytes:
            self.transport.write(item)  # the common case: nothing queued
        else:
            self._out.append(item)
            self._pump()

    def _close_after_responses(self) -> None:
        self._closing = True
        self._send(_CLOSE)

    def _pump(self) -> None:
        out = self._out
        while out and not self._paused:
            item = out[0]
            if item is _CLOSE:
                out.clear()
                # A registered producer would keep loseConnection waiting.
                self.transport.unregisterProducer()
                self.transport.loseConnection()
                return
            if type(item) is bytes:
                out.popleft()
                self.transport.write(item)
                continue
            # A /data body: write until the transport says its buffer is full
            # (it calls pauseProducing from inside write) or the body ends.
            while item.remaining and not self._paused:
                n = min(item.remaining, len(_CHUNK))
                item.remaining -= n
                self.transport.write(_CHUNK if n == len(_CHUNK) else _CHUNK[:n])
            if not item.remaining:
                out.popleft()

    def pauseProducing(self) -> None:
        """The client is not reading: stop writing, and stop reading too."""
        self._paused = True
        if not self._read_closed:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """The client caught up: continue the queue, then read again."""
        self._paused = False
        self._pump()
        if not self._paused and not self._read_closed and not self._closing:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The connection is gone: drop whatever is queued."""
        self._paused = True
        self._out.clear()


def _parse_size(query: bytes) -> int | None:
    for part in query.split(b"&"):
        if part.startswith(b"size="):
            value = part[5:]
            if not value.isdigit():
                return None
            # Long digit strings are capped without int(), which refuses
            # thousands of digits.
            return min(int(value), DATA_MAX) if len(value) <= 12 else DATA_MAX
    return None


def _address(address, with_port: bool) -> bytes:
    host = getattr(address, "host", None)
    if host is None:  # e.g. a UNIX socket, which has a name and no host
        return str(getattr(address, "name", address)).encode()
    if not with_port:
        return host.encode()
    return (f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}").encode()


class WhoamiFactory(protocol.Factory):
    """
    Builds whoami connections for one named demo upstream.

    :ivar name: the upstream's name, reported in every HTTP answer.
    :ivar hostname: this machine's host name, read once.
    :ivar openConnections: connections currently open, for tests and drain.
    :ivar response_headers: the headers every response carries, as bytes.
    """

    def __init__(self, name: str, reactor=None) -> None:
        """
        :param name: the name to report, e.g. ``"alpha"``.
        :param reactor: an ``IReactorTime``, accepted so the service builder
            can treat every factory alike; whoami schedules no timed work today.
        """
        self.name = name
        self._reactor = reactor
        self.hostname = socket.gethostname()
        self.openConnections = 0
        # The same on every response, so built once.
        self.response_headers = (
            b"Content-Type: text/plain; charset=utf-8\r\nX-Whoami-Name: %s\r\n" % name.encode()
        )

    def buildProtocol(self, addr) -> WhoamiProtocol:
        """One ``WhoamiProtocol`` per accepted connection."""
        return WhoamiProtocol(self)
