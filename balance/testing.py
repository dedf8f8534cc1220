# -*- test-case-name: tests.http.test_h1 -*-
"""
Reusable test doubles: an HTTP listener of Balance running in memory, with
fake clients and fake backends, driven by a L{twisted.internet.task.Clock}.

Nothing here opens a socket.  Transports behave like Twisted's TCP
transports in the ways the proxy relies on: a closed connection is reported
to its protocol on the next turn of the clock, a paused transport delivers
nothing until resumed, and a transport whose peer does not read pauses its
registered streaming producer beyond C{buffer_size} unread bytes (and
resumes it once the peer reads), as L{twisted.internet.abstract.FileDescriptor}
does.

Typical use::

    proxy = InMemoryProxy('''
        listeners:
          - {name: web, listen: "tcp:8080", cluster: app}
        clusters:
          - {name: app, backends: ["10.0.0.1:80"]}
    ''')
    client = proxy.client()
    client.send(b"GET / HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
    proxy.run()
    backend = proxy.backend().connections[0]
    backend.respond(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
    [response] = client.responses()
"""

from __future__ import annotations

import textwrap
from collections import deque

import httptools
from twisted.internet import error, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from balance.cluster.cluster import Cluster
from balance.config.load import load_text
from balance.config.validate import validate
from balance.http.pool import PoolSet
from balance.http.server import HTTPContext, HTTPFactory

__all__ = [
    "FakeBackendConnection",
    "FakeClient",
    "FakeEndpoint",
    "InMemoryProxy",
    "MemoryTransport",
    "ParsedRequest",
    "ParsedResponse",
    "parse_requests",
    "parse_responses",
]


class MemoryTransport(StringTransport):
    """
    A L{StringTransport} that closes like a TCP transport: C{loseConnection}
    and C{abortConnection} deliver C{connectionLost} to C{protocol} on the
    next turn of C{clock}, and a registered producer is stopped then.

    :ivar consume_writes: whether the peer reads everything at once; when
        false, written bytes count as unread until L{read} and a streaming
        producer is paused beyond C{buffer_size} of them.
    :ivar unread: bytes written that the peer has not read yet.
    :ivar lost: C{connectionLost} was delivered.
    :ivar on_resume: called on the next turn of the clock after the protocol
        resumes reading, so the peer can deliver what it held back.
    """

    buffer_size = 65536

    def __init__(self, clock, peer, host):
        super().__init__(hostAddress=host, peerAddress=peer, lenient=True)
        self.clock = clock
        self.protocol = None
        self.consume_writes = True
        self.unread = 0
        self.producer_paused = False
        self.lost = False
        self.on_resume = None

    def write(self, data: bytes) -> None:
        StringTransport.write(self, data)
        if self.consume_writes:
            return
        self.unread += len(data)
        if (
            self.producer is not None
            and self.streaming
            and not self.producer_paused
            and self.unread > self.buffer_size
        ):
            self.producer_paused = True
            self.producer.pauseProducing()

    def read(self) -> bytes:
        """
        The peer reads what it had not read yet; a producer paused for
        that reason is resumed.

        :return: everything written so far.
        """
        self.unread = 0
        if self.producer_paused:
            self.producer_paused = False
            if self.producer is not None:
                self.producer.resumeProducing()
        return self.value()

    def unregisterProducer(self) -> None:
        # Lenient, like a TCP transport (whose producer is dropped when the
        # connection is lost).
        self.producer = None
        self.streaming = None
        self.producer_paused = False

    def resumeProducing(self) -> None:
        StringTransport.resumeProducing(self)
        if self.on_resume is not None:
            # Like a reactor: bytes come on a later turn, never from inside
            # the call that resumed reading.
            self.clock.callLater(0, self.on_resume)

    def stopProducing(self) -> None:
        # A TCP transport asked to stop producing closes.
        StringTransport.stopProducing(self)
        self.loseConnection()

    @property
    def reading(self) -> bool:
        """Whether the protocol lets this transport deliver bytes."""
        return self.producerState == "producing" and not self.lost

    def loseConnection(self) -> None:
        if not self.disconnecting:
            StringTransport.loseConnection(self)
            self.clock.callLater(0, self.connection_lost, error.ConnectionDone())

    def abortConnection(self) -> None:
        self.disconnected = True
        if not self.disconnecting:
            StringTransport.loseConnection(self)
        self.clock.callLater(0, self.connection_lost, error.ConnectionLost())

    def connection_lost(self, reason: Exception) -> None:
        """Tell the protocol the connection is gone (once)."""
        if self.lost:
            return
        self.lost = True
        self.connected = False
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        self.protocol.connectionLost(Failure(reason))


