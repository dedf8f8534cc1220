"""
Micro-benchmark of the load-balancing policies: the cost of one ``pick()``
(and of one ``update()``, which rebuilds rings and tables), for each policy
at 10 and 1000 backends.

Backends have mixed weights (1, 2, 3, repeating), so weighted round robin
takes its general path (equal weights take a constant-time cursor), and
random in-flight counts (0 to 20), as under load.  Hash policies get a
different key (an IPv4 address as bytes) at each pick.  The cost of the
benchmark loop itself (a call to a no-op with the same argument) is
subtracted.

Run: ``python bench/lb_pick.py`` (``--quick`` for a fast, rougher pass).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import timeit
from pathlib import Path
from random import Random

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from balance.cluster import lb
from balance.cluster.backend import Backend
from balance.cluster.lb.hashing import key_hash
from balance.config import model

SIZES = (10, 1000)
KEYS = [b"10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255, i & 255) for i in range(4096)]


class _Clock:
    """The clock peak EWMA reads: the real monotonic time."""

    seconds = staticmethod(time.monotonic)


def _backends(count: int, rng: Random) -> list[Backend]:
    backends = []
    for i in range(count):
        host = f"10.1.{i // 250}.{i % 250 + 1}"
        backend = Backend(model.Backend(address=f"{host}:80", host=host, port=80, weight=1 + i % 3))
        backend.active = rng.randrange(21)
        backends.append(backend)
    return backends


def _per_call(function, keys, budget: float) -> float:
    """Seconds per call of ``function(key)``, the best of 5 runs."""

    def run():
        for key in keys:
            function(key)

    # Size the run to about budget / 5 seconds.
    once = timeit.timeit(run, number=1)
    number = max(1, int(budget / 5 / max(once, 1e-9)))
    return min(timeit.repeat(run, number=number, repeat=5)) / (number * len(keys))


def measure(name: str, count: int, budget: float) -> tuple[float, float]:
    """
    ``(ns per pick, ms per update)`` of policy ``name`` over ``count``
    backends.
    """
    rng = Random(1)
    backends = _backends(count, rng)
    options = lb.Options(rng=Random(2), clock=_Clock())
    policy = lb.make(name, backends, options)
    for backend in backends:
        # As the cluster reports them: in-flight work and latencies.
        for _ in range(backend.active):
            policy.started(backend)
        policy.observe(backend, 0.001 + rng.random() / 100)
    hashing = name in lb.HASH_POLICIES
    keys = KEYS if hashing else [None] * len(KEYS)
    pick = policy.pick
    baseline = _per_call(lambda key: None, keys, budget / 4)
    per_pick = _per_call(pick, keys, budget) - baseline
    started = time.perf_counter()
    policy.update(backends)
    update = time.perf_counter() - started
    return per_pick * 1e9, update * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, rougher numbers")
    args = parser.parse_args(argv)
    budget = 0.2 if args.quick else 1.0
    print(f"Python {platform.python_version()} on {platform.machine()}, one core\n")
    header = "| policy | " + " | ".join(f"pick, {n} backends" for n in SIZES)
    header += " | " + " | ".join(f"update, {n}" for n in SIZES) + " |"
    print(header)
    print("|" + " --- |" * (1 + 2 * len(SIZES)))
    for name in lb.POLICIES:
        results = [measure(name, n, budget) for n in SIZES]
        picks = " | ".join(f"{ns:,.0f} ns" for ns, _ in results)
        updates = " | ".join(f"{ms:,.2f} ms" for _, ms in results)
        print(f"| `{name}` | {picks} | {updates} |")
    key_cost = _per_call(key_hash, KEYS, budget) - _per_call(lambda key: None, KEYS, budget / 4)
    print(f"\nkey hash (CRC-32 of an IPv4 address): {key_cost * 1e9:,.0f} ns")


if __name__ == "__main__":
    main()
