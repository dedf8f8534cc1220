# -*- test-case-name: tests.integration.test_workers,tests.test_workers -*-
"""
Multi-process Balance (C{workers: N} or C{auto}): the twistd process
becomes a parent that binds every listener's socket, then starts N worker
processes (L{balance.worker}) that inherit the sockets and serve them, one
reactor each; the kernel spreads new connections over the workers
accepting on the same socket.

The parent
  - never accepts on the listeners (it only holds the sockets, so that a
    worker that dies can be replaced on the same sockets at once);
  - restarts a worker that exits unexpectedly, after a backoff that
    doubles from 0.1 s to 10 s while workers keep dying young;
  - on SIGHUP (or C{POST /reload}) validates the file, then has every
    worker reload it (SIGHUP each).  When listeners would bind, close or
    move, it binds the new sockets itself and replaces the workers
    instead, one new generation as HAProxy's seamless reload does: each
    new worker starts on the new socket set, and once it is ready its
    predecessor drains (SIGTERM) and exits; sockets no listener uses any
    more are closed (the draining workers keep their copies until they
    exit);
  - on SIGTERM closes its copies of the sockets, sends SIGTERM to every
    worker (each drains), and exits 0 when all have exited (SIGKILL after
    C{drain_timeout} plus 10 s);
  - makes the table of the group's local rate limits
    (L{balance.ratelimit.shared}: one bucket per key for all the workers),
    which every worker inherits;
  - runs the built-in whoami upstreams, and the admin API for the group
    (L{GroupAdminResource}): C{/metrics} from every worker's private admin
    socket with a C{worker} label, C{/stats} summed, C{/clusters} from the
    first worker with active counts summed, drain and enable sent to every
    worker; C{/config}, C{/healthz}, C{/ready} and C{/reload} answered by
    the parent.

C{workers: 1} does not come here: one process serves, as always.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from urllib.parse import quote

from twisted.application.service import MultiService
from twisted.internet import defer, endpoints
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol, ServerFactory
from twisted.logger import Logger, LogLevel
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

import balance
from balance.admin import IAdminTarget
from balance.admin.resource import AdminResource
from balance.admin.service import AdminService
from balance.config import model
from balance.config.validate import ConfigError, load_config
from balance.listener import ListenerService, with_backlog
from balance.observe.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from balance.ratelimit.shared import create_table
from balance.reload import diff, socket_changes
from balance.sdnotify import notify
from balance.whoami import WhoamiFactory
from balance.worker import family_name
from balance.workers_admin import (
    ask,
    clusters_answer,
    first_answer,
    json_answer,
    merge_metrics,
    sum_stats,
)

#: Restart delays: from the first to the cap, doubling.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
#: A worker that lived this long resets the backoff.
STABLE_AFTER = 10.0

#: Keys of a worker's log event that the parent's own event sets.
_RELAY_OWN = ("time", "namespace", "worker", "text", "format")


def worker_count(configured: int) -> int:
    """C{workers} as configured; 0 ("auto") is the number of usable cores."""
    if configured:
        return configured
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class _NoAccept(ServerFactory):
    """The parent's factory: never used, the parent does not accept."""

    noisy = False

    def buildProtocol(self, addr):  # pragma: no cover - the port never reads
        return None


def _family(port) -> int:
    host = port.getHost()
    if isinstance(host, IPv6Address):
        return socket.AF_INET6
    if isinstance(host, IPv4Address):
        return socket.AF_INET
    return socket.AF_UNIX


