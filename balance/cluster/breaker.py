# -*- test-case-name: tests.cluster.test_breaker -*-
"""
Circuit breakers, in two kinds.

L{CircuitBreakers} are Envoy's: per-cluster ceilings on open upstream
connections, requests waiting for a connection and requests in flight.  A
request that would pass a ceiling is refused at once (503) instead of
queueing behind an overloaded cluster.  Pure counters.

L{BackendBreaker} is the classic closed / open / half-open breaker of one
backend, tripped by consecutive failed tries: while open, the backend gets no
work; once the open period has passed it is half-open and exactly one
request goes to it as a probe; the probe's success closes the breaker, its
failure opens it again for twice as long (up to a ceiling).

Neither does I/O.  L{BackendBreaker} takes an L{IReactorTime} for the end of
its open period (a single C{callLater} per trip, never per request).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from balance.config import model


class Limit(enum.Enum):
    """The three ceilings of L{CircuitBreakers}, named as in the config."""

    CONNECTIONS = "max_connections"
    PENDING = "max_pending"
    REQUESTS = "max_requests"


class _Gauge:
    """One ceiling: how many are in use, and how many were turned away."""

    __slots__ = ("maximum", "count", "overflows")

    def __init__(self, maximum: int):
        self.maximum = maximum
        self.count = 0
        self.overflows = 0

    def acquire(self) -> bool:
        if self.count >= self.maximum:
            self.overflows += 1
            return False
        self.count += 1
        return True

    def release(self, what: str) -> None:
        if self.count <= 0:
            raise RuntimeError(f"release_{what} without a matching try_acquire_{what}")
        self.count -= 1


class CircuitBreakers:
    """
    The per-cluster ceilings of C{circuit_breaker:}.

    Each C{try_acquire_*} either takes one unit and returns L{True}, or
    returns L{False} (and counts an overflow) when the ceiling is reached;
    each successful acquire must be matched by exactly one C{release_*}.

    A ceiling is I{open} while it is reached: that is the value of the
    C{balance_circuit_breaker_open} gauge.

    - connections: upstream connections open or being opened (pooled idle
      ones included);
    - pending: requests waiting for a new upstream connection (no idle one
      was free).  C{max_pending: 0} means a request is never made to wait
      for a connection: only idle pooled connections serve it;
    - requests: requests in flight to the cluster, retries included.
    """

    __slots__ = ("_connections", "_pending", "_requests")

    def __init__(self, config: model.CircuitBreaker):
        """:param config: the cluster's validated C{circuit_breaker:}."""
        self._connections = _Gauge(config.max_connections)
        self._pending = _Gauge(config.max_pending)
        self._requests = _Gauge(config.max_requests)

    def _gauge(self, limit: Limit) -> _Gauge:
        if limit is Limit.CONNECTIONS:
            return self._connections
        if limit is Limit.PENDING:
            return self._pending
        return self._requests

    def try_acquire_connection(self) -> bool:
        """Take a connection slot before connecting to a backend."""
        return self._connections.acquire()

    def release_connection(self) -> None:
        """An upstream connection closed (or its attempt failed)."""
        self._connections.release("connection")

    def try_acquire_pending(self) -> bool:
        """Take a slot for a request about to wait for a new connection."""
        return self._pending.acquire()

    def release_pending(self) -> None:
        """The waiting request got its connection, or gave up."""
        self._pending.release("pending")

    def try_acquire_request(self) -> bool:
        """Take a request slot before the first try of a request."""
        # Once per request: _Gauge.acquire inlined.
        gauge = self._requests
        if gauge.count >= gauge.maximum:
            gauge.overflows += 1
            return False
        gauge.count += 1
        return True

    def release_request(self) -> None:
        """A request ended, however it ended."""
        gauge = self._requests
        if gauge.count <= 0:
            raise RuntimeError("release_request without a matching try_acquire_request")
        gauge.count -= 1

    def count(self, limit: Limit) -> int:
        """How many units of C{limit} are in use."""
        return self._gauge(limit).count

    def overflows(self, limit: Limit) -> int:
        """How many acquires of C{limit} were refused since creation."""
        return self._gauge(limit).overflows

    def is_open(self, limit: Limit) -> bool:
        """Whether C{limit} is reached, so the next acquire would fail."""
        gauge = self._gauge(limit)
        return gauge.count >= gauge.maximum

    @property
    def open(self) -> bool:
        """Whether any of the three ceilings is reached."""
        return any(self.is_open(limit) for limit in Limit)


