"""
Tests for L{balance.workers} and L{balance.workers_admin} without
processes: merging the workers' admin answers, the worker count, binding,
reload and restart bookkeeping of the group.  Real processes are in
L{tests.integration.test_workers}.
"""

from __future__ import annotations

import json
import os
import socket

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial import unittest

from balance.config.load import load_text
from balance.config.validate import validate
from balance.worker import WorkerSetup, family_name, parse_args
from balance.workers import BACKOFF_MAX, WorkerGroup, worker_count
from balance.workers_admin import (
    _with_worker,
    clusters_answer,
    first_answer,
    merge_metrics,
    sum_stats,
)
from tests.helpers import free_port, need_tool, port_open, wait_for
from tests.observe.test_metrics import populated


class MergeTests(unittest.TestCase):
    def test_labels(self):
        """The worker label goes first, whatever the sample looks like."""
        self.assertEqual(_with_worker("a 1", 'worker="0"'), 'a{worker="0"} 1')
        self.assertEqual(_with_worker('a{b="c d"} 1', 'worker="0"'), 'a{worker="0",b="c d"} 1')
        self.assertEqual(_with_worker("a{} 1", 'worker="1"'), 'a{worker="1"} 1')

    def test_families_grouped(self):
        """Each family once, with every worker's samples under it."""
        one = b"# HELP x X.\n# TYPE x counter\nx_total 1.0\n# HELP y Y.\n# TYPE y gauge\ny 2.0\n"
        two = b"# HELP x X.\n# TYPE x counter\nx_total 3.0\nz 4.0\n"
        merged = merge_metrics([(0, one), (1, two)]).decode()
        self.assertEqual(
            merged.splitlines(),
            [
                "# HELP x X.",
                "# TYPE x counter",
                'x_total{worker="0"} 1.0',
                'x_total{worker="1"} 3.0',
                'z{worker="1"} 4.0',
                "# HELP y Y.",
                "# TYPE y gauge",
                'y{worker="0"} 2.0',
            ],
        )
        self.assertEqual(merge_metrics([(0, b"lonely 1\n")]), b'lonely{worker="0"} 1\n')

    async def test_promtool(self):
        """The merged exposition of two populated workers passes promtool check metrics."""
        promtool = need_tool("promtool", "prometheus")
        body = populated().render()
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(merge_metrics([(0, body), (1, body)]))
        out, err, code = await getProcessOutputAndValue(
            "/bin/sh", ["-c", f'"{promtool}" check metrics < "{path}"'], env=os.environ
        )
        self.assertEqual(code, 0, (out + err).decode(errors="replace"))

    def test_stats_summed(self):
        class Group:
            ready, draining = True, False
            workers = []

        a = {"ready": True, "listeners": {"web": {"listen": "tcp:1", "requests": {"200": 2}}},
             "clusters": {"c": {"backends_total": 2, "active_connections": 1}}}
        b = {"ready": False, "listeners": {"web": {"listen": "tcp:1", "requests": {"200": 3, "502": 1}}},
             "clusters": {"c": {"backends_total": 2, "active_connections": 4}}}
        merged = sum_stats([(0, 200, json.dumps(a)), (1, 200, json.dumps(b)), (2, 500, b"")], Group)
        self.assertEqual(merged["listeners"]["web"], {"listen": "tcp:1", "requests": {"200": 5, "502": 1}})
        self.assertEqual(merged["clusters"]["c"], {"backends_total": 2, "active_connections": 5})
        self.assertEqual((merged["ready"], merged["workers"]), (True, []))

    def test_clusters(self):
        """The first worker's view, active connections summed."""
        def doc(active):
            return json.dumps({"clusters": [{"name": "c", "active_connections": active, "backends": [
                {"name": "b", "active_connections": active, "healthy": active == 1}]}]}).encode()

        merged = clusters_answer([(0, 200, doc(1)), (1, 200, doc(2)),
                                  (2, 200, b'{"clusters": [{"name": "other"}]}')])
        [cluster] = merged["clusters"]
        self.assertEqual(cluster["active_connections"], 3)
        self.assertEqual(cluster["backends"][0], {"name": "b", "active_connections": 3, "healthy": True})
        self.assertEqual(clusters_answer([]), {"clusters": []})

    def test_first_answer(self):
        self.assertEqual(first_answer([(0, 404, b"x"), (1, 200, b"y")])[::2], (404, b"x"))
        code, _, body = first_answer([])
        self.assertEqual(code, 503)


