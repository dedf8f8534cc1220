"""
Helpers for the load-balancing tests: runtime backends without endpoints,
and a discrete-event simulation of a workload driving a policy the way a
cluster does.
"""

from __future__ import annotations

import heapq
from collections import Counter
from random import Random

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.task import Clock
from zope.interface import implementer

from balance.cluster.backend import Backend
from tests.helpers import backend_model


def backends(*weights: int, host: str = "10.0.0") -> list[Backend]:
    """
    Runtime backends ``10.0.0.1:80``, ``10.0.0.2:80``, ... with the given
    weights, and no endpoints.
    """
    return [Backend(backend_model(f"{host}.{i + 1}", 80, w)) for i, w in enumerate(weights)]


def shares(picks, among) -> list[float]:
    """The share of ``picks`` that went to each backend of ``among``."""
    counts = Counter(picks)
    total = len(picks)
    return [counts[b] / total for b in among]


def start(policy, backend) -> None:
    """Count work on ``backend`` as the cluster does."""
    backend.active += 1
    policy.started(backend)


def finish(policy, backend, latency=None) -> None:
    """End work on ``backend`` as the cluster does."""
    backend.active -= 1
    policy.finished(backend)
    if latency is not None:
        policy.observe(backend, latency)


class ClosedLoop:
    """
    ``clients`` clients, each sending a request as soon as its previous one
    is answered; a request takes an exponentially distributed time (mean
    ``mean``, or per backend from ``durations``).  Picks, starts and
    finishes go through the policy as a cluster would drive them.

    :ivar picks: Every backend picked, in order.
    :ivar peak: The largest ``active`` any backend reached.
    """

    def __init__(self, policy, backends, clients: int, seed: int = 7, mean: float = 1.0, keys=None):
        self.policy = policy
        self.backends = backends
        self.clients = clients
        self.random = Random(seed)
        self.mean = mean
        self.keys = keys
        self.now = 0.0
        self.picks: list[Backend] = []
        self.peak = 0
        self._events: list = []
        self._seq = 0

    def _send(self) -> None:
        key = None if self.keys is None else self.keys(self.random)
        backend = self.policy.pick(key)
        start(self.policy, backend)
        self.picks.append(backend)
        self.peak = max(self.peak, backend.active)
        self._seq += 1
        done = self.now + self.random.expovariate(1.0 / self.mean)
        heapq.heappush(self._events, (done, self._seq, backend))

    def run(self, requests: int) -> ClosedLoop:
        """Send ``requests`` requests in all; returns self."""
        for _ in range(self.clients):
            self._send()
        while len(self.picks) < requests:
            self.now, _, backend = heapq.heappop(self._events)
            finish(self.policy, backend)
            self._send()
        return self


class LatencySimulation:
    """
    Requests arriving every ``1 / rate`` seconds on a
    :class:`twisted.internet.task.Clock`, each answered after its backend's
    current latency (scaled by a random factor in [0.5, 1.5)), with the
    latency observed by the policy as a cluster would feed it.

    :ivar latency: Seconds per backend; change it to make one slow.
    :ivar log: ``(time, backend)`` of every pick.
    """

    def __init__(self, policy, backends, clock: Clock, rate: float = 200.0, seed: int = 3):
        self.policy = policy
        self.backends = backends
        self.clock = clock
        self.rate = rate
        self.random = Random(seed)
        self.latency = {b: 0.010 for b in backends}
        self.log: list[tuple[float, Backend]] = []

    def run_until(self, end: float) -> None:
        """Send requests until the clock reaches ``end``."""
        step = 1.0 / self.rate
        while self.clock.seconds() + step <= end:
            self.clock.advance(step)
            self._send()

    def _send(self) -> None:
        backend = self.policy.pick()
        start(self.policy, backend)
        self.log.append((self.clock.seconds(), backend))
        took = self.latency[backend] * (0.5 + self.random.random())
        self.clock.callLater(took, finish, self.policy, backend, took)

    def share(self, backend, begin: float, end: float) -> float:
        """The share of the picks in ``[begin, end)`` that went to ``backend``."""
        window = [b for t, b in self.log if begin <= t < end]
        return sum(1 for b in window if b is backend) / len(window)


def assert_near(test, actual: float, expected: float, tolerance: float, what: str = "") -> None:
    """Fail ``test`` unless ``actual`` is within ``tolerance`` of ``expected``."""
    if abs(actual - expected) > tolerance:
        test.fail(f"{what or 'value'}: {actual!r} is not within {tolerance} of {expected!r}")


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str):
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class FakeResolver:
    """
    An ``IHostnameResolver`` answering from ``answers``: a name maps to a
    list of IP strings (answered at once), an exception (lookup fails), or
    ``None`` (no answer until :meth:`complete`).

    :ivar lookups: Every name looked up, in order.
    """

    def __init__(self, answers=None):
        self.answers = dict(answers or {})
        self.lookups: list[str] = []
        self.waiting: dict[str, object] = {}

    def resolveHostName(
        self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"
    ):
        self.lookups.append(hostName)
        answer = self.answers.get(hostName, [])
        if isinstance(answer, Exception):
            raise answer
        receiver.resolutionBegan(_Resolution(hostName))
        if answer is None:
            self.waiting[hostName] = receiver
            return receiver
        self._answer(receiver, answer)
        return receiver

    def complete(self, name: str, addresses) -> None:
        """Answer a lookup left waiting."""
        self._answer(self.waiting.pop(name), addresses)

    @staticmethod
    def _answer(receiver, addresses) -> None:
        for ip in addresses:
            kind = IPv6Address if ":" in ip else IPv4Address
            receiver.addressResolved(kind("TCP", ip, 0))
        receiver.resolutionComplete()