class BreakerState(enum.Enum):
    """Where a L{BackendBreaker} is."""

    #: Work flows; consecutive failures are counted.
    CLOSED = "closed"
    #: The backend gets no work until the open period ends.
    OPEN = "open"
    #: One probe request may go through; its outcome decides.
    HALF_OPEN = "half-open"


class _Event(enum.Enum):
    TRIPPED = "failures reached the threshold"
    COOLED = "open period over"
    PROBE_SUCCEEDED = "probe succeeded"
    PROBE_FAILED = "probe failed"


_TRANSITIONS: dict[tuple[BreakerState, _Event], BreakerState] = {
    (BreakerState.CLOSED, _Event.TRIPPED): BreakerState.OPEN,
    (BreakerState.OPEN, _Event.COOLED): BreakerState.HALF_OPEN,
    (BreakerState.HALF_OPEN, _Event.PROBE_SUCCEEDED): BreakerState.CLOSED,
    (BreakerState.HALF_OPEN, _Event.PROBE_FAILED): BreakerState.OPEN,
}


class Permit(enum.IntEnum):
    """
    The answer of L{BackendBreaker.allow}.  L{DENIED} is falsy, so
    C{if not breaker.allow()} reads naturally; keep the value to hand it
    back to L{BackendBreaker.record} or L{BackendBreaker.release}.
    """

    DENIED = 0
    #: An ordinary request while the breaker is closed.
    GRANTED = 1
    #: The single probe request of a half-open breaker.
    PROBE = 2