GOOD = """\
workers: {workers}
listeners:
  - name: web
    listen: "tcp:{port}:interface=127.0.0.1"
    protocol: http
    cluster: app
  - name: six
    listen: "tcp6:{port6}:interface=\\\\:\\\\:1"
    protocol: tcp
    cluster: app
clusters:
  - name: app
    backends: ["127.0.0.1:1"]
"""


class _Reactor:
    """Just enough reactor for the group's bookkeeping."""

    def __init__(self):
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.spawned = []

    def __getattr__(self, name):
        from twisted.internet import reactor

        return getattr(reactor, name)

    def seconds(self):
        return self.clock.seconds()

    def callLater(self, *a, **kw):
        return self.clock.callLater(*a, **kw)


class _Transport:
    def __init__(self):
        self.signals = []
        self.pid = 4242

    def signalProcess(self, name):
        self.signals.append(name)


class GroupTests(unittest.TestCase):
    def group(self, workers="2"):
        path = os.path.abspath(self.mktemp() + ".yaml")
        text = GOOD.format(workers=workers, port=free_port(), port6=free_port())
        with open(path, "w") as f:
            f.write(text)
        config = validate(load_text(text, path), path)
        return WorkerGroup(config, _Reactor())

    def test_count(self):
        """auto is one worker per usable core."""
        self.assertEqual(worker_count(3), 3)
        self.assertEqual(worker_count(0), len(os.sched_getaffinity(0)))
        self.assertEqual(self.group("auto").count, len(os.sched_getaffinity(0)))

    def test_binds_without_accepting(self):
        """The parent binds every listener and hands out (fd, family); it never accepts."""
        group = self.group()
        try:
            group.privilegedStartService()
        except Exception as e:  # no IPv6 loopback here
            raise unittest.SkipTest(str(e)) from None
        self.addCleanup(lambda: [p.stopListening() for p in group.ports.values()])
        families = {name: family for name, (fd, family) in group.sockets.items()}
        self.assertEqual(families, {"web": socket.AF_INET, "six": socket.AF_INET6})
        self.assertEqual(family_name(socket.AF_INET6), "inet6")

    def test_restart_backoff(self):
        """A worker dying young is restarted after a doubling delay, capped; one that lived long, at once."""
        group = self.group()
        worker = group.workers[0]
        spawned = []
        worker.spawn = lambda: spawned.append(group.reactor.seconds())
        reason = Failure(ProcessTerminated(signal=9))
        delays = []
        for _ in range(9):
            worker.started = group.reactor.seconds()
            group._worker_ended(worker, reason)
            delay = worker._restart.getTime() - group.reactor.seconds()
            delays.append(round(delay, 3))
            group.reactor.clock.advance(delay)
        self.assertEqual(delays[:4], [0.1, 0.2, 0.4, 0.8])
        self.assertEqual(delays[-1], BACKOFF_MAX)
        self.assertEqual(len(spawned), 9)
        worker.started = group.reactor.seconds() - 60
        group._worker_ended(worker, Failure(ProcessDone(0)))
        self.assertAlmostEqual(worker._restart.getTime() - group.reactor.seconds(), 0.1)
        # Draining: no restart.
        group.draining = True
        group._worker_ended(worker, reason)

    async def test_reload(self):
        """The group validates first; only a valid file reaches the workers (SIGHUP each)."""
        group = self.group()
        transport = _Transport()
        for worker in group.workers:
            worker.transport = transport
            worker.pid = 1
        answer = await group.reload(True)
        self.assertEqual((answer["ok"], answer["dry_run"], transport.signals), (True, True, []))
        with open(group.config.path, "a") as f:
            f.write("  - name: other\n    backends: ['127.0.0.1:2']\n")
        answer = await group.reload(False)
        self.assertEqual(answer["changes"]["clusters"]["added"], ["other"])
        self.assertEqual(transport.signals, ["HUP", "HUP"])
        with open(group.config.path, "a") as f:
            f.write("bogus: 1\n")
        answer = await group.reload(False)
        self.assertFalse(answer["ok"])
        self.assertEqual(len(transport.signals), 2)

    def bound_group(self, text: str) -> tuple[WorkerGroup, str]:
        """A group on C{text} (written to a file), its sockets bound until the test ends."""
        path = os.path.abspath(self.mktemp() + ".yaml")
        with open(path, "w") as f:
            f.write(text)
        group = WorkerGroup(validate(load_text(text, path), path), _Reactor())
        group.privilegedStartService()
        self.addCleanup(lambda: [p.stopListening() for p in group.ports.values()])
        return group, path

    async def test_listener_change_replaces_workers(self):
        """
        A reload that adds, moves or removes listeners binds the new
        sockets in the parent and starts a new generation of workers on
        them; each replaces its predecessor once ready (which then drains,
        and is not restarted when it exits); sockets no longer used close.
        """
        ports = {n: free_port() for n in ("web", "api", "moved")}
        text = (
            "workers: 2\nlisteners:\n"
            '  - {{name: web, listen: "tcp:{web}:interface=127.0.0.1", cluster: app}}\n'
            '  - {{name: api, listen: "tcp:{api}:interface=127.0.0.1", cluster: app}}\n'
            "clusters:\n  - {{name: app, backends: ['127.0.0.1:1']}}\n"
        )
        group, path = self.bound_group(text.format(**ports))
        group.private_dir = "private"
        spawned = []
        _Worker = type(group.workers[0])

        def spawn(worker):
            spawned.append(worker)
            worker.pid = 100 + len(spawned)
            worker.transport = _Transport()
            worker.ended = Deferred()

        self.patch(_Worker, "spawn", spawn)
        for worker in group.workers:
            worker.spawn()
        old = list(group.workers)
        web_port = group.ports["web"]
        api_fd = group.sockets["api"][0]

        # api moves to another port; web is renamed but keeps its address.
        with open(path, "w") as f:
            f.write(
                text.format(web=ports["web"], api=ports["moved"]).replace("name: web", "name: www")
            )
        answer = self.successResultOf(group.reload(False))
        self.assertEqual((answer["ok"], answer["workers_replaced"]), (True, True))
        self.assertEqual(sorted(group.sockets), ["api", "www"])
        self.assertIs(group.ports["www"], web_port)
        self.assertTrue(port_open(ports["moved"]))
        # The port closes on the next reactor turn.
        await wait_for(lambda: not port_open(ports["api"]), 5, "the old api socket closed")
        self.assertNotEqual(group.sockets["api"][0], api_fd)
        self.assertEqual(sorted(group.pending), [0, 1])
        self.assertEqual({w.generation for w in group.pending.values()}, {1})
        self.assertEqual(group.workers, old)
        self.assertNotEqual(old[0].admin_path, group.pending[0].admin_path)

        # Worker 0 of the new generation is ready: it takes over, and the
        # old one is told to drain.
        new0 = group.pending[0]
        new0.childDataReceived(3, b"ready\n")
        self.assertIs(group.workers[0], new0)
        self.assertEqual(old[0].transport.signals, ["TERM"])
        self.assertEqual(old[1].transport.signals, [])
        self.assertEqual(group.retiring, {old[0]})
        # The drained one exits: not restarted.
        group._worker_ended(old[0], Failure(ProcessDone(0)))
        self.assertIsNone(old[0]._restart)
        self.assertEqual(group.retiring, set())
        self.assertEqual(len(spawned), 4)

        # Another reload before worker 1 is ready: the pending worker 1 is
        # superseded too; a reload without socket changes is a SIGHUP.
        with open(path, "a") as f:
            f.write("  - {name: other, backends: ['127.0.0.1:2']}\n")
        answer = self.successResultOf(group.reload(False))
        self.assertFalse(answer["workers_replaced"])
        self.assertEqual(new0.transport.signals, ["HUP"])
        self.assertEqual(group.pending[1].transport.signals, ["HUP"])

    def test_listener_bind_failure(self):
        """A new address that cannot be bound refuses the reload; nothing changes."""
        ports = {n: free_port() for n in ("web", "taken")}
        taken = socket.socket()
        taken.bind(("127.0.0.1", ports["taken"]))
        taken.listen(1)
        self.addCleanup(taken.close)
        text = (
            "workers: 2\nlisteners:\n"
            '  - {{name: web, listen: "tcp:{web}:interface=127.0.0.1", cluster: app}}\n'
            "clusters:\n  - {{name: app, backends: ['127.0.0.1:1']}}\n"
        )
        group, path = self.bound_group(text.format(**ports))
        before = dict(group.sockets)
        with open(path, "w") as f:
            f.write(
                text.format(**ports).replace(
                    "clusters:",
                    '  - {name: more, listen: "tcp:%d:interface=127.0.0.1", cluster: app}\n'
                    "clusters:" % ports["taken"],
                )
            )
        answer = self.successResultOf(group.reload(False))
        self.assertFalse(answer["ok"])
        self.assertIn("cannot bind more", answer["errors"][0])
        self.assertEqual(group.sockets, before)
        self.assertEqual(group.pending, {})
        self.assertEqual([li.name for li in group.config.listeners], ["web"])

    def test_reopen_logs(self):
        """SIGUSR1 to the parent reaches every worker, which writes the access logs."""
        group = self.group()
        transport = _Transport()
        for worker in group.workers:
            worker.transport = transport
            worker.pid = 1
        group.reopen_logs()
        self.assertEqual(transport.signals, ["USR1", "USR1"])

    def test_worker_args(self):
        args = parse_args(["--config", "c.yaml", "--index", "1", "--admin", "/tmp/a.sock",
                           "--socket", "web=5:inet", "--socket", "a=b=6:unix"])
        self.assertEqual(args.socket, [("web", (5, socket.AF_INET)), ("a=b", (6, socket.AF_UNIX))])
        self.assertEqual(WorkerSetup(1, tuple(args.socket), "unix:/x").index, 1)


