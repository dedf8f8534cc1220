"""
Configuration reload (SIGHUP, C{POST /reload}): validate the file again, say
what would change, and swap the running objects for new requests without
refusing or dropping a connection.

What a reload does, listener by listener:
  - same name, address, protocol and TLS-ness: the socket stays open; new
    requests (also on open keep-alive connections) use the new routes,
    clusters and limits, while requests in flight finish on the old ones;
  - new: it binds; removed (or moved to another address): it stops
    accepting and drains like on stop.
Clusters whose settings did not change are kept as they are, with their
health state and pooled connections; changed ones are rebuilt, and their
backends that still exist keep their health, drain and ejection state.
Certificates are re-read.  C{admin}, C{workers}, C{whoami} and
C{rate_limit_store} take effect at the next restart only (the answer says
so).  In a worker process (C{workers} above 1) the parent holds the
sockets: listeners that would bind, close or move wait for a restart too,
and the answer lists C{listeners} under C{restart_needed}.
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import defer
from twisted.logger import Logger

from balance.config import model
from balance.config.validate import ConfigError, load_config


def _by_name(items) -> dict:
    return {item.name: item for item in items}


def diff(old: model.Config, new: model.Config) -> dict:
    """
    What changes from C{old} to C{new}: for listeners, clusters and
    backends, the names added, removed and changed; for the parts that need
    a restart, which of them changed.
    """
    changes: dict = {}
    for section in ("listeners", "clusters"):
        before, after = _by_name(getattr(old, section)), _by_name(getattr(new, section))
        changes[section] = {
            "added": sorted(after.keys() - before.keys()),
            "removed": sorted(before.keys() - after.keys()),
            "changed": sorted(n for n in before.keys() & after.keys() if before[n] != after[n]),
        }
    routes = {}
    old_listeners = _by_name(old.listeners)
    for listener in new.listeners:
        previous = old_listeners.get(listener.name)
        if previous is not None and previous.routes != listener.routes:
            routes[listener.name] = {
                "before": len(previous.routes),
                "after": len(listener.routes),
            }
    changes["routes"] = routes
    backends = {}
    old_clusters = _by_name(old.clusters)
    for cluster in new.clusters:
        previous = old_clusters.get(cluster.name)
        if previous is None:
            continue
        before = {b.address: b for b in previous.backends}
        after = {b.address: b for b in cluster.backends}
        entry = {
            "added": sorted(after.keys() - before.keys()),
            "removed": sorted(before.keys() - after.keys()),
            "changed": sorted(a for a in before.keys() & after.keys() if before[a] != after[a]),
        }
        if any(entry.values()):
            backends[cluster.name] = entry
    changes["backends"] = backends
    changes["restart_needed"] = sorted(
        key
        for key in ("admin", "workers", "whoami", "rate_limit_store", "tracing")
        if getattr(old, key) != getattr(new, key)
    )
    return changes


def _namespace(value):
    """JSON data as attribute objects that compare by value, as the model does."""
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_namespace(v) for v in value)
    return value


def diff_views(old: dict, new: dict) -> dict:
    """
    L{diff} of two configs given as C{GET /config} JSON (see
    L{balance.admin.views.config_view}): what a reload from C{old} to
    C{new} would change.  Secrets are redacted on both sides alike.
    """
    return diff(_namespace(old), _namespace(new))


def describe_changes(changes: dict) -> list[str]:
    """
    L{diff}'s answer as lines for people: one per kind of change, or
    C{"no changes"}.
    """
    lines = []
    for section in ("listeners", "clusters"):
        for what in ("added", "removed", "changed"):
            names = changes[section][what]
            if names:
                lines.append(f"{section} {what}: {', '.join(names)}")
    for name, count in sorted(changes["routes"].items()):
        lines.append(f"routes of listener {name} changed: {count['before']} -> {count['after']}")
    for name, entry in sorted(changes["backends"].items()):
        for what in ("added", "removed", "changed"):
            if entry[what]:
                lines.append(f"backends of cluster {name} {what}: {', '.join(entry[what])}")
    if changes["restart_needed"]:
        lines.append(
            "needs a restart (not applied by a reload): " + ", ".join(changes["restart_needed"])
        )
    return lines or ["no changes"]


def socket_changes(old, new) -> list[str]:
    """
    The listeners that a reload from C{old} to C{new} would bind, close or
    move to another socket (added, removed, or another address, protocol,
    TLS-ness or PROXY-ness), sorted by name.
    """
    before, after = _by_name(old.listeners), _by_name(new.listeners)
    return sorted(
        name
        for name in before.keys() | after.keys()
        if name not in before or name not in after or not _same_socket(before[name], after[name])
    )


def _same_socket(old: model.Listener, new: model.Listener) -> bool:
    return (
        old.listen == new.listen
        and old.protocol == new.protocol
        and old.proxy_protocol == new.proxy_protocol
        and (old.tls is None) == (new.tls is None)
    )


class Reloader:
    """
    Reloads the config of a running L{balance.service.BalanceService}.

    :param root: the running root service.
    :param builder: makes the parts of the tree; see L{balance.service}.
    """

    log = Logger()

    def __init__(self, root, reactor, builder):
        self._root = root
        self._reactor = reactor
        self._builder = builder
        self._busy = False

    def reload(self, dry_run: bool = False) -> defer.Deferred:
        """
        Re-read the config file named by the running config.

        :return: a Deferred firing with C{{"ok": bool, "errors": [...],
            "changes": {...}}}; when the file is invalid nothing changes.
        """
        return defer.maybeDeferred(self._reload, dry_run)

    def _reload(self, dry_run: bool) -> dict:
        root = self._root
        metrics = root.metrics
        path = root.config.path
        try:
            new = load_config(path)
        except ConfigError as e:
            if not dry_run:
                metrics.config_reload("failure")
                self.log.error(
                    "reload of {path} refused, keeping the running config:\n{errors}",
                    path=path,
                    errors="\n".join(e.errors),
                )
            return {"ok": False, "dry_run": dry_run, "errors": e.errors, "changes": None}
        changes = diff(root.config, new)
        if root.fixed_sockets and socket_changes(root.config, new):
            # A worker cannot bind: its parent holds the sockets.
            changes["restart_needed"].append("listeners")
        if dry_run:
            return {"ok": True, "dry_run": True, "errors": [], "changes": changes}
        self._apply(new)
        metrics.config_reload("success")
        self.log.info(
            "reloaded {path}: listeners {listeners}, clusters {clusters}",
            path=path,
            listeners=changes["listeners"],
            clusters=changes["clusters"],
        )
        if changes["restart_needed"]:
            self.log.warn(
                "{keys} changed in {path}: those take effect at the next restart",
                keys=", ".join(changes["restart_needed"]),
                path=path,
            )
        return {"ok": True, "dry_run": False, "errors": [], "changes": changes}

    def _apply(self, new: model.Config) -> None:
        root = self._root
        builder = self._builder
        old = root.config

        # Clusters first: listeners refer to them by name.
        old_clusters = _by_name(old.clusters)
        clusters = {}
        for c in new.clusters:
            current = root.clusters.get(c.name)
            if current is not None and old_clusters.get(c.name) == c:
                clusters[c.name] = current
                continue
            if current is not None:
                # Its health checks and DNS stop; requests in flight finish.
                builder.retire_cluster(root, current)
            clusters[c.name] = builder.cluster(root, c, previous=current)
        retired = [root.clusters[n] for n in root.clusters.keys() - clusters.keys()]
        # Swap in place: contexts and factories hold this very dict.
        root.clusters.clear()
        root.clusters.update(clusters)

        old_listeners = _by_name(old.listeners)
        services = {svc.name: svc for svc in root.listeners if svc.name in old_listeners}
        fixed = root.fixed_sockets
        for listener in new.listeners:
            previous = old_listeners.get(listener.name)
            svc = services.get(listener.name)
            if previous is not None and svc is not None and _same_socket(previous, listener):
                builder.swap_listener(root, svc, listener)
                continue
            if fixed:
                # Sockets stay as the workers' parent bound them until a
                # restart.
                continue
            if svc is not None:
                builder.retire_listener(root, svc)
            builder.listener(root, listener, start=True)
        for name in old_listeners.keys() - _by_name(new.listeners).keys():
            svc = None if fixed else services.get(name)
            if svc is not None:
                builder.retire_listener(root, svc)

        for tls in list(root.tls.values()):
            tls.reload()
        root.config = new
        for cluster in retired:
            builder.retire_cluster(root, cluster)
