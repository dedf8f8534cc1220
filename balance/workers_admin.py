# -*- test-case-name: tests.test_workers -*-
"""
How the workers' parent answers the admin API for the group: asking each
worker's private admin socket (HTTP over a UNIX socket), and merging the
answers.  The merging functions are pure.

  - C{/metrics}: every worker's samples, each with a C{worker="N"} label,
    grouped by family (so Prometheus and C{promtool} see one family with
    one series per worker; C{sum without (worker) (...)} gives the
    process-group total);
  - C{/stats}: counters summed over the workers;
  - C{/clusters}: the first worker's view of the backends (every worker
    runs its own health checks, so their views agree within a check
    interval), with C{active_connections} summed over the workers.
"""

from __future__ import annotations

import json

from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

JSON = b"application/json; charset=utf-8"


@implementer(IAgentEndpointFactory)
class _UnixEndpoints:
    def __init__(self, reactor, path: str):
        self._reactor = reactor
        self._path = path

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(self._reactor, self._path, timeout=5)


class _QuietFactory(_HTTP11ClientFactory):
    # No "Starting factory" log lines for every scrape.
    noisy = False


def ask(reactor, path: str, method: bytes, target: bytes, index: int):
    """
    One request to a worker's admin API on the UNIX socket C{path}.

    :return: a Deferred firing with C{(index, status, body)}.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    pool._factory = _QuietFactory
    agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(reactor, path), pool=pool)
    d = agent.request(method, b"http://worker" + target)
    d.addCallback(
        lambda response: readBody(response).addCallback(lambda body: (index, response.code, body))
    )
    d.addTimeout(10, reactor)
    return d


def _with_worker(line: str, label: str) -> str:
    """A sample line with the C{worker} label first."""
    brace, space = line.find("{"), line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        if line[brace + 1 : brace + 2] == "}":
            return line[:brace] + "{" + label + line[brace + 1 :]
        return line[: brace + 1] + label + "," + line[brace + 1 :]
    return line[:space] + "{" + label + "}" + line[space:]


def merge_metrics(answers) -> bytes:
    """
    The Prometheus text of several workers as one exposition.

    :param answers: C{[(worker index, exposition bytes)]}.
    """
    order: list[str] = []
    families: dict[str, tuple[list[str], list[str]]] = {}

    def family(name: str):
        entry = families.get(name)
        if entry is None:
            entry = families[name] = ([], [])
            order.append(name)
        return entry

    for index, body in answers:
        label = f'worker="{index}"'
        current = None
        for line in body.decode("utf-8").splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    current = family(parts[2])
                    if line not in current[0]:
                        current[0].append(line)
                continue
            if current is None:
                name = line.split("{", 1)[0].split(" ", 1)[0]
                current = family(name)
            current[1].append(_with_worker(line, label))
    out = []
    for name in order:
        meta, samples = families[name]
        out.extend(meta)
        out.extend(samples)
    return ("\n".join(out) + "\n").encode("utf-8")


# Counts of configured things, the same in every worker: not summed.
_SAME_IN_EVERY_WORKER = frozenset({"backends_total", "backends_eligible", "backends_healthy"})


def _sum(a, b):
    if isinstance(a, dict) and isinstance(b, dict):
        merged = dict(a)
        for key, value in b.items():
            if key not in a:
                merged[key] = value
            elif key not in _SAME_IN_EVERY_WORKER:
                merged[key] = _sum(a[key], value)
        return merged
    if isinstance(a, bool) or isinstance(b, bool):
        return a
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a + b
    return a


def sum_stats(answers, group) -> dict:
    """
    C{/stats} of every worker, numbers summed; C{ready} and C{draining}
    the group's, and C{workers}: C{[{"index", "pid", "ready"}]}.
    """
    merged: dict = {}
    for _index, code, body in answers:
        if code == 200:
            merged = _sum(merged, json.loads(body)) if merged else json.loads(body)
    merged["ready"] = group.ready
    merged["draining"] = group.draining
    merged["workers"] = [{"index": w.index, "pid": w.pid, "ready": w.ready} for w in group.workers]
    return merged


def clusters_answer(answers) -> dict:
    """C{/clusters} of the first worker, with active connections summed over all."""
    documents = [json.loads(body) for _i, code, body in answers if code == 200]
    if not documents:
        return {"clusters": []}
    first, others = documents[0], documents[1:]
    for other in others:
        theirs = {c["name"]: c for c in other.get("clusters", ())}
        for cluster in first.get("clusters", ()):
            mate = theirs.get(cluster["name"])
            if mate is None:
                continue
            cluster["active_connections"] += mate.get("active_connections", 0)
            backends = {b["name"]: b for b in mate.get("backends", ())}
            for backend in cluster.get("backends", ()):
                b = backends.get(backend["name"])
                if b is not None:
                    backend["active_connections"] += b.get("active_connections", 0)
    return first


def json_answer(document, code: int = 200):
    """C{(status, content type, body)} of a JSON answer."""
    return code, JSON, json.dumps(document, indent=2).encode("utf-8") + b"\n"


def first_answer(answers):
    """
    The answer of the first worker to a change sent to every worker (drain,
    enable); 503 when no worker is ready.
    """
    if not answers:
        return json_answer({"error": "no worker is ready"}, 503)
    _index, code, body = answers[0]
    return code, JSON, body