class _Worker(ProcessProtocol):
    """One worker process, and its replacement when it dies."""

    log = Logger()

    def __init__(self, group: WorkerGroup, index: int, generation: int = 0):
        self.group = group
        self.index = index
        self.generation = generation
        #: Replaced by a newer generation: draining, never restarted.
        self.retired = False
        self.pid = None
        self.ready = False
        self.started = 0.0
        self.failures = 0
        self.ended = None
        self._restart = None
        self._lines = {1: b"", 2: b""}

    @property
    def admin_path(self) -> str:
        return os.path.join(self.group.private_dir, f"w{self.index}g{self.generation}.sock")

    def spawn(self) -> None:
        group = self.group
        self._restart = None
        self.ready = False
        self.ended = defer.Deferred()
        argv = [
            sys.executable,
            "-m",
            "balance.worker",
            "--config",
            group.config.path,
            "--index",
            str(self.index),
            "--admin",
            self.admin_path,
            "--status-fd",
            "3",
            "--parent-pid",
            str(os.getpid()),
        ]
        child_fds = {1: "r", 2: "r", 3: "r"}
        if group.rate_limit_fd is not None:
            argv += ["--rate-limit-fd", str(group.rate_limit_fd)]
            child_fds[group.rate_limit_fd] = group.rate_limit_fd
        for name, (fd, family) in group.sockets.items():
            argv += ["--socket", f"{name}={fd}:{family_name(family)}"]
            child_fds[fd] = fd
        try:
            os.unlink(self.admin_path)
        except FileNotFoundError:
            pass
        transport = group.reactor.spawnProcess(
            self, sys.executable, argv, env=group.child_env(), childFDs=child_fds
        )
        self.pid = transport.pid
        self.started = group.reactor.seconds()
        self.log.info("worker {index} started (pid {pid})", index=self.index, pid=self.pid)

    def signal(self, name: str) -> None:
        if self.pid is not None:
            try:
                self.transport.signalProcess(name)
            except Exception:  # pragma: no cover - it just exited
                pass

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 3:
            if b"ready" in data and not self.ready:
                self.ready = True
                self.group._worker_ready(self)
            return
        buffered = self._lines.get(fd, b"") + data
        *lines, self._lines[fd] = buffered.split(b"\n")
        for line in lines:
            self._relay(fd, line.decode("utf-8", "replace"))

    def _relay(self, fd: int, line: str) -> None:
        """
        Re-emit a worker's log line: its JSON events (L{balance.worker})
        with their level and fields, anything else as text (errors on
        stderr).
        """
        level = LogLevel.error if fd == 2 else LogLevel.info
        text, fields = line, {}
        if fd == 1 and line.startswith("{"):
            try:
                event = json.loads(line)
                level = LogLevel.levelWithName(event.pop("level"))
                text = event.pop("message")
            except Exception:
                text, fields = line, {}
            else:
                failure = event.pop("failure", None)
                if failure:
                    text += "\n" + failure
                for key in _RELAY_OWN:
                    event.pop(key, None)
                fields = event
        self.log.emit(level, "worker {worker}: {text}", worker=self.index, text=text, **fields)

    def processEnded(self, reason) -> None:
        for fd, rest in self._lines.items():
            if rest:
                self._relay(fd, rest.decode("utf-8", "replace"))
        self._lines = {1: b"", 2: b""}
        self.pid = None
        self.ready = False
        ended, self.ended = self.ended, None
        self.group._worker_ended(self, reason)
        if ended is not None:
            ended.callback(None)