class WorkerTreeTests(unittest.TestCase):
    """A worker's service tree in this process, on a socket "from its parent"."""

    async def test_adopted_and_fixed(self):
        """
        Listeners serve the adopted socket; a reload can change routes but
        not bind, close or move sockets (that needs a restart, and says so).
        """
        from twisted.internet import reactor

        from balance.service import build
        from tests.helpers import port_open, unix_socket_path, wait_for

        port, other = free_port(), free_port()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(16)
        fd = os.dup(sock.fileno())
        sock.close()
        path = os.path.abspath(self.mktemp() + ".yaml")
        text = (
            "listeners:\n"
            f'  - {{name: web, listen: "tcp:{port}:interface=127.0.0.1", protocol: http, cluster: app}}\n'
            f'  - {{name: extra, listen: "tcp:{other}:interface=127.0.0.1", protocol: http, cluster: app}}\n'
            "clusters:\n  - {name: app, backends: ['127.0.0.1:1']}\n"
            "whoami:\n  - {name: alpha, listen: 'tcp:%d:interface=127.0.0.1'}\n" % free_port()
        )
        with open(path, "w") as f:
            f.write(text)
        config = validate(load_text(text, path), path)
        setup = WorkerSetup(0, (("web", (fd, socket.AF_INET)),), "unix:" + unix_socket_path(self))
        root = build(config, reactor, worker=setup)
        root.privilegedStartService()
        root.startService()
        self.addCleanup(root.stopService)
        # The parent's whoami and the socket-less listener are not here.
        self.assertEqual([svc.name for svc in root.listeners], ["web"])
        self.assertEqual([svc.name for svc in root.upstreams], [])
        await wait_for(lambda: port_open(port), 5, "the adopted socket")
        self.assertFalse(port_open(other))
        with open(path, "w") as f:
            f.write(text.replace("name: extra", "name: renamed"))
        answer = await root.reload(False)
        self.assertTrue(answer["ok"])
        self.assertIn("listeners", answer["changes"]["restart_needed"])
        self.assertEqual([svc.name for svc in root.listeners], ["web"])
        self.assertFalse(port_open(other))
