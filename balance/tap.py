"""
The twistd plugin's options and service maker: C{twistd balance --config FILE}.
"""

from __future__ import annotations

import signal
import sys

from twisted.logger import Logger
from twisted.python import usage

from balance.config.validate import ConfigError, load_config

_log = Logger()


class Options(usage.Options):
    """
    Command line of C{twistd balance}.

    The config is loaded and validated here, in L{postOptions}, so that an
    invalid file stops twistd before it daemonizes or binds anything, with
    the error lines and exit status 1 rather than a traceback.
    """

    synopsis = "--config FILE [--check]"
    longdesc = (
        "Run Balance, an L4/L7 proxy and load balancer, on a YAML config file. "
        "With --check, only validate the file: print 'FILE: OK' or the errors "
        "and exit 0 or 1, like nginx -t."
    )
    optParameters = [
        ["config", "c", None, "The YAML config file."],
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
        if self["check"]:
            print(f"{path}: OK")
            sys.exit(0)


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
    root = build(options.model, reactor)
    # After the reactor's own handlers, which it installs when it starts.
    reactor.callWhenRunning(_install_signal_handlers, reactor, root)
    return root
