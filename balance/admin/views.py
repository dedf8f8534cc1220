# -*- test-case-name: tests.admin.test_views -*-
"""
The JSON documents of the admin API, built from the live objects.

Pure functions from runtime state to plain data (dicts, lists, strings,
numbers): no I/O, no twisted.web, so the field names, which are a contract
with scripts and the dashboard (README, "Admin API"), are tested on their
own.
"""

from __future__ import annotations

import math
import re

import attrs

__all__ = [
    "REDACTED",
    "backend_view",
    "cluster_view",
    "clusters_view",
    "config_view",
    "redact_url",
    "stats_view",
]

#: What a secret value is replaced with in ``GET /config``.
REDACTED = "<redacted>"

# Keys whose values are secrets wherever they appear (config fields, header
# names in header edits).  Keys ending in _file or _path name a file, which
# is not a secret; the file's contents are never read into the config.
_SECRET_KEY = re.compile(r"token|passw(or)?d|secret|api[-_]?key|authorization|credential", re.I)
_PATH_KEY = re.compile(r"[-_](file|path)$", re.I)
# scheme://userinfo@rest: the userinfo (redis://:password@host) is secret.
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#@]*@")
# Model fields holding (name, value) pairs, shown as JSON objects.
_PAIR_FIELDS = frozenset({"headers", "set"})


def _is_secret_key(key) -> bool:
    return isinstance(key, str) and bool(_SECRET_KEY.search(key)) and not _PATH_KEY.search(key)


def redact_url(value: str) -> str:
    """
    Hide the userinfo of a URL (``redis://user:password@host:6379/0``
    becomes ``redis://<redacted>@host:6379/0``); other strings are returned
    as they are.

    :param value: Any string.
    """
    return _USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", value)


def _plain(value, key=None):
    """
    ``value`` (a config model or part of one) as JSON-ready data, with
    secrets redacted.

    :param key: The field or mapping key ``value`` was found under.
    """
    if value is None:
        return None
    if _is_secret_key(key):
        return REDACTED
    if attrs.has(type(value)):
        return {f.name: _plain(getattr(value, f.name), f.name) for f in attrs.fields(type(value))}
    if isinstance(value, tuple | list):
        if key in _PAIR_FIELDS:
            return {str(k): _plain(v, k) for k, v in value}
        return [_plain(v) for v in value]
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        # JSON has no infinities; none are expected in a validated config.
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return redact_url(value)
    return str(value)


def config_view(config) -> dict:
    """
    The effective config as JSON-ready data: every field of the model
    (durations in seconds, sizes in bytes, ``null`` for absent optional
    sections), with secrets redacted.

    Redacted are the values of keys named like a token, password, secret,
    API key, authorization or credential (config fields and header names in
    header edits alike), and the userinfo of URLs (``redis://:pw@host``).
    Paths to files (``token_file``, ``key``, ``client_key``) stay: the
    files' contents are never read into the config.

    :param config: A ``balance.config.model.Config``.
    """
    return _plain(config)


def _state(backend) -> str:
    # One word for the dashboard and for scripts; the booleans carry the
    # rest.  An operator's drain wins over what checks say.
    if backend.drained:
        return "drained"
    if backend.ejected:
        return "ejected"
    if not backend.healthy:
        return "unhealthy"
    if getattr(backend, "circuit_open", False):
        return "circuit_open"
    return "up"


def backend_view(backend) -> dict:
    """
    One runtime backend as JSON-ready data.

    :param backend: A ``balance.cluster.backend.Backend``.
    :return: ``address`` (``host:port`` as configured, the name the drain
        and enable requests take), ``name`` (unique within the cluster:
        the address, plus `` (ip)`` for addresses a host name resolved to),
        ``host``, ``port``, ``ip`` (``null`` while a name is unresolved),
        ``weight``, ``active_connections`` (connections or requests in
        flight), ``healthy``, ``ejected``, ``drained``, ``circuit_open``
        (its circuit breaker lets no work through), ``panic`` (its cluster
        is below ``panic_threshold`` and balances over every backend),
        ``eligible`` (may get new work), ``health`` (``"healthy"`` or
        ``"unhealthy"``) and ``state``: ``"drained"``, ``"ejected"``,
        ``"unhealthy"``, ``"circuit_open"`` or ``"up"``, the first that
        applies.
    """
    return {
        "address": backend.address,
        "name": backend.name,
        "host": backend.host,
        "port": backend.port,
        "ip": backend.ip,
        "weight": backend.weight,
        "active_connections": backend.active,
        "healthy": backend.healthy,
        "ejected": backend.ejected,
        "drained": backend.drained,
        "circuit_open": bool(getattr(backend, "circuit_open", False)),
        "panic": bool(getattr(backend, "panic", False)),
        "eligible": backend.eligible,
        "health": "healthy" if backend.healthy else "unhealthy",
        "state": _state(backend),
    }


