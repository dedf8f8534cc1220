# -*- test-case-name: tests.l4.test_tunnel,tests.integration.test_websocket -*-
"""
A byte tunnel between two connected transports: the relay of an upgraded
HTTP connection (WebSocket), shaped so that any two transports another
protocol has finished with can be joined.

L{Tunnel.start} takes both transports over from the protocols that opened
them (their events come to the tunnel's own protocol objects from then on),
relays bytes both ways with Twisted's producer/consumer flow control (each
transport is the streaming producer of the other, as in
L{balance.l4.relay}), passes half-closes on, closes both sides when either
goes away, and aborts both after C{idle_timeout} seconds without a byte.

A pair of plain TCP transports without a
L{FrameGuard<balance.http.websocket.FrameGuard>} is handed to
L{balance.l4.splice} instead (zero-copy, Linux), with the same half-close,
idle timeout and byte counts; C{Tunnel.splice = False} forces the copying
relay, which TLS transports and frame-aware tunnels always use.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol
from zope.interface import implementer

from balance import _io
from balance.l4 import splice
from balance.l4.relay import _shut_down_writes


class _State(enum.Enum):
    OPEN = "open"
    #: The client shut down its write half; so did we towards the backend.
    CLIENT_DONE = "client done"
    #: The backend shut down its write half; so did we towards the client.
    BACKEND_DONE = "backend done"
    #: Plain TCP both sides: the kernel moves the bytes (L{balance.l4.splice}).
    SPLICING = "splicing"
    CLOSING = "closing"
    CLOSED = "closed"


# The states in which each transport still has the other as its producer
# (see balance.l4.relay for why unregistering before closing matters).
_CLIENT_HAS_PRODUCER = frozenset({_State.OPEN, _State.CLIENT_DONE})
_BACKEND_HAS_PRODUCER = frozenset({_State.OPEN, _State.BACKEND_DONE})


def take_over(transport, old, new) -> None:
    """
    Make C{new} the protocol C{transport} reports its events to, in place
    of C{old}: a TCP transport calls its C{protocol} (possibly an
    endpoint's wrapper around C{old}), a TLS layer its C{wrappedProtocol}.
    """
    if getattr(transport, "wrappedProtocol", None) is old:
        transport.wrappedProtocol = new
        return
    current = getattr(transport, "protocol", None)
    if current is old or getattr(current, "_wrappedProtocol", None) is old:
        transport.protocol = new
        return
    raise ValueError(f"{transport!r} does not report to {old!r}")


@implementer(IProtocol, IHalfCloseableProtocol)
class _End:
    """The protocol of one side of a tunnel: hands every event to it."""

    __slots__ = ("transport", "_data", "_eof", "_lost")

    def __init__(self, transport, data, eof, lost):
        self.transport = transport
        self._data = data
        self._eof = eof
        self._lost = lost

    def makeConnection(self, transport) -> None:
        """Not called: the transport is connected already."""

    def connectionMade(self) -> None:
        """Not called: the transport is connected already."""

    def dataReceived(self, data: bytes) -> None:
        self._data(data)

    def readConnectionLost(self) -> None:
        self._eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        self._lost()


class Tunnel:
    """
    Bytes both ways between a client and a backend transport, until both
    are done.

    :param reactor: provides the time and the idle timer.
    :param client: the client's transport.
    :param backend: the backend's transport.
    :param idle_timeout: seconds without a byte either way before both
        sides are aborted; 0 or L{None} for none.
    :param done: called with the tunnel once both sides are closed.
    :param meter: an object whose C{bytes_in} and C{bytes_out} count the
        bytes from and to the client (a listener's metrics), or L{None}.
    :param guard: a L{balance.http.websocket.FrameGuard}, or L{None} for a
        plain byte tunnel.
    :ivar client_bytes: bytes received from the client.
    :ivar backend_bytes: bytes received from the backend.
    :ivar reason: why the tunnel ended other than by its peers closing
        (idle timeout, the guard), for the access log; empty otherwise.
    """

    __slots__ = (
        "_reactor",
        "_client",
        "_backend",
        "_idle",
        "_done",
        "_meter",
        "guard",
        "_state",
        "_last",
        "_timer",
        "_client_lost",
        "_backend_lost",
        "_to_client",
        "_to_backend",
        "client_bytes",
        "backend_bytes",
        "reason",
        "_splice",
    )

    #: Whether plain TCP tunnels without a guard go through splice(2).
    splice = True

    def __init__(
        self,
        reactor,
        client,
        backend,
        idle_timeout: float | None,
        done: Callable[[Tunnel], None],
        meter=None,
        guard=None,
    ):
        self._reactor = reactor
        self._client = client
        self._backend = backend
        self._idle = idle_timeout or 0.0
        self._done = done
        self._meter = meter
        self.guard = guard
        self._state = _State.OPEN
        self._last = 0.0
        self._timer = None
        self._client_lost = False
        self._backend_lost = False
        self._to_client = _io.send if _io.can_send_directly(client) else _write(client)
        self._to_backend = _io.send if _io.can_send_directly(backend) else _write(backend)
        self.client_bytes = 0
        self.backend_bytes = 0
        self.reason = ""
        self._splice = None

    def start(
        self, client_protocol, backend_protocol, to_backend: bytes = b"", to_client: bytes = b""
    ) -> None:
        """
        Take both transports over from the protocols that have them, and
        start relaying.

        :param to_backend: bytes the client sent that are already read
            (after an upgrade request), sent first.
        :param to_client: the same from the backend.
        """
        client, backend = self._client, self._backend
        take_over(
            client,
            client_protocol,
            _End(client, self._from_client, self._client_eof, self._client_gone),
        )
        take_over(
            backend,
            backend_protocol,
            _End(backend, self._from_backend, self._backend_eof, self._backend_gone),
        )
        if self.guard is None and self.splice and splice.can_splice(client, backend):
            # Zero-copy: the relay moves the bytes, keeps the idle timer and
            # closes both transports, whose connectionLost ends the tunnel.
            self._state = _State.SPLICING
            self._splice = splice.relay(
                client,
                backend,
                self._reactor,
                idle=self._idle,
                a_to_b=to_backend,
                b_to_a=to_client,
                on_done=self._spliced,
            )
            return
        self._last = self._reactor.seconds()
        if self._idle > 0:
            self._timer = self._reactor.callLater(self._idle, self._idle_check)
        # Flow control: a side that reads slowly stops reads on the other
        # side instead of filling this proxy's memory.
        client.registerProducer(backend, True)
        backend.registerProducer(client, True)
        if to_backend:
            self._from_client(to_backend)
        if to_client and self._state is _State.OPEN:
            self._from_backend(to_client)
        if self._state is _State.OPEN:
            client.resumeProducing()
            backend.resumeProducing()

    # -- relaying --------------------------------------------------------------------

    def _from_client(self, data: bytes) -> None:
        if self._state is _State.CLOSING or self._state is _State.CLOSED:
            return
        self._last = self._reactor.seconds()
        self.client_bytes += len(data)
        meter = self._meter
        if meter is not None:
            meter.bytes_in += len(data)
        guard = self.guard
        if guard is not None:
            data = guard.from_client(data)
            if guard.stopped:
                if data:
                    self._to_backend(self._backend, data)
                self._stop_guarded()
                return
            if not data:
                return
        self._to_backend(self._backend, data)

    def _from_backend(self, data: bytes) -> None:
        if self._state is _State.CLOSING or self._state is _State.CLOSED:
            return
        self._last = self._reactor.seconds()
        self.backend_bytes += len(data)
        guard = self.guard
        if guard is not None:
            data = guard.from_backend(data)
            if guard.stopped:
                if data:
                    self._send_client(data)
                self._stop_guarded()
                return
            if not data:
                return
        self._send_client(data)

    def _send_client(self, data: bytes) -> None:
        meter = self._meter
        if meter is not None:
            meter.bytes_out += len(data)
        self._to_client(self._client, data)

    def _stop_guarded(self) -> None:
        """The guard refused a message: say goodbye to both sides, then close."""
        self.reason = self.guard.reason
        to_client, to_backend = self.guard.farewell()
        if to_client:
            self._send_client(to_client)
        if to_backend:
            self._to_backend(self._backend, to_backend)
        self._close()

    # -- half-close and close ------------------------------------------------------------

    def _client_eof(self) -> None:
        state = self._state
        if state is _State.OPEN:
            self._state = _State.CLIENT_DONE
            backend = self._backend
            backend.unregisterProducer()
            _shut_down_writes(backend)
        elif state is _State.BACKEND_DONE:
            self._close()

    def _backend_eof(self) -> None:
        state = self._state
        if state is _State.OPEN:
            self._state = _State.BACKEND_DONE
            client = self._client
            client.unregisterProducer()
            _shut_down_writes(client)
        elif state is _State.CLIENT_DONE:
            self._close()

    def _client_gone(self) -> None:
        self._client_lost = True
        self._close()
        if self._backend_lost:
            self._finish()

    def _backend_gone(self) -> None:
        self._backend_lost = True
        self._close()
        if self._client_lost:
            self._finish()

    def _spliced(self, relay: splice.SpliceRelay, reason) -> None:
        """The splice relay ended and told both transports to close."""
        self._splice = None
        if self._state is _State.SPLICING:
            self._state = _State.CLOSING
        self.client_bytes += relay.a_to_b
        self.backend_bytes += relay.b_to_a
        meter = self._meter
        if meter is not None:
            meter.bytes_in += relay.a_to_b
            meter.bytes_out += relay.b_to_a
        if reason is not None and reason.check(TimeoutError) and not self.reason:
            self.reason = "tunnel idle timeout"

    def abort(self) -> None:
        """Drop both sides now, with whatever they still had buffered."""
        if self._splice is not None:
            self._splice.abort()
            return
        self._close(abort=True)

    def _idle_check(self) -> None:
        # Activity only records a timestamp; the timer is re-armed here, at
        # most once per idle period, instead of being reset for every read.
        remaining = self._last + self._idle - self._reactor.seconds()
        if remaining > 0:
            self._timer = self._reactor.callLater(remaining, self._idle_check)
            return
        self._timer = None
        if not self.reason:
            self.reason = "tunnel idle timeout"
        self._close(abort=True)

    def _close(self, abort: bool = False) -> None:
        """
        Close both sides: after what is buffered, unless C{abort}.  Safe to
        call again, and re-entrant (closing a half-closed transport reports
        its loss at once).
        """
        state = self._state
        if state is _State.CLOSED or (state is _State.CLOSING and not abort):
            return
        if self._splice is not None:
            if abort:
                self._splice.abort()
            else:
                self._splice.close()
            return
        self._state = _State.CLOSING
        client, backend = self._client, self._backend
        if state in _CLIENT_HAS_PRODUCER and not self._client_lost:
            client.unregisterProducer()
        if state in _BACKEND_HAS_PRODUCER and not self._backend_lost:
            backend.unregisterProducer()
        if abort:
            client.abortConnection()
            backend.abortConnection()
        else:
            client.loseConnection()
            backend.loseConnection()

    def _finish(self) -> None:
        if self._state is _State.CLOSED:
            return
        # The idle timer stays armed until here, so that a graceful close
        # stuck on a peer that never reads is aborted in the end.
        self._state = _State.CLOSED
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._done(self)


def _write(transport):
    """A sender for a transport L{_io.send} cannot bypass (TLS)."""

    def send(_, data: bytes) -> None:
        transport.write(data)

    return send
