# -*- test-case-name: tests.integration.test_workers -*-
"""
One worker process of a multi-process Balance (C{workers: N}):
C{python -m balance.worker}, started by L{balance.workers.WorkerGroup}.

It loads the same config file as its parent, adopts the listening sockets
the parent bound (inherited file descriptors, named on the command line),
and serves them like a single-process Balance: its own clusters, health
checks, pools and metrics.  Its admin API listens on a private UNIX socket
that only the parent uses.  It says "ready" on the status descriptor once
its reactor runs, drains and exits if its parent dies (even by SIGKILL),
logs to stdout as JSON lines (the parent re-emits the
events with their fields), reloads on
SIGHUP and drains on SIGTERM, as the parent asks.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys

import attr

_FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "unix": socket.AF_UNIX}

_PR_SET_PDEATHSIG = 1


@attr.s(frozen=True, auto_attribs=True)
class WorkerSetup:
    """
    What a worker gets from its parent.

    :ivar index: its number, from 0.
    :ivar sockets: C{((listener name, (fd, address family)), ...)}.
    :ivar admin_listen: the endpoint string of its private admin API.
    :ivar rate_limit_fd: the group's shared rate-limit table
        (L{balance.ratelimit.shared}), or L{None} (Redis, or none made).
    """

    index: int
    sockets: tuple
    admin_listen: str
    rate_limit_fd: int | None = None


def family_name(family: int) -> str:
    """The command-line name of an address family."""
    return {v: k for k, v in _FAMILIES.items()}[family]


def _socket(text: str) -> tuple[str, tuple[int, int]]:
    name, _, rest = text.rpartition("=")
    fd, _, family = rest.partition(":")
    return name, (int(fd), _FAMILIES[family])


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m balance.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--admin", required=True, help="UNIX socket path of the private admin API")
    parser.add_argument("--status-fd", type=int, default=None)
    parser.add_argument(
        "--rate-limit-fd", type=int, default=None, help="the group's shared rate-limit table"
    )
    parser.add_argument(
        "--parent-pid", type=int, default=None, help="drain and exit when this process dies"
    )
    parser.add_argument(
        "--socket",
        action="append",
        default=[],
        type=_socket,
        help="NAME=FD:FAMILY of a listening socket to adopt",
    )
    return parser.parse_args(argv)


def _observer(stream):
    """
    Log events as JSON lines (L{balance.observe.logs}); the parent re-emits
    them, fields and all, with the worker's index.
    """
    from balance.observe.logs import JSONLinesObserver

    return JSONLinesObserver(stream)


def die_with_parent(parent_pid: int) -> bool:
    """
    Have the kernel send this process SIGTERM (a drain) when its parent
    dies, as a worker must not outlive its group (a parent killed with
    SIGKILL cannot tell its workers).  Linux's C{PR_SET_PDEATHSIG}.

    :return: whether the parent is still there (when it is not, it died
        before the request took effect, and the worker should not start).
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except AttributeError:  # pragma: no cover - not Linux
        return True
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == parent_pid


def main(argv=None) -> int:
    """Run one worker until it is told to stop; the process's exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.parent_pid is not None and not die_with_parent(args.parent_pid):
        print("the workers' parent is gone; not starting", file=sys.stderr)
        return 1
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from balance._reactor import streamline
    from balance.config.validate import ConfigError, load_config
    from balance.service import build
    from balance.tap import _install_signal_handlers

    globalLogBeginner.beginLoggingTo([_observer(sys.stdout)], redirectStandardIO=False)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 1
    setup = WorkerSetup(
        args.index,
        tuple(args.socket),
        f"unix:{args.admin}:mode=600:lockfile=0",
        args.rate_limit_fd,
    )
    streamline(reactor)
    root = build(config, reactor, worker=setup)
    root.setName(f"worker {args.index}")
    root.privilegedStartService()
    root.startService()
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    reactor.callWhenRunning(_install_signal_handlers, reactor, root)
    if args.status_fd is not None:
        reactor.callWhenRunning(os.write, args.status_fd, b"ready\n")
    reactor.run()
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a process
    sys.exit(main())