class BackendBreaker:
    """
    The closed / open / half-open breaker of one backend.

    Transitions (and nothing else):

    ============ ========================================= ==========
    from         event                                     to
    ============ ========================================= ==========
    closed       C{threshold} consecutive failures          open
    open         C{open_duration} passed                    half-open
    half-open    the probe succeeded                        closed
    half-open    the probe failed                           open, for twice as long as last time
    ============ ========================================= ==========

    Results of requests let through before the breaker opened are ignored
    once it is open or half-open: only the probe decides.  The open period
    starts at C{open_duration} and doubles with each failed probe, up to
    C{max_open_duration}; closing resets it.

    :ivar state: the L{BreakerState}.
    :ivar failures: consecutive failures counted while closed.  Read-only
        outside; with a L{Permit.GRANTED} permit, C{record(True)} changes
        nothing while it is 0 (the HTTP path skips the call then).
    :ivar available: whether L{allow} would grant work right now: closed, or
        half-open with no probe in flight.  A plain attribute; its changes
        are reported to C{on_available}, so that C{Backend.eligible} can
        fold it in and pickers skip open backends (and a half-open one once
        its probe is out).
    """

    log = Logger()

    __slots__ = (
        "state",
        "available",
        "threshold",
        "open_duration",
        "max_open_duration",
        "_clock",
        "_on_change",
        "_on_available",
        "_name",
        "failures",
        "_reopens",
        "_probing",
        "_timer",
        "_opened_until",
    )

    def __init__(
        self,
        threshold: int,
        open_duration: float,
        clock: IReactorTime,
        max_open_duration: float = 60.0,
        on_change: Callable[[BackendBreaker, BreakerState], object] | None = None,
        name: str = "",
        on_available: Callable[[bool], object] | None = None,
    ):
        """
        :param threshold: consecutive failures that open the breaker, at
            least 1.
        :param open_duration: seconds the breaker stays open the first time.
        :param clock: what ends the open period.
        :param max_open_duration: the ceiling of the doubling open period.
        :param on_change: called as C{on_change(breaker, new_state)} after
            every transition, for metrics (C{balance_circuit_breaker_open}).
        :param name: who this breaker guards, for the log, e.g.
            C{"backend 127.0.0.1:9002 in cluster api"}.
        :param on_available: called with the new value of C{available}
            whenever it changes (a trip, the end of the open period, a probe
            taken or given back, the probe's verdict).
        """
        if threshold < 1:
            raise ValueError(f"breaker threshold must be at least 1, got {threshold}")
        if open_duration <= 0:
            raise ValueError(f"open_duration must be positive, got {open_duration}")
        self.state = BreakerState.CLOSED
        self.available = True
        self.threshold = threshold
        self.open_duration = open_duration
        self.max_open_duration = max(max_open_duration, open_duration)
        self._clock = clock
        self._on_change = on_change
        self._on_available = on_available
        self._name = name
        self.failures = 0
        self._reopens = 0
        self._probing = False
        self._timer: IDelayedCall | None = None
        self._opened_until = 0.0

    def __repr__(self) -> str:
        return f"<BackendBreaker {self._name or id(self)} {self.state.value}>"

    def allow(self) -> Permit:
        """
        Ask to send one request to the backend.

        :return: L{Permit.GRANTED} while closed; L{Permit.PROBE} for the
            first caller once half-open (which must then report with
            L{record} or L{release}); L{Permit.DENIED} otherwise.
        """
        state = self.state
        if state is BreakerState.CLOSED:
            return Permit.GRANTED
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            self._set_available(False)
            return Permit.PROBE
        return Permit.DENIED

    def record(self, ok: bool, permit: Permit = Permit.GRANTED) -> None:
        """
        Report how a request let through by L{allow} ended.

        :param ok: L{False} for a failed try (see
            L{balance.cluster.retry.Outcome.failed}).
        :param permit: what L{allow} returned for it.
        """
        state = self.state
        if state is BreakerState.CLOSED:
            if ok:
                self.failures = 0
                return
            self.failures += 1
            if self.failures >= self.threshold:
                self._open(_Event.TRIPPED)
            return
        if state is BreakerState.HALF_OPEN and permit is Permit.PROBE and self._probing:
            self._probing = False
            if ok:
                self._reopens = 0
                self.failures = 0
                self._set_available(True)
                self._transition(_Event.PROBE_SUCCEEDED)
            else:
                self._reopens += 1
                self._open(_Event.PROBE_FAILED)

    def release(self, permit: Permit) -> None:
        """
        A request let through by L{allow} ended without telling anything
        about the backend (the client went away first): if it was the
        probe, the next request may probe instead.
        """
        if permit is Permit.PROBE and self.state is BreakerState.HALF_OPEN and self._probing:
            self._probing = False
            self._set_available(True)

    def retry_after(self) -> float:
        """
        Seconds until the breaker lets a probe through; 0 when it would
        now.  For a C{Retry-After} header when every backend is open.
        """
        if self.state is BreakerState.OPEN:
            return max(0.0, self._opened_until - self._clock.seconds())
        return 0.0

    def stop(self) -> None:
        """Cancel the pending end of an open period (cluster teardown)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _set_available(self, value: bool) -> None:
        if value != self.available:
            self.available = value
            if self._on_available is not None:
                self._on_available(value)

    def _open(self, event: _Event) -> None:
        duration = min(self.open_duration * (2 ** min(self._reopens, 30)), self.max_open_duration)
        self._opened_until = self._clock.seconds() + duration
        self._set_available(False)
        self.stop()
        self._timer = self._clock.callLater(duration, self._cool)
        self._transition(event, duration)

    def _cool(self) -> None:
        self._timer = None
        self._probing = False
        self._set_available(True)
        self._transition(_Event.COOLED)

    def _transition(self, event: _Event, duration: float = 0.0) -> None:
        old = self.state
        new = _TRANSITIONS[old, event]
        self.state = new
        if new is BreakerState.OPEN:
            self.log.warn(
                "circuit breaker of {target} is OPEN for {duration:g}s: {event}",
                target=self._name,
                state=new.value,
                previous=old.value,
                event=event.value,
                duration=duration,
                failures=self.failures,
            )
        else:
            self.log.info(
                "circuit breaker of {target} is {state}: {event}",
                target=self._name,
                state=new.value,
                previous=old.value,
                event=event.value,
            )
        if self._on_change is not None:
            self._on_change(self, new)


__all__ = ["BackendBreaker", "BreakerState", "CircuitBreakers", "Limit", "Permit"]