@implementer(IAdminTarget)
class WorkerGroup(MultiService):
    """
    The root service of the parent of C{workers: N}.

    :ivar config: the config in effect (the workers run the same file).
    :ivar count: the number of workers.
    :ivar sockets: C{{listener name: (fd, family)}} bound by the parent.
    :ivar ports: C{{listener name: port}}, the parent's copies.
    :ivar workers: the L{_Worker}s serving, by index.
    :ivar pending: C{{index: worker}} of a new generation started by a
        reload that changed the sockets, until each is ready and takes
        over its index.
    :ivar retiring: replaced workers still draining.
    """

    log = Logger()
    # IAdminTarget: the parent has no clusters or metrics of its own.
    clusters: dict = {}
    metrics = None

    def __init__(self, config: model.Config, reactor):
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.count = worker_count(config.workers)
        self.sockets: dict[str, tuple[int, int]] = {}
        self.ports: dict = {}
        self.workers = [_Worker(self, i) for i in range(self.count)]
        self.generation = 0
        self.pending: dict[int, _Worker] = {}
        self.retiring: set[_Worker] = set()
        #: The shared table of local rate limits (memfd), made at start.
        self.rate_limit_fd: int | None = None
        self.private_dir = None
        self.ready = False
        self.draining = False
        self.reload = self._reload
        self.admin = None
        for w in config.whoami:
            svc = ListenerService(w.listen, WhoamiFactory(w.name, reactor), reactor, 0)
            svc.setName(f"whoami:{w.name}")
            svc.setServiceParent(self)
        if config.admin is not None:
            self.admin = AdminService(
                config.admin, self, reactor, resource_class=GroupAdminResource
            )
            self.admin.setServiceParent(self)

    def child_env(self) -> dict:
        """The workers' environment: this one, with this Balance importable."""
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(balance.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return env

    # -- starting -----------------------------------------------------------------

    def privilegedStartService(self):
        """Bind every listener's socket (before twistd drops privileges)."""
        self._bind()
        super().privilegedStartService()

    def _bind(self) -> None:
        if self.ports:
            return
        self._use_ports({li.name: self._listen(li) for li in self.config.listeners})

    def _listen(self, listener: model.Listener):
        endpoint = endpoints.serverFromString(self.reactor, with_backlog(listener.listen))
        port = _listen_now(endpoint)
        # The workers accept; the parent only keeps the socket.
        port.stopReading()
        return port

    def _use_ports(self, ports: dict) -> None:
        self.ports = ports
        self.sockets = {name: (port.fileno(), _family(port)) for name, port in ports.items()}

    def startService(self):
        # Runners other than twistd (python -m twisted) skip the privileged start.
        self._bind()
        self.private_dir = tempfile.mkdtemp(prefix="balance-workers-", dir="/tmp")
        if self.config.rate_limit_store is None and self.rate_limit_fd is None:
            self.rate_limit_fd = create_table()
        super().startService()
        self.log.info(
            "Balance starting {count} workers with {config}",
            count=self.count,
            config=self.config.path,
        )
        for worker in self.workers:
            worker.spawn()

    def _worker_ready(self, worker: _Worker) -> None:
        if self.pending.get(worker.index) is worker:
            del self.pending[worker.index]
            previous, self.workers[worker.index] = self.workers[worker.index], worker
            self._retire(previous)
            self.log.info(
                "worker {index} of generation {generation} ready (pid {pid}); "
                "its predecessor drains",
                index=worker.index,
                generation=worker.generation,
                pid=worker.pid,
            )
        if not self.ready and all(w.ready for w in self.workers):
            self.ready = True
            self.log.info("all {count} workers ready", count=self.count)
            notify("READY=1")

    def _worker_ended(self, worker: _Worker, reason) -> None:
        value = reason.value
        status = getattr(value, "exitCode", None)
        if status is None and getattr(value, "signal", None):
            status = f"signal {value.signal}"
        if self.draining or worker.retired:
            self.retiring.discard(worker)
            self.log.info(
                "worker {index}{which} exited ({status})",
                index=worker.index,
                which=" (replaced)" if worker.retired and not self.draining else "",
                status=status,
            )
            return
        lived = self.reactor.seconds() - worker.started
        worker.failures = 1 if lived > STABLE_AFTER else worker.failures + 1
        delay = min(BACKOFF_FIRST * 2 ** (worker.failures - 1), BACKOFF_MAX)
        self.log.warn(
            "worker {index} exited unexpectedly ({status}, after {lived:.1f}s); "
            "restarting it in {delay}s",
            index=worker.index,
            status=status if isinstance(value, ProcessDone | ProcessTerminated) else value,
            lived=lived,
            delay=delay,
        )
        worker._restart = self.reactor.callLater(delay, self._respawn, worker)

    def _respawn(self, worker: _Worker) -> None:
        if not self.draining and not worker.retired:
            worker.spawn()

    def _retire(self, worker: _Worker) -> None:
        """Let C{worker} drain and exit; kill it if it outstays the drain."""
        worker.retired = True
        if worker._restart is not None and worker._restart.active():
            worker._restart.cancel()
        if worker.pid is None:
            return
        self.retiring.add(worker)
        worker.signal("TERM")
        self.reactor.callLater(self.config.drain_timeout + 10, self._kill_retired, worker)

    def _kill_retired(self, worker: _Worker) -> None:
        if worker in self.retiring and worker.pid is not None:
            self.log.warn("replaced worker {index} did not stop; killing it", index=worker.index)
            worker.signal("KILL")

    # -- reload ---------------------------------------------------------------------

    def _reload(self, dry_run: bool = False) -> defer.Deferred:
        return defer.maybeDeferred(self._do_reload, dry_run)

    def _do_reload(self, dry_run: bool) -> dict:
        path = self.config.path
        try:
            new = load_config(path)
        except ConfigError as e:
            if not dry_run:
                self.log.error(
                    "reload of {path} refused, keeping the running config:\n{errors}",
                    path=path,
                    errors="\n".join(e.errors),
                )
            return {"ok": False, "dry_run": dry_run, "errors": e.errors, "changes": None}
        changes = diff(self.config, new)
        replace = bool(socket_changes(self.config, new))
        answer = {
            "ok": True,
            "dry_run": dry_run,
            "errors": [],
            "changes": changes,
            "workers_replaced": replace,
        }
        if dry_run:
            return answer
        if replace:
            try:
                self._replace_workers(new)
            except Exception as e:
                self.log.error(
                    "reload of {path} refused, keeping the running config: {error}",
                    path=path,
                    error=e,
                )
                answer.update(ok=False, errors=[f"{path}: listeners: {e}"], workers_replaced=False)
                return answer
        else:
            live = [w for w in (*self.workers, *self.pending.values()) if w.pid is not None]
            self.log.info("reloading {path} in {count} workers", path=path, count=len(live))
            for worker in live:
                worker.signal("HUP")
        self.config = new
        return answer

    def _replace_workers(self, new: model.Config) -> None:
        """
        The listeners' sockets change: bind what is new (a listener that
        keeps its address keeps its socket, whatever else changed), start a
        new generation of workers on the new set, and close the sockets no
        listener uses any more.

        :raise Exception: if a new address cannot be bound; nothing changed.
        """
        by_address = {
            li.listen: self.ports[li.name] for li in self.config.listeners if li.name in self.ports
        }
        ports, fresh = {}, []
        try:
            for listener in new.listeners:
                port = by_address.get(listener.listen)
                if port is None:
                    port = self._listen(listener)
                    fresh.append(port)
                ports[listener.name] = port
        except Exception as e:
            for port in fresh:
                port.stopListening()
            raise RuntimeError(f"cannot bind {listener.name} on {listener.listen}: {e}") from e
        kept = {id(p) for p in ports.values()}
        closed = [p for p in self.ports.values() if id(p) not in kept]
        self._use_ports(ports)
        self.generation += 1
        self.log.info(
            "listeners changed: starting generation {generation} of {count} workers "
            "(each replaced worker drains once its successor is ready)",
            generation=self.generation,
            count=self.count,
        )
        for index in range(self.count):
            superseded = self.pending.pop(index, None)
            if superseded is not None:
                self._retire(superseded)
            worker = _Worker(self, index, self.generation)
            self.pending[index] = worker
            worker.spawn()
        # The new workers have their copies; the old ones keep theirs
        # until they exit.
        for port in closed:
            port.stopListening()

    def reopen_logs(self) -> None:
        """SIGUSR1: every worker reopens the access logs it writes."""
        for worker in (*self.workers, *self.pending.values(), *self.retiring):
            worker.signal("USR1")

    # -- stopping --------------------------------------------------------------------

    @defer.inlineCallbacks
    def stopService(self):
        self.log.info("Balance stopping: draining {count} workers", count=self.count)
        self.draining = True
        notify("STOPPING=1")
        for port in self.ports.values():
            port.stopListening()
        waits = []
        for worker in (*self.workers, *self.pending.values(), *self.retiring):
            if worker._restart is not None and worker._restart.active():
                worker._restart.cancel()
            if worker.pid is not None:
                waits.append(worker.ended)
                if not worker.retired:
                    # Replaced ones are draining already.
                    worker.signal("TERM")
        if waits:
            done = defer.DeferredList(waits)
            timer = self.reactor.callLater(self.config.drain_timeout + 10, self._kill_remaining)
            yield done
            if timer.active():
                timer.cancel()
        yield defer.maybeDeferred(super().stopService)
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)
        if self.rate_limit_fd is not None:
            os.close(self.rate_limit_fd)
            self.rate_limit_fd = None
        self.log.info("Balance stopped")

    def _kill_remaining(self) -> None:
        for worker in (*self.workers, *self.pending.values(), *self.retiring):
            if worker.pid is not None:
                self.log.warn("worker {index} did not stop; killing it", index=worker.index)
                worker.signal("KILL")


