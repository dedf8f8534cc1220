# -*- test-case-name: tests.ratelimit.test_resp -*-
"""
A minimal Redis client on Twisted: the RESP2 wire protocol and a
connection that reconnects with backoff.

Only what the shared rate-limit store needs: commands are written as soon
as they are issued (so several in one reactor turn go out in one write:
pipelining), and replies complete a FIFO of Deferreds.  A watchdog per
connection turns a server that stops answering into a lost connection, so
callers learn about it within a bounded time and a fresh connection is
tried.
"""

from __future__ import annotations

import enum
import inspect
import random
from collections import deque
from collections.abc import Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

# Replies here are a few dozen bytes; anything near this is a broken peer.
_MAX_BUFFER = 16 * 1024 * 1024

_INCOMPLETE = -1


class RedisError(Exception):
    """An error reply from the server, such as C{NOSCRIPT ...}."""

    @property
    def code(self) -> str:
        """The error's first word (C{"NOSCRIPT"}, C{"ERR"}, C{"WRONGTYPE"}, ...)."""
        return str(self).split(" ", 1)[0]


class RedisProtocolError(Exception):
    """The server sent bytes that are not RESP2."""


class RedisTimeout(Exception):
    """The server did not answer a command in time."""


def encode(args) -> bytes:
    """
    A command as a RESP2 array of bulk strings.

    :param args: the command and its arguments: C{bytes}, C{str} (UTF-8) or
        numbers.
    """
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if type(arg) is not bytes:
            arg = arg.encode("utf-8") if isinstance(arg, str) else str(arg).encode("ascii")
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def parse(buf: bytes, pos: int):
    """
    Parse one RESP2 reply from C{buf} at C{pos}.

    :return: C{(value, next_pos)}, with C{next_pos == -1} when C{buf} does not
        hold a whole reply yet.  Simple strings and bulk strings are bytes,
        integers ints, arrays lists, nulls L{None}, error replies
        L{RedisError} instances (not raised).
    :raise RedisProtocolError: for bytes that are not RESP2.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None, _INCOMPLETE
    kind = buf[pos]
    line = buf[pos + 1 : end]
    try:
        if kind == 0x3A:  # ":"
            return int(line), end + 2
        if kind == 0x24:  # "$"
            size = int(line)
            if size < 0:
                return None, end + 2
            stop = end + 2 + size
            if len(buf) < stop + 2:
                return None, _INCOMPLETE
            if buf[stop : stop + 2] != b"\r\n":
                raise RedisProtocolError("bulk string not followed by CRLF")
            return buf[end + 2 : stop], stop + 2
        if kind == 0x2B:  # "+"
            return line, end + 2
        if kind == 0x2D:  # "-"
            return RedisError(line.decode("utf-8", "replace")), end + 2
        if kind == 0x2A:  # "*"
            count = int(line)
            if count < 0:
                return None, end + 2
            items = []
            pos = end + 2
            for _ in range(count):
                item, pos = parse(buf, pos)
                if pos < 0:
                    return None, _INCOMPLETE
                items.append(item)
            return items, pos
    except ValueError:
        raise RedisProtocolError(f"bad length or integer {line[:20]!r}") from None
    raise RedisProtocolError(f"unknown reply type {bytes([kind])!r}")


class RedisProtocol(Protocol):
    """
    One connection to a Redis server speaking RESP2.

    :param clock: the L{twisted.internet.interfaces.IReactorTime} for the
        watchdog.
    :param timeout: seconds the oldest unanswered command may wait before
        the connection is aborted (its commands then fail with
        L{RedisTimeout}); L{None} for no watchdog.
    :ivar on_lost: called with the L{Failure} when the connection is lost,
        after every pending command has failed; or L{None}.
    """

    def __init__(self, clock, timeout: float | None = None):
        self._clock = clock
        self._timeout = timeout
        self._pending: deque = deque()
        self._buffer = b""
        self._watchdog = None
        self._timed_out = False
        self.connected = False
        self.on_lost: Callable[[Failure], object] | None = None

    def connectionMade(self):
        self.connected = True

    def execute(self, *args) -> Deferred:
        """
        Send a command.

        :param args: the command and its arguments, as in L{encode}.
        :return: a Deferred that fires with the reply, fails with
            L{RedisError} for an error reply, with L{RedisTimeout} when the
            watchdog gave up, or with L{ConnectionLost}.
        """
        return self.send(encode(args))

    def send(self, command: bytes) -> Deferred:
        """
        Send one command already encoded as RESP2 (a hot path can keep the
        constant part of its command encoded); otherwise as L{execute}.
        """
        if not self.connected:
            return fail(ConnectionLost("not connected to Redis"))
        d = Deferred()
        self._pending.append((d, self._clock.seconds()))
        if self._watchdog is None and self._timeout is not None:
            self._watchdog = self._clock.callLater(self._timeout, self._check)
        self.transport.write(command)
        return d

    def dataReceived(self, data: bytes):
        buf = self._buffer + data if self._buffer else data
        pos = 0
        pending = self._pending
        try:
            while pos < len(buf):
                reply, end = parse(buf, pos)
                if end < 0:
                    break
                pos = end
                if not pending:
                    raise RedisProtocolError("reply without a command")
                d, _ = pending.popleft()
                # A caller may have given up (cancelled) already.
                if not d.called:
                    if type(reply) is RedisError:
                        d.errback(reply)
                    else:
                        d.callback(reply)
        except RedisProtocolError as e:
            self._buffer = b""
            self._abort(Failure(e))
            return
        self._buffer = buf[pos:]
        if len(self._buffer) > _MAX_BUFFER:
            self._abort(Failure(RedisProtocolError("reply larger than 16 MiB")))

    def _check(self) -> None:
        """The watchdog: abort if the oldest command waits too long."""
        self._watchdog = None
        if not self._pending or not self.connected:
            return
        waited = self._clock.seconds() - self._pending[0][1]
        if waited >= self._timeout:
            self._timed_out = True
            self._abort(Failure(RedisTimeout("no reply within %d ms" % (self._timeout * 1000,))))
            return
        self._watchdog = self._clock.callLater(self._timeout - waited, self._check)

    def _abort(self, reason: Failure) -> None:
        # Unusable from now on, although connectionLost comes a reactor
        # turn later.
        self.connected = False
        self._fail_pending(reason)
        self.transport.abortConnection()

    def _fail_pending(self, reason: Failure) -> None:
        pending, self._pending = self._pending, deque()
        for d, _ in pending:
            if not d.called:
                d.errback(reason)

    def connectionLost(self, reason):
        self.connected = False
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        self._fail_pending(Failure(ConnectionLost(reason.getErrorMessage())))
        if self.on_lost is not None:
            self.on_lost(reason)


class _State(enum.Enum):
    STOPPED = "stopped"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    WAITING = "waiting"


def backoff(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """
    Seconds to wait before reconnect attempt C{attempt} (1, 2, ...):
    exponential from C{initial} up to C{maximum}, with jitter of up to half
    the delay so that a fleet of proxies does not reconnect in lockstep.
    """
    delay = min(maximum, initial * 2 ** min(attempt - 1, 30))
    return delay * (0.5 + rng.random() / 2)


class RedisClient:
    """
    Keeps one ready connection to a Redis server, reconnecting with backoff
    while it cannot.

    States: C{STOPPED -> CONNECTING -> CONNECTED}; a failed attempt or a
    lost connection goes to C{WAITING}, then back to C{CONNECTING} after
    the backoff delay; L{stop} goes to C{STOPPED} from any state.

    :param endpoint: an L{twisted.internet.interfaces.IStreamClientEndpoint}
        to the server.
    :param clock: an L{twisted.internet.interfaces.IReactorTime}.
    :param prepare: called with each new L{RedisProtocol}; may return a
        Deferred (AUTH, SELECT, SCRIPT LOAD...).  The connection counts as
        up only once it succeeds.
    :param on_up: called with no argument when a connection is ready.
    :param on_down: called with a L{Failure} when an attempt fails or a
        ready connection is lost.
    :param timeout: the watchdog of each connection, see L{RedisProtocol}.
    :param connect_timeout: seconds an attempt (connect and C{prepare}) may
        take.
    :param rng: randomness for the backoff jitter.
    :ivar protocol: the ready L{RedisProtocol}, or L{None}.
    """

    _log = Logger()

    def __init__(
        self,
        endpoint,
        clock,
        prepare: Callable | None = None,
        on_up: Callable[[], object] | None = None,
        on_down: Callable[[Failure], object] | None = None,
        timeout: float | None = None,
        connect_timeout: float = 1.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        rng: random.Random | None = None,
    ):
        self._endpoint = endpoint
        self._clock = clock
        self._prepare = prepare
        self._on_up = on_up
        self._on_down = on_down
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._rng = rng if rng is not None else random.Random()
        self._state = _State.STOPPED
        self._attempt = None
        self._attempt_protocol = None
        self._retry = None
        self._failures = 0
        self.protocol: RedisProtocol | None = None
        self._factory = Factory.forProtocol(lambda: RedisProtocol(self._clock, self._timeout))
        self._factory.noisy = False

    @property
    def state(self) -> str:
        """The state's name: stopped, connecting, connected or waiting."""
        return self._state.value

    def start(self) -> None:
        """Connect, and keep reconnecting until L{stop}."""
        if self._state is _State.STOPPED:
            self._connect()

    def stop(self) -> Deferred:
        """
        Stop reconnecting and close the connection.

        :return: a Deferred firing once the connection is closed.
        """
        state, self._state = self._state, _State.STOPPED
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if state is _State.CONNECTING and self._attempt is not None:
            self._attempt.cancel()
        proto, self.protocol = self.protocol, None
        if proto is None or not proto.connected:
            return succeed(None)
        closed = Deferred()
        proto.on_lost = lambda reason: closed.callback(None)
        proto.transport.loseConnection()
        return closed

    def _connect(self) -> None:
        self._state = _State.CONNECTING
        self._attempt_protocol = None
        d = self._attempt = self._endpoint.connect(self._factory)
        d.addCallback(self._connected)
        d.addTimeout(self._connect_timeout, self._clock)
        d.addCallbacks(self._ready, self._attempt_failed)
        d.addErrback(lambda f: self._log.failure("Redis connection bookkeeping failed", f))

    def _connected(self, proto: RedisProtocol):
        self._attempt_protocol = proto
        proto.on_lost = lambda reason: self._lost(proto, reason)
        if self._prepare is None:
            return proto
        d = Deferred.fromCoroutine(_maybe(self._prepare, proto))
        return d.addCallback(lambda _: proto)

    def _ready(self, proto: RedisProtocol) -> None:
        self._attempt = self._attempt_protocol = None
        if self._state is not _State.CONNECTING:
            proto.transport.loseConnection()
            return
        if not proto.connected:
            self._wait(Failure(ConnectionLost("connection lost while preparing it")))
            return
        self._state = _State.CONNECTED
        self._failures = 0
        self.protocol = proto
        if self._on_up is not None:
            self._on_up()

    def _attempt_failed(self, failure: Failure) -> None:
        self._attempt = None
        proto, self._attempt_protocol = self._attempt_protocol, None
        if proto is not None and proto.connected:
            # Connected but never became ready (AUTH refused, the preparing
            # commands timed out): this connection is useless.
            proto.transport.abortConnection()
        if self._state is _State.CONNECTING:
            self._wait(failure)

    def _lost(self, proto: RedisProtocol, reason: Failure) -> None:
        if proto is not self.protocol:
            # Lost while it was being prepared: the attempt fails instead.
            return
        self.protocol = None
        self._wait(reason)

    def _wait(self, reason: Failure) -> None:
        self._state = _State.WAITING
        self._failures += 1
        delay = backoff(self._failures, self._backoff_initial, self._backoff_max, self._rng)
        self._retry = self._clock.callLater(delay, self._connect)
        if self._on_down is not None:
            self._on_down(reason)


async def _maybe(fn, *args):
    """Call C{fn}, waiting for the result if it is a Deferred or a coroutine."""
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result