class _Peer:
    """The test's end of a L{MemoryTransport}: sends while it may."""

    def __init__(self, protocol, transport: MemoryTransport):
        self.protocol = protocol
        self.transport = transport
        self._outbox: deque[bytes] = deque()
        transport.on_resume = self._deliver

    def send(self, data: bytes, byte_by_byte: bool = False) -> None:
        """
        Deliver C{data} to the protocol now, or once it reads again.

        :param byte_by_byte: deliver one byte per C{dataReceived} call.
        """
        if byte_by_byte:
            self._outbox.extend(data[i : i + 1] for i in range(len(data)))
        elif data:
            self._outbox.append(data)
        self._deliver()

    @property
    def held(self) -> int:
        """Bytes sent but not delivered, because the protocol paused reading."""
        return sum(len(d) for d in self._outbox)

    def _deliver(self) -> None:
        outbox = self._outbox
        transport = self.transport
        while outbox and transport.reading and not transport.disconnecting:
            self.protocol.dataReceived(outbox.popleft())

    def close(self) -> None:
        """The peer closes the connection (cleanly)."""
        self.transport.connection_lost(error.ConnectionDone())

    def reset(self) -> None:
        """The connection is reset by the peer."""
        self.transport.connection_lost(error.ConnectionLost())

    def received(self) -> bytes:
        """Everything the protocol has written to this peer."""
        return self.transport.value()

    @property
    def closed(self) -> bool:
        """The protocol closed (or aborted) the connection."""
        return self.transport.disconnecting

    @property
    def aborted(self) -> bool:
        """The protocol aborted the connection."""
        return bool(self.transport.disconnected)


class FakeClient(_Peer):
    """
    A client connected to an L{InMemoryProxy}.

    :ivar protocol: the proxy's L{balance.http.h1.DownstreamConnection}.
    """

    def responses(self, methods=()) -> list[ParsedResponse]:
        """
        The responses received so far.

        :param methods: the methods of the requests, in order, so that
            responses to C{HEAD} are read without a body.
        """
        return parse_responses(self.received(), methods)


class FakeBackendConnection(_Peer):
    """
    The backend's end of one connection the proxy opened.

    :ivar protocol: the proxy's L{balance.http.upstream.UpstreamConnection}.
    """

    def respond(self, data: bytes, byte_by_byte: bool = False) -> None:
        """The backend sends C{data}; see L{_Peer.send}."""
        self.send(data, byte_by_byte)

    def requests(self) -> list[ParsedRequest]:
        """The requests the proxy sent on this connection, parsed."""
        return parse_requests(self.received())


