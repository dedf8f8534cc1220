# -*- test-case-name: tests.cluster.test_outlier -*-
"""
Passive outlier detection (C{outlier_detection:}): a backend whose tries
fail C{consecutive_failures} times in a row is ejected, taken out of load
balancing, for a while, without waiting for an active health check.

As in Envoy:

 - the ejection lasts C{base_ejection} times the number of times the
   backend was ejected, up to a ceiling (L{MAX_EJECTION}, 300 s, or
   C{base_ejection} itself if that is longer).  The count decays by one for
   every C{base_ejection} the backend then spends back in service without
   being ejected, so an old incident does not lengthen a new ejection
   forever;
 - at most C{max_ejected_percent} of the cluster's backends are ejected at
   once, but one backend may always be ejected (so a two-backend cluster
   with 10% still sheds a dead one).  C{0%} disables ejection;
 - ejection and return are logged once each.

The detector writes C{backend.ejected} (L{True} / L{False}), which
C{Backend.eligible} folds in, and ends ejections with one C{callLater} on
the injected clock per ejection.  L{record} is on the hot path: a dict
lookup and a counter, no allocation.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from balance.cluster.retry import Outcome
from balance.config import model

#: The default ceiling of an ejection, in seconds (Envoy's
#: C{max_ejection_time}).
MAX_EJECTION = 300.0


class _Host:
    """What the detector knows of one backend."""

    __slots__ = ("failures", "ejections", "ejected_until", "returned_at", "timer")

    def __init__(self):
        self.failures = 0
        self.ejections = 0
        self.ejected_until = 0.0
        self.returned_at: float | None = None
        self.timer: IDelayedCall | None = None


class OutlierDetector:
    """
    Eject the backends of one cluster that fail consecutively.

    :ivar ejected: how many backends are ejected now.
    :ivar refused: ejections not done because C{max_ejected_percent} of the
        cluster was already ejected, since creation.
    """

    log = Logger()

    def __init__(
        self,
        config: model.OutlierDetection,
        clock: IReactorTime,
        backends=(),
        cluster_name: str = "",
        max_ejection: float = MAX_EJECTION,
        on_change: Callable[[object, bool, str], object] | None = None,
    ):
        """
        :param config: the cluster's validated C{outlier_detection:}.
        :param clock: what ends ejections.
        :param backends: the cluster's runtime backends; each must have a
            writable C{ejected} attribute and a C{name} for the log.
        :param cluster_name: for the log.
        :param max_ejection: the ceiling of one ejection, in seconds
            (raised to C{base_ejection} if shorter).
        :param on_change: called as C{on_change(backend, ejected, reason)}
            after each ejection and return, for metrics and the admin API.
        """
        self.consecutive_failures = config.consecutive_failures
        self.base_ejection = config.base_ejection
        self.max_ejected_percent = config.max_ejected_percent
        self.max_ejection = max(max_ejection, config.base_ejection)
        self.cluster_name = cluster_name
        self.ejected = 0
        self.refused = 0
        self._clock = clock
        self._on_change = on_change
        self._hosts: dict[object, _Host] = {}
        self.update(backends)

    def update(self, backends) -> None:
        """
        Replace the backends watched.  Backends kept (the same objects)
        keep their counts and ejections; removed ones are returned to
        service first (their timers cancelled, no log).
        """
        backends = tuple(backends)
        keep = set(backends)
        for backend, host in list(self._hosts.items()):
            if backend not in keep:
                self._forget(backend, host)
        for backend in backends:
            if backend not in self._hosts:
                self._hosts[backend] = _Host()

    def record(self, backend, outcome: Outcome) -> bool:
        """
        Note how one try to C{backend} ended.

        Tries that end while the backend is ejected (they started before)
        are ignored.  Unknown backends (removed by a reload meanwhile) are
        ignored.

        :return: L{True} if this outcome ejected the backend.
        """
        host = self._hosts.get(backend)
        if host is None or host.timer is not None:
            return False
        if outcome is Outcome.SUCCESS:
            host.failures = 0
            return False
        host.failures += 1
        if host.failures < self.consecutive_failures:
            return False
        if not self._room_to_eject():
            self.refused += 1
            return False
        self._eject(backend, host, outcome)
        return True

    def is_ejected(self, backend) -> bool:
        """Whether C{backend} is ejected now."""
        host = self._hosts.get(backend)
        return host is not None and host.timer is not None

    def ejection_count(self, backend) -> int:
        """The ejection multiplier C{backend} has reached (before decay)."""
        host = self._hosts.get(backend)
        return 0 if host is None else host.ejections

    def next_return(self) -> float | None:
        """
        Seconds until the first ejected backend returns, or L{None} when
        none is ejected.  For C{Retry-After} when no backend is left.
        """
        ends = [h.ejected_until for h in self._hosts.values() if h.timer is not None]
        if not ends:
            return None
        return max(0.0, min(ends) - self._clock.seconds())

    def stop(self) -> None:
        """
        Return every backend to service and cancel the timers (cluster
        teardown or reload that drops C{outlier_detection}).
        """
        for backend, host in list(self._hosts.items()):
            self._forget(backend, host)

    def _room_to_eject(self) -> bool:
        if self.max_ejected_percent <= 0:
            return False
        if self.ejected == 0:
            # One may always go, whatever the percentage (Envoy).
            return True
        total = len(self._hosts)
        return (self.ejected + 1) * 100 <= self.max_ejected_percent * total

    def _eject(self, backend, host: _Host, outcome: Outcome) -> None:
        now = self._clock.seconds()
        if host.ejections and host.returned_at is not None:
            # One step of decay per base_ejection spent back in service.
            good = int((now - host.returned_at) // self.base_ejection)
            host.ejections = max(0, host.ejections - good)
        host.ejections += 1
        duration = min(self.base_ejection * host.ejections, self.max_ejection)
        failures = host.failures
        host.failures = 0
        host.ejected_until = now + duration
        host.timer = self._clock.callLater(duration, self._return, backend, host)
        self.ejected += 1
        backend.ejected = True
        plural = "failure" if failures == 1 else "failures"
        reason = f"{failures} consecutive {plural} (last: {outcome.value})"
        self.log.warn(
            "backend {backend} in cluster {cluster} is EJECTED for {duration:g}s: {reason}",
            backend=backend.name,
            cluster=self.cluster_name,
            duration=duration,
            reason=reason,
            ejections=host.ejections,
            failures=failures,
            outcome=outcome.value,
        )
        if self._on_change is not None:
            self._on_change(backend, True, reason)

    def _return(self, backend, host: _Host) -> None:
        host.timer = None
        host.failures = 0
        host.returned_at = self._clock.seconds()
        self.ejected -= 1
        backend.ejected = False
        self.log.info(
            "backend {backend} in cluster {cluster} is back from ejection",
            backend=backend.name,
            cluster=self.cluster_name,
            ejections=host.ejections,
        )
        if self._on_change is not None:
            self._on_change(backend, False, "ejection ended")

    def _forget(self, backend, host: _Host) -> None:
        del self._hosts[backend]
        if host.timer is not None:
            if host.timer.active():
                host.timer.cancel()
            host.timer = None
            self.ejected -= 1
            backend.ejected = False


__all__ = ["MAX_EJECTION", "OutlierDetector"]
