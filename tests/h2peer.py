"""
A scriptable HTTP/2 backend for tests (h2c, prior knowledge), on the C{h2}
library over a real loopback socket: it counts its connections and the
streams open at once, and answers by path:

  - C{/echo}: the request body back (after the whole request), with the
    request's C{te} in C{x-te} and trailers C{x-trailer: done} plus
    C{x-got-NAME} for each request trailer;
  - C{/size/N}: N bytes, sent as the client's windows allow;
  - C{/reset}: RST_STREAM INTERNAL_ERROR at once;
  - C{/refuse}: RST_STREAM REFUSED_STREAM the first time, then as C{/size/10};
  - C{/hold}: nothing until L{H2Backend.release} (then 200 C{held});
  - C{/die}: the connection is cut (its other streams with it);
  - C{/status/N}: status N, body C{status N};
  - C{/goaway}: GOAWAY with the previous stream as the last processed,
    then as C{/size/10} on the next connection;
  - anything else: 200 C{ok}.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
from h2.errors import ErrorCodes
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol


class _Stream:
    def __init__(self, sid, headers):
        self.id = sid
        self.headers = dict(headers)
        self.body = []
        self.trailers = []
        self.out = b""
        self.end_with = None


class H2BackendConnection(Protocol):
    def __init__(self, factory):
        self.factory = factory
        self.h2 = None
        self.streams = {}

    def connectionMade(self):
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.factory.max_streams
            },
        )
        self.h2.initiate_connection()
        self.factory.connections += 1
        self.factory.open.add(self)
        self.flush()

    def connectionLost(self, reason):
        self.factory.open.discard(self)

    def flush(self):
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def dataReceived(self, data):
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            self.transport.loseConnection()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.on_request(event)
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.body.append(event.data)
                self.factory.received += len(event.data)
                if not self.factory.stall_uploads:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.trailers = event.headers
            elif isinstance(event, h2.events.StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    self.on_request_ended(stream)
            elif isinstance(event, h2.events.StreamReset):
                self.streams.pop(event.stream_id, None)
                self.factory.resets += 1
            elif isinstance(event, h2.events.WindowUpdated):
                for stream in list(self.streams.values()):
                    self.pump(stream)
        self.flush()

    def on_request(self, event):
        stream = _Stream(event.stream_id, event.headers)
        self.streams[event.stream_id] = stream
        factory = self.factory
        factory.requests.append(stream.headers)
        factory.peak = max(factory.peak, len(self.streams))
        path = stream.headers[b":path"]
        if path == b"/reset":
            self.streams.pop(stream.id)
            self.h2.reset_stream(stream.id, ErrorCodes.INTERNAL_ERROR)
        elif path == b"/refuse" and not factory.refused:
            factory.refused = True
            self.streams.pop(stream.id)
            self.h2.reset_stream(stream.id, ErrorCodes.REFUSED_STREAM)
        elif path == b"/die":
            self.transport.abortConnection()
        elif path == b"/goaway" and not factory.went_away:
            factory.went_away = True
            self.streams.pop(stream.id)
            self.h2.close_connection(last_stream_id=stream.id - 2)
            self.flush()
            reactor.callLater(0, self.transport.loseConnection)
        elif path == b"/hold":
            factory.held.append((self, stream))

    def on_request_ended(self, stream):
        path = stream.headers[b":path"]
        if path == b"/hold" or stream.id not in self.streams:
            return
        if path == b"/echo":
            body = b"".join(stream.body)
            extra = [(b"x-te", stream.headers.get(b"te", b"-"))]
            trailers = [(b"x-trailer", b"done")] + [(b"x-got-" + n, v) for n, v in stream.trailers]
            self.respond(stream, body, extra, trailers)
        elif path.startswith(b"/size/"):
            self.respond(stream, b"x" * int(path[6:]))
        elif path.startswith(b"/status/"):
            self.respond(stream, b"status " + path[8:], status=path[8:])
        elif path in (b"/refuse", b"/goaway"):
            self.respond(stream, b"x" * 10)
        else:
            self.respond(stream, b"ok")

    def respond(self, stream, body, extra=(), trailers=None, status=b"200"):
        headers = [(b":status", status), (b"content-type", b"application/octet-stream")]
        if trailers is None:
            headers.append((b"content-length", b"%d" % len(body)))
        self.h2.send_headers(stream.id, headers + list(extra), end_stream=not body and not trailers)
        stream.out = body
        stream.end_with = trailers
        self.pump(stream)

    def pump(self, stream):
        if stream.id not in self.streams or (not stream.out and stream.end_with is None):
            return
        h2conn = self.h2
        while stream.out:
            window = min(
                h2conn.local_flow_control_window(stream.id), h2conn.max_outbound_frame_size
            )
            if window <= 0:
                return
            # A memoryview: slicing a large body must not copy the rest.
            out = memoryview(stream.out)
            chunk, stream.out = out[:window].tobytes(), out[window:]
            end = not stream.out and stream.end_with is None
            h2conn.send_data(stream.id, chunk, end_stream=end)
            self.factory.sent += len(chunk)
            if end:
                self.streams.pop(stream.id, None)
        if stream.end_with is not None:
            h2conn.send_headers(stream.id, stream.end_with, end_stream=True)
            stream.end_with = None
            self.streams.pop(stream.id, None)


class H2Backend(Factory):
    """
    The factory; see the module docstring.

    :ivar connections: connections accepted so far.
    :ivar peak: the most streams open at once on one connection.
    :ivar requests: every request's header dict, in order.
    """

    noisy = False

    def __init__(self, max_streams: int = 100):
        self.max_streams = max_streams
        self.connections = 0
        self.open = set()
        self.peak = 0
        self.requests = []
        self.held = []
        self.received = 0
        self.sent = 0
        self.resets = 0
        self.refused = False
        self.went_away = False
        self.stall_uploads = False

    def buildProtocol(self, addr):
        return H2BackendConnection(self)

    def release(self):
        """Answer every held request."""
        held, self.held = self.held, []
        for conn, stream in held:
            if stream.id in conn.streams:
                conn.respond(stream, b"held")
                conn.flush()

    def listen(self, testcase) -> int:
        """Listen on a free loopback port until the test ends; return the port."""
        port = reactor.listenTCP(0, self, interface="127.0.0.1")
        testcase.addCleanup(port.stopListening)

        def close_all():
            for conn in list(self.open):
                conn.transport.abortConnection()

        testcase.addCleanup(close_all)
        return port.getHost().port
