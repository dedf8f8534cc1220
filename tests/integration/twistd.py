"""
Run Balance as users do, C{twistd -n balance --config FILE}, in a child
process, for integration tests: start it, wait until it listens, signal it,
collect its output and exit status.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol

from tests.helpers import free_port, port_open, wait_for  # noqa: F401 (re-exported)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))






def twistd_argv(*args: str) -> list[str]:
    """The command line of C{twistd} for this interpreter."""
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args]


def child_env() -> dict[str, str]:
    """
    The environment of a child Balance: the package comes from this
    checkout when it is not installed (trial run from the source tree).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


class _Collector(ProcessProtocol):
    def __init__(self):
        self.out = bytearray()
        self.err = bytearray()
        self.ended = Deferred()

    def outReceived(self, data):
        self.out += data

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        value = reason.value
        if isinstance(value, ProcessDone):
            code = 0
        elif isinstance(value, ProcessTerminated) and value.exitCode is not None:
            code = value.exitCode
        else:
            code = -(getattr(value, "signal", None) or 1)
        self.ended.callback(code)


class BalanceProcess:
    """
    A running C{twistd -n balance}.

    :ivar pid: its process id.
    :ivar ended: fires with the exit status (negative: killed by a signal).
    """

    def __init__(self, collector: _Collector, transport):
        self._collector = collector
        self._transport = transport
        self.pid = transport.pid
        self.ended = collector.ended
        self.exit_code = None
        self.ended.addCallback(self._record)

    def _record(self, code):
        self.exit_code = code
        return code

    @property
    def output(self) -> str:
        """Everything it wrote to stdout and stderr so far."""
        return (bytes(self._collector.out) + bytes(self._collector.err)).decode("utf-8", "replace")

    def signal(self, name: str) -> None:
        """Send it a signal (C{"TERM"}, C{"INT"}, C{"HUP"}, C{"KILL"})."""
        if self.exit_code is None:
            self._transport.signalProcess(name)


def run(*args: str) -> Deferred:
    """
    Run twistd with C{args} to completion.

    :return: a Deferred firing with C{(exit_code, stdout, stderr)} as str.
    """
    collector = _Collector()
    reactor.spawnProcess(
        collector, sys.executable, twistd_argv(*args), env=child_env(), path=ROOT
    )

    def done(code):
        return code, collector.out.decode(), collector.err.decode()

    return collector.ended.addCallback(done)


def start(
    test, config_path: str, port: int, timeout: float = 20.0, env=None, twistd_args=()
) -> Deferred:
    """
    Start C{twistd -n balance --config config_path} and wait until it
    accepts connections on C{port}.  The process is killed at the end of
    C{test} if it is still running.

    :param env: extra environment variables for it.
    :param twistd_args: options of twistd itself (before C{balance}).

    :return: a Deferred firing with a L{BalanceProcess}.
    """
    collector = _Collector()
    transport = reactor.spawnProcess(
        collector,
        sys.executable,
        twistd_argv("-n", "--pidfile=", *twistd_args, "balance", "--config", config_path),
        env=dict(child_env(), **(env or {})),
        path=ROOT,
    )
    proc = BalanceProcess(collector, transport)

    def cleanup():
        if proc.exit_code is None:
            proc.signal("KILL")
            return proc.ended

    test.addCleanup(cleanup)

    def up():
        return proc.exit_code is not None or port_open(port)

    def check(_):
        if proc.exit_code is not None:
            raise AssertionError("balance exited early (%s):\n%s" % (proc.exit_code, proc.output))
        return proc

    d = wait_for(up, timeout, f"balance to listen on {port}")
    d.addCallback(check)
    return d
