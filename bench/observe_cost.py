#!/usr/bin/env python3
"""
What observing a request costs Balance's HTTP/1.1 path, in CPU, without
sockets: the in-memory proxy of L{balance.testing} (parser, router, pool,
head rewriting, metrics; a fake client and backend) serves keep-alive
requests with the access log off, in JSON, in combined format, and with
tracing on (propagation only, and every request sampled and queued for
export). Variants run interleaved, round after round, and the report shows
medians, so that a busy machine disturbs them alike.

    PYTHONPATH=. python3 bench/observe_cost.py [--requests 20000] [--rounds 7]

The figures are CPU microseconds per request of this process, which also
runs the fake client and backend, so they overstate the relative cost of a
feature against a real deployment (where system calls add ~20 us per
request); bench/http1.py's balance-observed peer measures the same over
real sockets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

# The checkout, not bench/ (whose h2.py would shadow the h2 library).
sys.path.remove(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from balance.observe.accesslog import AccessLog
from balance.observe.tracing import Tracer
from balance.testing import InMemoryProxy

CONFIG = """
listeners:
  - name: web
    listen: "tcp:8080"
    routes:
      - match: {path_prefix: /}
        cluster: app
clusters:
  - {name: app, backends: ["10.0.0.1:80"]}
"""
REQUEST = b"GET /items?id=7 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: bench/1\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
TRACED = REQUEST.replace(
    b"\r\n\r\n", b"\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n"
)


class _Queue:
    """An exporter that only queues (the export itself runs off the request path)."""

    def __init__(self):
        self.spans = []

    def add(self, record):
        self.spans.append(record)
        if len(self.spans) > 2048:
            self.spans.clear()


def one(variant: str, requests: int, workdir: str) -> float:
    """CPU microseconds per request of C{variant}."""
    proxy = InMemoryProxy(CONFIG)
    log = None
    request = REQUEST
    if variant in ("json", "combined"):
        log = AccessLog(os.path.join(workdir, variant + ".log"), variant, proxy.clock)
        proxy.context.access_log = log
    elif variant == "tracing-propagate":
        proxy.context.tracer = Tracer(0.0)
    elif variant == "tracing-sampled":
        proxy.context.tracer = Tracer(0.0, _Queue())
        request = TRACED
    proxy.clock.advance(1000)
    client = proxy.client()
    backend = proxy.backend("10.0.0.1:80")
    # Warm up: the pooled connection, caches.
    for _ in range(200):
        client.send(request)
        proxy.run()
        backend.connections[0].respond(RESPONSE)
        proxy.run()
    start = time.process_time()
    for _ in range(requests):
        client.send(request)
        proxy.run()
        backend.connections[0].respond(RESPONSE)
        proxy.run()
    elapsed = time.process_time() - start
    if log is not None:
        log.close()
    return elapsed / requests * 1e6


VARIANTS = ("off", "json", "combined", "tracing-propagate", "tracing-sampled")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    results: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="balance-observe-") as workdir:
        for _ in range(a.rounds):
            for variant in VARIANTS:
                results[variant].append(one(variant, a.requests, workdir))
    base = statistics.median(results["off"])
    print(f"in-memory HTTP/1.1 path, {a.requests} requests x {a.rounds} rounds, medians")
    print("| variant | CPU us/request | added | range |")
    print("| --- | --- | --- | --- |")
    for variant in VARIANTS:
        m = statistics.median(results[variant])
        print(
            f"| {variant} | {m:.1f} | {m - base:+.1f} us ({(m / base - 1) * 100:+.0f}%) "
            f"| {min(results[variant]):.1f}-{max(results[variant]):.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