def cluster_view(cluster) -> dict:
    """
    One runtime cluster as JSON-ready data.

    :param cluster: A ``balance.cluster.cluster.Cluster``.
    :return: ``name``, ``lb`` (the policy), ``panic`` (below
        ``panic_threshold``: balancing over every backend), ``backends_total``,
        ``backends_eligible``, ``backends_healthy``, ``active_connections``
        (summed over backends) and ``backends``, a list of
        :func:`backend_view` in config order.
    """
    backends = cluster.backends
    return {
        "name": cluster.name,
        "lb": cluster.model.lb,
        "panic": any(getattr(b, "panic", False) for b in backends),
        "backends_total": len(backends),
        "backends_eligible": sum(1 for b in backends if b.eligible),
        "backends_healthy": sum(1 for b in backends if b.healthy),
        "active_connections": sum(b.active for b in backends),
        "backends": [backend_view(b) for b in backends],
    }


def clusters_view(clusters) -> dict:
    """
    ``GET /clusters``: ``{"clusters": [cluster_view, ...]}``, in the order
    of ``clusters`` (config order).

    :param clusters: The runtime clusters by name.
    """
    return {"clusters": [cluster_view(c) for c in clusters.values()]}


def _listener_entry(listen=None, protocol=None) -> dict:
    return {
        "listen": listen,
        "protocol": protocol,
        "connections_total": 0,
        "active_connections": 0,
        "bytes_received": 0,
        "bytes_sent": 0,
        "requests": {},
    }


def stats_view(config, clusters, metrics, ready: bool, draining: bool) -> dict:
    """
    ``GET /stats``: the counters of listeners and clusters, from the metrics
    and the live objects.

    :param config: The config in effect (for listeners' addresses).
    :param clusters: The runtime clusters by name.
    :param metrics: The ``balance.observe.metrics.Metrics``, or ``None``
        (then every counter is 0).
    :param ready: The target's ``ready``.
    :param draining: The target's ``draining``.
    :return: ``ready``, ``draining``, ``config_reloads`` (``{result:
        count}``), ``listeners`` (by name: ``listen``, ``protocol``,
        ``connections_total``, ``active_connections``, ``bytes_received``,
        ``bytes_sent``, ``requests`` as ``{status: count}``) and
        ``clusters`` (by name: ``lb``, ``backends_total``,
        ``backends_eligible``, ``active_connections`` and ``backends`` by
        address, each with ``state``, ``active_connections``, ``responses``
        as ``{status: count}`` and ``connect_failures``).  Listeners and
        backends no longer configured still show while their counters
        exist (counters survive reloads).
    """
    counted = metrics.stats() if metrics is not None else {"listeners": {}, "clusters": {}}
    listeners: dict[str, dict] = {}
    for li in config.listeners:
        listeners[li.name] = _listener_entry(li.listen, li.protocol)
    for name, counters in counted["listeners"].items():
        listeners.setdefault(name, _listener_entry()).update(counters)

    out_clusters: dict[str, dict] = {}
    for cluster in clusters.values():
        backends: dict[str, dict] = {}
        for b in cluster.backends:
            # The addresses of one host name share its counters: one entry.
            entry = backends.get(b.address)
            if entry is None:
                backends[b.address] = {
                    "state": _state(b),
                    "active_connections": b.active,
                    "responses": {},
                    "connect_failures": 0,
                }
            else:
                entry["active_connections"] += b.active
                if b.eligible:
                    entry["state"] = "up"
        out_clusters[cluster.name] = {
            "lb": cluster.model.lb,
            "backends_total": len(cluster.backends),
            "backends_eligible": sum(1 for b in cluster.backends if b.eligible),
            "active_connections": sum(b.active for b in cluster.backends),
            "backends": backends,
        }
    for name, by_backend in counted["clusters"].items():
        entry = out_clusters.setdefault(
            name,
            {
                "lb": None,
                "backends_total": 0,
                "backends_eligible": 0,
                "active_connections": 0,
                "backends": {},
            },
        )
        for address, counters in by_backend.items():
            backend = entry["backends"].setdefault(
                address, {"state": None, "active_connections": 0}
            )
            backend.update(counters)

    return {
        "ready": ready,
        "draining": draining,
        "config_reloads": dict(metrics.config_reloads) if metrics is not None else {},
        "listeners": listeners,
        "clusters": out_clusters,
    }