def _listen_now(endpoint):
    """Listen on C{endpoint}, which binds synchronously; the port, or raise."""
    result = []
    d = endpoint.listen(_NoAccept())
    d.addBoth(result.append)
    [port] = result
    if hasattr(port, "raiseException"):
        port.raiseException()
    return port


# -- the admin API of the group ------------------------------------------------------------


class GroupAdminResource(AdminResource):
    """
    The admin API of a L{WorkerGroup}: what only workers know is asked of
    each worker's private admin socket; see the module docstring.
    """

    def _workers(self):
        return [w for w in self.target.workers if w.ready]

    def _ask(self, method: bytes, path: bytes) -> defer.Deferred:
        """Ask every ready worker; fires with [(index, status, body)] in worker order."""
        workers = self._workers()
        return defer.gatherResults(
            [ask(self.target.reactor, w.admin_path, method, path, w.index) for w in workers]
        )

    def _deferred(self, request, d: defer.Deferred):
        def answer(result):
            code, content_type, body = result
            if not request.finished and not request._disconnected:
                request.setResponseCode(code)
                request.setHeader(b"content-type", content_type)
                request.write(body)
                request.finish()

        def failed(reason):
            self.log.failure("asking the workers failed", reason)
            return 502, b"application/json", b'{"error": "the workers did not answer"}\n'

        d.addErrback(failed).addCallback(answer)
        d.addErrback(lambda f: self.log.failure("answering an admin request failed", f))
        return NOT_DONE_YET

    def _metrics(self, request):
        d = self._ask(b"GET", b"/metrics").addCallback(
            lambda answers: (
                200,
                METRICS_CONTENT_TYPE.encode("ascii"),
                merge_metrics([(i, body) for i, code, body in answers if code == 200]),
            )
        )
        return self._deferred(request, d)

    def _stats(self, request):
        d = self._ask(b"GET", b"/stats").addCallback(
            lambda a: json_answer(sum_stats(a, self.target))
        )
        return self._deferred(request, d)

    def _clusters(self, request):
        d = self._ask(b"GET", b"/clusters").addCallback(lambda a: json_answer(clusters_answer(a)))
        return self._deferred(request, d)

    def _set_drained(self, request, name: str, address: str, drained: bool):
        path = "/clusters/%s/backends/%s/%s" % (
            quote(name, safe=""),
            quote(address, safe=""),
            "drain" if drained else "enable",
        )
        d = self._ask(b"POST", path.encode("ascii")).addCallback(first_answer)
        return self._deferred(request, d)
