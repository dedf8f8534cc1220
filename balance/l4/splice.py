# -*- test-case-name: tests.l4.test_splice,tests.l4.test_integration -*-
"""
Zero-copy relaying of a plain TCP tunnel with C{splice(2)}.

A byte tunnel between two connected TCP transports (an L4 proxied
connection, a WebSocket or CONNECT tunnel after its handshake, SNI
passthrough) needs no Python code per byte: on Linux the kernel can move
them from one socket to the other through a pipe, without copying them into
user space.  DESIGN.md measured twice the throughput per CPU second of
Twisted's producer/consumer relay with this.

Interface::

    from balance.l4 import splice

    if splice.can_splice(a, b):
        tunnel = splice.relay(a, b, reactor, idle=60.0, a_to_b=early_bytes)
        tunnel.done.addBoth(...)   # both sides closed; see below

C{relay(a, b, reactor, idle=0.0, a_to_b=b"", b_to_a=b"", on_done=None)} takes both
sockets away from their Twisted transports (which must be
L{twisted.internet.tcp.Server} or L{twisted.internet.tcp.Client}, connected,
with no producer registered) and returns a L{SpliceRelay}:

  - bytes already queued in a transport's write buffer are sent first, then
    C{a_to_b} (bytes the caller read from C{a} and still owes C{b}, e.g. a
    sniffed ClientHello) and C{b_to_a}, then everything the kernel moves;
  - backpressure: a direction holds at most one pipe's worth (64 KiB by
    default); while its destination is full, its source is not read;
  - half-close: an EOF read on one side is passed on as C{shutdown(SHUT_WR)}
    on the other once the pipe is empty; bytes keep flowing the other way;
  - when both directions have finished, both transports are closed
    (C{loseConnection}); an error or a reset on either side, the idle timeout
    (no byte either way for C{idle} seconds; 0 means none) or L{abort} abort
    both (C{abortConnection}, a reset); L{close} closes both gracefully now;
  - the transports' protocols get their usual C{connectionLost} in every
    case, so callers keep their own bookkeeping there;
  - C{done} fires with L{None} on a clean finish, or fails with the reason
    (L{twisted.internet.error.TimeoutError} for the idle timeout) after both
    sides were told to close; C{on_done(relay, reason_or_None)}, if given,
    is called at that moment too (cheaper than a Deferred per tunnel, which
    is only made when C{done} is read);
  - C{last_activity} is the reactor time of the last byte moved, for callers
    that keep their own idle timer (and pass C{idle=0});
  - C{a_to_b} and C{b_to_a} count the bytes delivered each way (including
    the initial bytes), for metrics.

L{can_splice} says whether the fast path applies: Linux with C{os.splice}
(Python 3.10+), both transports plain TCP (TLS transports cannot be
spliced: their bytes must pass through OpenSSL), and L{ENABLED} true.
Callers fall back to a producer/consumer relay otherwise
(L{balance.l4.relay} does).  Set C{ENABLED = False} (or the environment
variable C{BALANCE_SPLICE=0} at start) to force the fallback, for tests and
for comparing the two.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from balance import _io

#: Whether L{can_splice} may say yes.  Tests and benchmarks switch it off to
#: measure the producer/consumer relay.
ENABLED = (
    sys.platform.startswith("linux")
    and hasattr(os, "splice")
    and os.environ.get("BALANCE_SPLICE", "1") != "0"
)

#: Pipe capacity asked for (the kernel's default; its largest unprivileged
#: size is /proc/sys/fs/pipe-max-size).  Larger pipes cut syscalls per byte
#: but pin more kernel memory per busy tunnel.
PIPE_SIZE = 1 << 16

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_TCP = _io._DIRECT


def can_splice(a, b) -> bool:
    """
    Whether L{relay} can tunnel between transports C{a} and C{b}: splice is
    available and enabled, and both are connected plain TCP transports.
    """
    return (
        ENABLED
        and type(a) in _TCP
        and type(b) in _TCP
        and a.connected
        and b.connected
        and not (a.disconnecting or b.disconnecting)
    )


def _take_over(transport) -> bytes:
    """
    Stop C{transport}'s own reading and writing, and return (removing them)
    the bytes still queued in its write buffer.
    """
    transport.stopReading()
    transport.stopWriting()
    # Reset only what is not already empty: a new key in the transport's
    # instance dict (these are class attributes until first written) can
    # grow the dict by hundreds of bytes, on every idle tunnel.
    queued = b""
    if transport.dataBuffer:
        queued = bytes(transport.dataBuffer[transport.offset :])
        transport.dataBuffer = b""
        transport.offset = 0
    if transport._tempDataBuffer:
        queued += b"".join(transport._tempDataBuffer)
        transport._tempDataBuffer = []
        transport._tempDataLen = 0
    return queued


class _End:
    """
    One socket of the tunnel, and the direction that reads from it: the
    reactor's C{IReadDescriptor} (readable means bytes for C{peer}) and
    C{IWriteDescriptor} (writable means room for the bytes C{peer} read).
    The bytes read go through a pipe (made on first use, so that idle
    tunnels hold none) into C{peer}'s socket.

    One object per socket, rather than one per socket and one per
    direction: an idle tunnel is mostly these.
    """

    __slots__ = (
        "relay",
        "transport",
        "peer",
        "reading",
        "writing",
        "head",
        "pipe_r",
        "pipe_w",
        "chunk",
        "in_pipe",
        "eof",
        "finished",
    )

    def __init__(self, relay: SpliceRelay, transport, head: bytes):
        self.relay = relay
        self.transport = transport
        self.peer: _End | None = None
        self.reading = False
        self.writing = False
        #: Bytes to send to C{peer} before the pipe's.
        self.head = head
        self.pipe_r = -1
        self.pipe_w = -1
        self.chunk = 0
        #: Bytes in the pipe, not yet spliced into C{peer}.
        self.in_pipe = 0
        #: This socket sent its EOF.
        self.eof = False
        #: The EOF was passed on (C{peer} shut down for writing).
        self.finished = False

    def fileno(self) -> int:
        return self.transport.fileno()

    def logPrefix(self) -> str:
        return "SpliceRelay"

    def doRead(self) -> None:
        relay = self.relay
        if relay is not None:
            relay._read(self)

    def doWrite(self) -> None:
        relay = self.relay
        if relay is not None:
            relay._flush(self.peer)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor saw a hang-up or an error on this socket, or is
        # shutting down (and reports every socket, this tunnel's other one
        # included after the first has ended it).
        relay = self.relay
        if relay is not None:
            relay._fail(reason)

    def open_pipe(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pipe_r, self.pipe_w = r, w
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            # Over the user's pipe quota: the kernel's (smaller) default.
            pass
        self.chunk = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)

    def close_pipe(self) -> None:
        if self.pipe_r >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1


class SpliceRelay:
    """
    A running zero-copy tunnel between two TCP transports; see the module
    docstring, and make one with L{relay}.

    @ivar a_to_b: Bytes delivered from C{a} to C{b}.
    @ivar b_to_a: Bytes delivered from C{b} to C{a}.
    @ivar last_activity: Reactor time of the last read.
    """

    __slots__ = (
        "_done",
        "_on_done",
        "_result",
        "a_to_b",
        "b_to_a",
        "_a",
        "_b",
        "_reactor",
        "_idle",
        "_idle_call",
        "last_activity",
        "_closed",
    )

    def __init__(
        self,
        a,
        b,
        reactor,
        idle: float = 0.0,
        a_to_b: bytes = b"",
        b_to_a: bytes = b"",
        on_done=None,
    ):
        self._done: Deferred | None = None
        self._on_done = on_done
        self._result = self
        self.a_to_b = 0
        self.b_to_a = 0
        self._reactor = reactor
        self._closed = False
        head_b = _take_over(b) + a_to_b
        head_a = _take_over(a) + b_to_a
        end_a, end_b = self._a, self._b = _End(self, a, head_b), _End(self, b, head_a)
        end_a.peer, end_b.peer = end_b, end_a
        self._idle = idle
        self._idle_call = None
        self.last_activity = reactor.seconds()
        if idle > 0:
            self._idle_call = reactor.callLater(idle, self._idle_check)
        for d in (end_a, end_b):
            if d.head:
                self._flush(d)
            else:
                self._start_reading(d)

    @property
    def done(self) -> Deferred:
        """
        Fires with L{None} once both directions finished cleanly, or fails
        with the reason the tunnel was aborted.
        """
        if self._done is None:
            self._done = Deferred()
            if self._result is not self:
                self._fire(self._done, self._result)
        return self._done

    @staticmethod
    def _fire(d: Deferred, result: Failure | None) -> None:
        if result is None:
            d.callback(None)
        else:
            d.errback(result)

    # Registration with the reactor.

    def _start_reading(self, end: _End) -> None:
        if not end.reading:
            end.reading = True
            self._reactor.addReader(end)

    def _stop_reading(self, end: _End) -> None:
        if end.reading:
            end.reading = False
            self._reactor.removeReader(end)

    def _start_writing(self, end: _End) -> None:
        if not end.writing:
            end.writing = True
            self._reactor.addWriter(end)

    def _stop_writing(self, end: _End) -> None:
        if end.writing:
            end.writing = False
            self._reactor.removeWriter(end)

    # Moving bytes.

    def _read(self, d: _End) -> None:
        if self._closed:
            return
        if d.pipe_r < 0:
            d.open_pipe()
        try:
            n = os.splice(d.transport.socket.fileno(), d.pipe_w, d.chunk, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(Failure(error.ConnectionLost(os.strerror(e.errno))))
            return
        self.last_activity = self._reactor.seconds()
        if n == 0:
            d.eof = True
            self._stop_reading(d)
        else:
            d.in_pipe = n
        self._flush(d)

    def _flush(self, d: _End) -> None:
        """
        Send what C{d} read and holds (its head, then its pipe) into its
        peer; wait for the peer to drain when it is full, read C{d} again
        when everything went.
        """
        if self._closed:
            return
        dst = d.peer
        try:
            if d.head:
                sent = dst.transport.socket.send(d.head)
                self._count(d, sent)
                d.head = d.head[sent:]
            if not d.head:
                while d.in_pipe:
                    n = os.splice(d.pipe_r, dst.fileno(), d.in_pipe, flags=_SPLICE_FLAGS)
                    d.in_pipe -= n
                    self._count(d, n)
        except BlockingIOError:
            pass
        except OSError as e:
            self._fail(Failure(error.ConnectionLost(os.strerror(e.errno))))
            return
        if d.head or d.in_pipe:
            # The destination is full: stop reading the source until it drains.
            self._stop_reading(d)
            self._start_writing(dst)
            return
        self._stop_writing(dst)
        if not d.eof:
            self._start_reading(d)
        elif not d.finished:
            d.finished = True
            d.close_pipe()
            try:
                dst.transport.socket.shutdown(socket.SHUT_WR)
            except OSError as e:
                if e.errno != errno.ENOTCONN:
                    self._fail(Failure(error.ConnectionLost(os.strerror(e.errno))))
                    return
            if self._a.finished and self._b.finished:
                self._end(None)

    def _count(self, d: _End, n: int) -> None:
        if d is self._a:
            self.a_to_b += n
        else:
            self.b_to_a += n

    # Ending.

    def _idle_check(self) -> None:
        remaining = self.last_activity + self._idle - self._reactor.seconds()
        if remaining > 0:
            self._idle_call = self._reactor.callLater(remaining, self._idle_check)
        else:
            self._idle_call = None
            self._end(Failure(error.TimeoutError("tunnel idle")))

    def _fail(self, reason: Failure) -> None:
        self._end(reason)

    def abort(self) -> None:
        """Drop both sides now (a reset), with whatever was in flight."""
        self._end(Failure(error.ConnectionAborted()))

    def close(self) -> None:
        """
        Close both sides now, gracefully (a FIN), dropping bytes still in
        the pipes; for draining a listener.
        """
        self._end(None)

    def _end(self, reason: Failure | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._idle_call is not None:
            if self._idle_call.active():
                self._idle_call.cancel()
            self._idle_call = None
        for end in (self._a, self._b):
            self._stop_reading(end)
            self._stop_writing(end)
        for end in (self._a, self._b):
            end.close_pipe()
            # Break the cycles now rather than in the garbage collector.
            end.relay = end.peer = None
            if reason is None:
                end.transport.loseConnection()
            else:
                end.transport.abortConnection()
        self._result = reason
        if self._on_done is not None:
            on_done, self._on_done = self._on_done, None
            on_done(self, reason)
        if self._done is not None:
            self._fire(self._done, reason)


def relay(
    a,
    b,
    reactor,
    idle: float = 0.0,
    a_to_b: bytes = b"",
    b_to_a: bytes = b"",
    on_done=None,
) -> SpliceRelay:
    """
    Tunnel bytes between TCP transports C{a} and C{b} with C{splice(2)}
    until both sides finish; see the module docstring.  Check
    L{can_splice} first.

    @param reactor: The reactor the transports run on (C{IReactorFDSet}
        and C{IReactorTime}).
    @param idle: Abort both sides after this many seconds without a byte
        either way; 0 for no timeout.
    @param a_to_b: Bytes to send to C{b} first (already read from C{a}).
    @param b_to_a: Bytes to send to C{a} first (already read from C{b}).
    @param on_done: Called as C{on_done(relay, reason)} when the tunnel
        ends, C{reason} being L{None} for a clean finish or a L{Failure}.
    """
    return SpliceRelay(a, b, reactor, idle, a_to_b, b_to_a, on_done)
