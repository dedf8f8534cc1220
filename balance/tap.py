"""
The twistd plugin's options and service maker: C{twistd balance --config FILE}.
"""

from __future__ import annotations

import signal
import sys

from twisted.logger import Logger
from twisted.python import usage

from balance.config.validate import ConfigError, load_config
from balance.reload import describe_changes, diff, diff_views

_log = Logger()


class Options(usage.Options):
    """
    Command line of C{twistd balance}.

    The config is loaded and validated here, in L{postOptions}, so that an
    invalid file stops twistd before it daemonizes or binds anything, with
    the error lines and exit status 1 rather than a traceback.
    """

    synopsis = "--config FILE [--check [--diff-against OLD]]"
    longdesc = (
        "Run Balance, an L4/L7 proxy and load balancer, on a YAML config file. "
        "With --check, only validate the file: print 'FILE: OK' or the errors "
        "and exit 0 or 1, like nginx -t.  With --diff-against OLD (a config file, or "
        "the URL of a running Balance's GET /config), also print what a reload from "
        "OLD to this file would change."
    )
    optParameters = [
        ["config", "c", None, "The YAML config file."],
        [
            "diff-against",
            None,
            None,
            "With --check: a config file, or an admin URL such as "
            "http://127.0.0.1:9901/config (token in $BALANCE_ADMIN_TOKEN), to compare with.",
        ],
    ]
    optFlags = [
        ["check", None, "Validate the config file and exit without starting anything."],
    ]

    model = None

    def postOptions(self):
        path = self["config"]
        if not path:
            raise usage.UsageError("--config FILE is required")
        try:
            self.model = load_config(path)
        except ConfigError as e:
            for line in e.errors:
                print(line, file=sys.stderr)
            sys.exit(1)
        if self["check"] or self["diff-against"]:
            print(f"{path}: OK")
            old = self["diff-against"]
            if old:
                try:
                    changes = diff_against(self.model, old)
                except ValueError as e:
                    print(str(e), file=sys.stderr)
                    sys.exit(1)
                print(f"a reload from {old} would change:")
                for line in describe_changes(changes):
                    print("  " + line)
            sys.exit(0)


def diff_against(new, old: str) -> dict:
    """
    What a reload from C{old} to the config C{new} would change.

    :param old: a config file path, or an C{http(s)://} URL answering the
        config in effect as JSON (the admin API's C{GET /config}), fetched
        with C{Authorization: Bearer $BALANCE_ADMIN_TOKEN} when set.
    :raise ValueError: with a message, when C{old} cannot be read.
    """
    from balance.admin.views import config_view

    if old.startswith(("http://", "https://")):
        import json
        import os
        import urllib.request

        request = urllib.request.Request(old, headers={"Accept": "application/json"})
        token = os.environ.get("BALANCE_ADMIN_TOKEN")
        if token:
            request.add_header("Authorization", f"Bearer {token.strip()}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                running = json.loads(response.read())
        except (OSError, ValueError) as e:
            raise ValueError(f"{old}: cannot read the running config: {e}") from None
        if not isinstance(running, dict) or "listeners" not in running:
            raise ValueError(f"{old}: not a Balance GET /config answer")
        return diff_views(running, config_view(new))
    try:
        previous = load_config(old)
    except ConfigError as e:
        message = "\n".join([f"{old}: cannot compare with an invalid config:", *e.errors])
        raise ValueError(message) from None
    return diff(previous, new)


def _install_signal_handlers(reactor, root) -> None:
    """
    Make SIGTERM and SIGINT a graceful stop that exits 0, SIGHUP a
    config reload, and SIGUSR1 reopen the access logs (logrotate).

    twistd's own handlers stop the reactor too, but then re-raise the
    signal at exit, so the process status says "killed by SIGTERM" even
    after a clean drain; service managers and CONFIG.md expect 0.
    """

    def stop(signum, frame):
        reactor.callFromThread(_stop, reactor)

    def reload(signum, frame):
        reactor.callFromThread(_reload, root)

    def reopen(signum, frame):
        reactor.callFromThread(root.reopen_logs)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    signal.signal(signal.SIGUSR1, reopen)


def _reload(root) -> None:
    # The reloader logs the outcome (and the errors of an invalid file).
    root.reload(False).addErrback(lambda f: _log.failure("config reload failed", f))


def _stop(reactor) -> None:
    if reactor.running:
        reactor.stop()


def makeService(options: Options):
    """Build the service tree of a validated config on the global reactor."""
    from twisted.internet import reactor

    from balance._reactor import streamline
    from balance.service import build

    streamline(reactor)
    if options.model.workers != 1:
        from balance.workers import WorkerGroup

        root = WorkerGroup(options.model, reactor)
    else:
        root = build(options.model, reactor)
    # After the reactor's own handlers, which it installs when it starts.
    reactor.callWhenRunning(_install_signal_handlers, reactor, root)
    return root
