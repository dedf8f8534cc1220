"""
The store of a group of workers: buckets in a shared memory table, decided
under a record lock, the same decisions as the in-process store, memory
fixed, and exact across processes hammering one key at once.
"""

from __future__ import annotations

import os
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from balance.ratelimit import IRateLimitStore
from balance.ratelimit.local import LocalRateLimitStore
from balance.ratelimit.shared import STRIPES, WAYS, SharedRateLimitStore, create_table


class SharedStoreTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)

    def table(self, slots: int = 1024) -> int:
        fd = create_table(slots)
        self.addCleanup(os.close, fd)
        return fd

    def test_interface(self):
        store = SharedRateLimitStore(self.clock, self.table())
        self.assertTrue(verifyObject(IRateLimitStore, store))
        self.assertTrue(store.synchronous)

    def test_fixed_size(self):
        """The table is 16 bytes an entry, entries rounded up to groups, and the mutexes."""
        fd = self.table(1000)
        self.assertEqual(os.fstat(fd).st_size, STRIPES * 64 + 1000 * 16)
        self.assertEqual(SharedRateLimitStore(self.clock, fd).slots, 1000)
        self.assertEqual(SharedRateLimitStore(self.clock, self.table(5)).slots, 2 * WAYS)

    def test_not_a_table(self):
        fd = os.memfd_create("x")
        self.addCleanup(os.close, fd)
        os.ftruncate(fd, STRIPES * 64 + 100)
        self.assertRaises(ValueError, SharedRateLimitStore, self.clock, fd)

    def test_two_maps_one_bucket(self):
        """Two stores on one table (two workers) draw from the same buckets."""
        fd = self.table()
        a, b = SharedRateLimitStore(self.clock, fd), SharedRateLimitStore(self.clock, fd)
        taken = [s.take(b"k", 1.0, 4)[0] for s in (a, b, a, b, a)]
        self.assertEqual(taken, [True, True, True, True, False])
        self.assertEqual(len(a), 1)
        self.clock.advance(4)
        self.assertEqual(len(b), 0)
        self.assertEqual(b.take(b"k", 1.0, 4)[:2], (True, 3))

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.tuples(st.sampled_from([b"a", b"b", b"c", b"dd"]), st.floats(0, 2)),
            max_size=60,
        ),
        st.integers(1, 5),
        st.floats(0.5, 20),
    )
    def test_same_as_local(self, steps, capacity, rate):
        """Without evictions, decisions are those of the in-process store."""
        clock = Clock()
        clock.advance(1_700_000_000)
        fd = create_table(64)
        try:
            shared, local = SharedRateLimitStore(clock, fd), LocalRateLimitStore(clock)
            for key, pause in steps:
                clock.advance(pause)
                self.assertEqual(shared.take(key, rate, capacity), local.take(key, rate, capacity))
        finally:
            os.close(fd)

    def test_eviction(self):
        """
        A group of entries full of buckets that are not full yet: a new key
        evicts the one closest to full, and it is counted.
        """
        store = SharedRateLimitStore(self.clock, self.table(WAYS))
        for i in range(WAYS):
            store.take(b"key%d" % i, 1.0, 10)
            self.clock.advance(0.1)
        self.assertEqual(store.evicted, 0)
        store.take(b"new", 1.0, 10)
        self.assertEqual((store.evicted, len(store)), (1, WAYS))
        # A bucket that is full again frees its entry: no eviction.
        self.clock.advance(1.5)
        store.take(b"newer", 1.0, 10)
        self.assertEqual(store.evicted, 1)

    def run_python(self, script: str, fd: int, *args: str) -> subprocess.Popen:
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return subprocess.Popen(
            [sys.executable, "-c", script, str(fd), *args],
            pass_fds=(fd,),
            stdout=subprocess.PIPE,
            env=env,
        )

    def test_holder_killed(self):
        """
        A worker that dies holding a stripe's mutex does not block the
        others: the next decision takes the mutex over.
        """
        fd = self.table()
        script = (
            "import os, sys\n"
            "from balance.ratelimit import shared\n"
            "store = shared.SharedRateLimitStore(None, int(sys.argv[1]))\n"
            "group = shared._hash(b'k') % store._groups\n"
            "assert shared._lock(store._mutexes + (group % shared.STRIPES) * 64) == 0\n"
            "print('locked', flush=True)\n"
            "os._exit(0)\n"
        )
        process = self.run_python(script, fd)
        self.assertEqual(process.communicate(timeout=60)[0], b"locked\n")
        store = SharedRateLimitStore(self.clock, fd)
        self.assertEqual(store.take(b"k", 1.0, 2)[:2], (True, 1))
        self.assertEqual(store.take(b"k", 1.0, 2)[:2], (True, 0))

    def test_processes(self):
        """
        Four processes take from one bucket as fast as they can: exactly
        its capacity passes, never more (the lock holds across processes).
        """
        fd = self.table()
        script = (
            "import sys, time\n"
            "from balance.ratelimit.shared import SharedRateLimitStore\n"
            "class C:\n"
            "    seconds = staticmethod(time.time)\n"
            "store = SharedRateLimitStore(C, int(sys.argv[1]))\n"
            "while time.time() < float(sys.argv[2]):\n"
            "    pass\n"
            "print(sum(store.take(b'one', 1e-6, 2000)[0] for _ in range(1500)))\n"
        )
        import time

        start = str(time.time() + 1.0)
        procs = [self.run_python(script, fd, start) for _ in range(4)]
        allowed = [int(p.communicate(timeout=60)[0]) for p in procs]
        self.assertEqual(sum(allowed), 2000, allowed)