class FakeEndpoint:
    """
    A backend's client endpoint.  Connections complete on the next turn of
    the clock, according to C{mode}:

      - C{"accept"}: the connection is made;
      - C{"refuse"}: it fails with L{error.ConnectionRefusedError};
      - C{"timeout"}: it fails with L{error.TimeoutError} (the endpoint's
        connect timeout expired);
      - C{"hang"}: nothing happens until L{complete} or L{fail_pending}.

    :ivar connections: the L{FakeBackendConnection} of every connection made.
    :ivar attempts: the number of connection attempts.
    """

    def __init__(self, clock, address: str):
        self.clock = clock
        self.address = address
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        family = IPv6Address if ":" in host else IPv4Address
        self._host = family("TCP", host, int(port))
        self.mode = "accept"
        self.connections: list[FakeBackendConnection] = []
        self.attempts = 0
        self._pending: list[tuple[Deferred, object]] = []

    def connect(self, factory) -> Deferred:
        """L{IStreamClientEndpoint.connect}."""
        self.attempts += 1
        d = Deferred()
        self._pending.append((d, factory))
        if self.mode != "hang":
            self.clock.callLater(0, self._settle, self.mode)
        return d

    def _settle(self, mode: str) -> None:
        if not self._pending:
            return
        d, factory = self._pending.pop(0)
        if mode == "refuse":
            d.errback(error.ConnectionRefusedError())
        elif mode == "timeout":
            d.errback(error.TimeoutError())
        else:
            d.callback(self._accept(factory))

    def _accept(self, factory):
        local = IPv4Address("TCP", "10.255.0.1", 50000 + len(self.connections))
        protocol = factory.buildProtocol(self._host)
        transport = MemoryTransport(self.clock, peer=self._host, host=local)
        transport.protocol = protocol
        self.connections.append(FakeBackendConnection(protocol, transport))
        protocol.makeConnection(transport)
        return protocol

    @property
    def pending(self) -> int:
        """Connection attempts not settled yet."""
        return len(self._pending)

    def complete(self) -> None:
        """Make every pending connection attempt succeed."""
        while self._pending:
            self._settle("accept")

    def fail_pending(self, mode: str = "refuse") -> None:
        """Make every pending connection attempt fail as C{mode} says."""
        while self._pending:
            self._settle(mode)

    def open_connections(self) -> list[FakeBackendConnection]:
        """The connections neither side has closed."""
        return [c for c in self.connections if not c.transport.lost and not c.closed]


class InMemoryProxy:
    """
    The first listener of a config, as an HTTP proxy in memory: its
    clusters' backends are L{FakeEndpoint}s and time is a L{task.Clock}.

    :ivar clock: the clock, also the proxy's reactor.
    :ivar context: the listener's L{HTTPContext}.
    :ivar factory: the listener's L{HTTPFactory}.
    :ivar endpoints: the L{FakeEndpoint} of every backend, by address.
    """

    def __init__(self, config_text: str, clock=None, access_log=None):
        """
        :param config_text: a Balance YAML config (dedented here); its first
            listener must be an http one.
        :param access_log: an L{balance.observe.accesslog.AccessLog}, or an
            object with the same C{write(ctx, conn, ex)} method.
        """
        self.clock = task.Clock() if clock is None else clock
        self.config = validate(load_text(textwrap.dedent(config_text), "test.yaml"), "test.yaml")
        self.clusters = {c.name: Cluster(c, self.clock) for c in self.config.clusters}
        self.endpoints: dict[str, FakeEndpoint] = {}
        for cluster in self.clusters.values():
            for backend in cluster.backends:
                backend.endpoint = FakeEndpoint(self.clock, backend.address)
                self.endpoints[backend.address] = backend.endpoint
        self.pools = PoolSet(self.clock)
        self.context = HTTPContext(
            self.config.listeners[0], self.clusters, self.pools, self.clock, access_log
        )
        self.factory = HTTPFactory(self.context)
        self._clients = 0

    def client(self, host: str = "192.0.2.10") -> FakeClient:
        """Connect a new client from C{host} (IPv4 or IPv6)."""
        self._clients += 1
        family = IPv6Address if ":" in host else IPv4Address
        peer = family("TCP", host, 40000 + self._clients)
        protocol = self.factory.buildProtocol(peer)
        transport = MemoryTransport(self.clock, peer=peer, host=IPv4Address("TCP", "10.0.0.1", 80))
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return FakeClient(protocol, transport)

    def backend(self, address: str | None = None) -> FakeEndpoint:
        """The endpoint of the backend at C{address}, or of the only one."""
        if address is None:
            [endpoint] = self.endpoints.values()
            return endpoint
        return self.endpoints[address]

    def run(self, seconds: float = 0.0) -> None:
        """Let C{seconds} pass, running whatever is due (connects, closes)."""
        self.clock.advance(0)
        if seconds:
            self.clock.advance(seconds)
            self.clock.advance(0)


# -- parsing what went over the wire, for assertions ----------------------------


class _Message:
    def header(self, name: bytes) -> bytes | None:
        """The value of the last header called C{name} (any case), or None."""
        found = None
        for n, v in self.headers:
            if n.lower() == name.lower():
                found = v
        return found

    def header_values(self, name: bytes) -> list[bytes]:
        """The values of every header called C{name}, in order."""
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def header_names(self) -> list[bytes]:
        """The lower-cased header names, in order."""
        return [n.lower() for n, _ in self.headers]


