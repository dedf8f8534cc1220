# -*- test-case-name: tests.cluster.test_resolve -*-
"""
Resolving backend host names, without blocking the reactor, and again
every so often.

A backend configured as ``name:port`` becomes one runtime backend per
address the name resolves to.  :class:`Resolver` resolves a cluster's
names through an ``IHostnameResolver`` (``reactor.nameResolver`` in
production: ``getaddrinfo`` in a thread; a fake in tests) when started and
every ``interval`` seconds after, and reports each change of a name's
address set.  A failed lookup (an error, no address, or no answer within
``timeout``) changes nothing: the last good set stays in use, and the
lookup is tried again at the next round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IResolutionReceiver
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

#: Seconds between two resolutions of the same name.
DEFAULT_INTERVAL = 30.0
#: Seconds a lookup may take before it counts as failed.
DEFAULT_TIMEOUT = 10.0


@implementer(IResolutionReceiver)
class _Receiver:
    """Collects the addresses of one lookup into a Deferred."""

    def __init__(self, name: str):
        self.name = name
        self.addresses: list[str] = []
        self.done = Deferred()

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        if self.done.called:
            # It came after the timeout gave up on it.
            return
        if self.addresses:
            self.done.callback(tuple(sorted(set(self.addresses))))
        else:
            self.done.errback(error.DNSLookupError(f"{self.name} has no address"))


def resolve(name_resolver, clock, name: str, timeout: float = DEFAULT_TIMEOUT) -> Deferred:
    """
    Look ``name`` up once.

    :param name_resolver: An ``IHostnameResolver``.
    :param clock: An ``IReactorTime``, for the timeout.
    :param name: The host name.
    :param timeout: Seconds to wait for the answer.
    :return: A Deferred firing with the sorted, distinct IP addresses (as
        strings, IPv4 and IPv6), or failing with ``DNSLookupError`` when
        there are none, ``TimeoutError`` when the answer did not come in
        time, or whatever the resolver raised.
    """
    receiver = _Receiver(name)
    try:
        name_resolver.resolveHostName(receiver, name, 0)
    except Exception:
        return defer.fail()
    return receiver.done.addTimeout(timeout, clock)


class Resolver:
    """
    Keeps the addresses of a set of host names up to date.

    :ivar addresses: The last good address set of each name resolved at
        least once: ``{name: (ip, ...)}``.
    :ivar interval: Seconds between rounds.
    """

    log = Logger()

    def __init__(
        self,
        name_resolver,
        clock,
        names: Iterable[str],
        on_change: Callable[[str, tuple[str, ...]], object],
        interval: float = DEFAULT_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        cluster: str = "",
    ):
        """
        :param name_resolver: An ``IHostnameResolver``.
        :param clock: An ``IReactorTime``: the rounds' timer and lookups'
            timeouts.
        :param names: The host names to resolve.
        :param on_change: Called with a name and its new address set each
            time a lookup gives a set different from the last good one
            (including the first time).
        :param interval: Seconds between rounds, more than 0.
        :param timeout: Seconds a lookup may take.
        :param cluster: The cluster's name, for log lines.
        """
        if not interval > 0:
            raise ValueError(f"resolve interval must be more than 0, got {interval!r}")
        self._name_resolver = name_resolver
        self._clock = clock
        self._names = tuple(dict.fromkeys(names))
        self._on_change = on_change
        self.interval = interval
        self._timeout = timeout
        self._cluster = cluster
        self.addresses: dict[str, tuple[str, ...]] = {}
        self._pending: dict[str, Deferred] = {}
        self._failing: set[str] = set()
        self._call = None
        self._running = False

    @property
    def running(self) -> bool:
        """Whether rounds are scheduled."""
        return self._running

    def start(self) -> Deferred:
        """
        Resolve every name now, and again every ``interval`` seconds until
        :meth:`stop`.

        :return: A Deferred that fires with ``None`` once the first round
            is over, whatever its outcome; it never fails.
        """
        self._running = True
        return self._round()

    def stop(self) -> None:
        """
        Stop: no further rounds, and lookups in flight are abandoned
        (their answers are ignored).
        """
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.cancel()

    def refresh(self) -> Deferred:
        """
        Resolve every name not already being resolved, now.

        :return: A Deferred that fires with ``None`` when those lookups are
            over; it never fails.
        """
        rounds = [self._lookup(name) for name in self._names if name not in self._pending]
        return defer.gatherResults(rounds).addCallback(lambda _: None)

    def _round(self) -> Deferred:
        if self._running:
            self._call = self._clock.callLater(self.interval, self._round)
        return self.refresh()

    def _lookup(self, name: str) -> Deferred:
        d = resolve(self._name_resolver, self._clock, name, self._timeout)
        self._pending[name] = d
        d.addCallbacks(self._resolved, self._failed, callbackArgs=(name,), errbackArgs=(name,))
        return d

    def _resolved(self, addresses: tuple[str, ...], name: str) -> None:
        if self._pending.pop(name, None) is None:
            return
        if name in self._failing:
            self._failing.discard(name)
            self.log.info(
                "backend host {host} of cluster {cluster} resolves again",
                host=name,
                cluster=self._cluster,
            )
        if self.addresses.get(name) == addresses:
            return
        self.log.info(
            "backend host {host} of cluster {cluster} resolves to {addresses}",
            host=name,
            cluster=self._cluster,
            addresses=", ".join(addresses),
        )
        self.addresses[name] = addresses
        try:
            self._on_change(name, addresses)
        except Exception:
            self.log.failure(
                "applying the addresses of {host} in cluster {cluster} failed",
                host=name,
                cluster=self._cluster,
            )

    def _failed(self, reason: Failure, name: str) -> None:
        if self._pending.pop(name, None) is None:
            # Stopped: the lookup was abandoned on purpose.
            return
        if name in self._failing:
            return
        self._failing.add(name)
        kept = self.addresses.get(name)
        self.log.warn(
            "resolving backend host {host} of cluster {cluster} failed ({reason}); {outcome}",
            host=name,
            cluster=self._cluster,
            reason=_describe(reason),
            outcome=(
                f"keeping {', '.join(kept)}"
                if kept
                else "connections resolve it themselves until it does"
            ),
        )


def _describe(reason: Failure) -> str:
    if reason.check(defer.TimeoutError, error.TimeoutError):
        return "timed out"
    if reason.check(error.DNSLookupError):
        return "no address"
    return reason.getErrorMessage()