class ParsedRequest(_Message):
    """
    A request as a backend received it.

    :ivar body: the body, de-chunked.
    :ivar chunked: it was sent with chunked framing.
    """

    def __init__(self):
        self.method = b""
        self.target = b""
        self.version = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.chunked = False
        self.complete = False

    def __repr__(self) -> str:
        return f"<ParsedRequest {self.method!r} {self.target!r} {len(self.body)} body bytes>"


class _RequestCollector:
    def __init__(self):
        self.requests: list[ParsedRequest] = []
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""

    def on_message_begin(self):
        self.requests.append(ParsedRequest())
        self._url = b""

    def on_url(self, url):
        self._url += url

    def on_header(self, name, value):
        self.requests[-1].headers.append((name, value))

    def on_headers_complete(self):
        r = self.requests[-1]
        r.method = self.parser.get_method()
        r.target = self._url
        r.version = self.parser.get_http_version()
        r.chunked = r.header(b"transfer-encoding") is not None

    def on_body(self, body):
        self.requests[-1].body += body

    def on_message_complete(self):
        self.requests[-1].complete = True


def parse_requests(data: bytes) -> list[ParsedRequest]:
    """
    Parse the requests in C{data}; the last one may be incomplete (its
    C{complete} is false).

    :raise httptools.HttpParserError: if C{data} is not HTTP/1.1 requests.
    """
    collector = _RequestCollector()
    try:
        collector.parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    return collector.requests


class ParsedResponse(_Message):
    """
    A response as a client received it.

    :ivar body: the body, de-chunked.
    :ivar chunked: it was sent with chunked framing.
    :ivar complete: its whole body arrived (bodies delimited by the close of
        the connection count as complete).
    """

    def __init__(self, status: int, reason: bytes, headers):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = b""
        self.chunked = False
        self.complete = False

    def __repr__(self) -> str:
        return f"<ParsedResponse {self.status} {len(self.body)} body bytes>"


_NO_BODY = frozenset({204, 304})


def parse_responses(data: bytes, methods=()) -> list[ParsedResponse]:
    """
    Parse the responses in C{data}, written plainly so that it does not share
    the proxy's parser: interim (1xx) responses are included, a response to
    C{HEAD} (per C{methods}, the request methods in order) has no body, and
    a body without framing runs to the end of C{data}.

    :raise ValueError: if C{data} is not a sequence of HTTP/1.x responses.
    """
    responses: list[ParsedResponse] = []
    methods = list(methods)
    pos = 0
    final = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            raise ValueError(f"incomplete response head at {pos}: {data[pos : pos + 80]!r}")
        lines = data[pos:end].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or not code.isdigit():
            raise ValueError(f"not a status line: {lines[0]!r}")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or name != name.strip():
                raise ValueError(f"bad header line {line!r}")
            headers.append((name, value.strip()))
        response = ParsedResponse(int(code), reason, headers)
        responses.append(response)
        pos = end + 4
        if 100 <= response.status < 200:
            response.complete = True
            continue
        method = methods[final] if final < len(methods) else b"GET"
        final += 1
        length = response.header(b"content-length")
        if method == b"HEAD" or response.status in _NO_BODY:
            response.complete = True
        elif response.header(b"transfer-encoding") is not None:
            response.chunked = True
            pos = _read_chunked(data, pos, response)
        elif length is not None:
            n = int(length)
            response.body = data[pos : pos + n]
            response.complete = len(response.body) == n
            pos += n
        else:
            response.body = data[pos:]
            response.complete = True
            pos = len(data)
    return responses


def _read_chunked(data: bytes, pos: int, response: ParsedResponse) -> int:
    body = []
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            break
        size = int(data[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = data.find(b"\r\n\r\n", pos - 2)
            if end < 0:
                break
            response.complete = True
            pos = end + 4
            break
        if pos + size + 2 > len(data):
            body.append(data[pos : pos + size])
            pos = len(data)
            break
        body.append(data[pos : pos + size])
        pos += size + 2
    response.body = b"".join(body)
    return pos
