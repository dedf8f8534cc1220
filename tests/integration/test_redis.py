"""
The shared rate-limit store against a real C{redis-server}, started by the
test on a free loopback port and stopped by its PID.

Locally a missing redis-server skips these tests; in CI (C{CI=true}) it
fails them.
"""

from __future__ import annotations

import os
import signal

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from balance.config import model
from balance.ratelimit._resp import RedisProtocol
from balance.ratelimit.limiter import Decision, RateLimiter
from balance.ratelimit.redis import SCRIPT_SHA, RedisRateLimitStore
from tests.helpers import free_port, need_tool


async def until(condition, timeout: float = 10.0, what: str = "a condition") -> None:
    """Poll C{condition()} on the reactor until it is true, or fail."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


class _Process(ProcessProtocol):
    def __init__(self):
        self.ended = Deferred()
        self.output = b""

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(None)


class RedisServer:
    """
    A C{redis-server} child process: no persistence, loopback only.

    :ivar port: its TCP port, kept across restarts.
    """

    def __init__(self, path: str, port: int):
        self.path = path
        self.port = port
        self.process = None
        self.transport = None

    async def start(self) -> None:
        """Start it and wait until it answers PING."""
        self.process = _Process()
        self.transport = reactor.spawnProcess(
            self.process,
            self.path,
            [
                self.path,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            env=os.environ,
        )
        deadline = reactor.seconds() + 10
        while True:
            try:
                client = await self.client()
                pong = await client.execute(b"PING")
                client.transport.loseConnection()
                if pong == b"PONG":
                    return
            except Exception:
                if self.process.ended.called or reactor.seconds() > deadline:
                    raise AssertionError(
                        f"redis-server did not start: {self.process.output.decode(errors='replace')}"
                    ) from None
            await deferLater(reactor, 0.02, lambda: None)

    async def client(self) -> RedisProtocol:
        """A raw connection to it."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=1)
        return await connectProtocol(endpoint, RedisProtocol(reactor, None))

    async def stop(self) -> None:
        """Stop it (SIGTERM, by PID) and wait until it has exited."""
        if self.process is not None and not self.process.ended.called:
            self.transport.signalProcess("TERM")
            await self.process.ended

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections stay open but nothing answers."""
        os.kill(self.transport.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Undo L{pause}."""
        os.kill(self.transport.pid, signal.SIGCONT)


class RedisStoreTests(unittest.TestCase):
    """Shared token buckets, through real redis-server processes."""

    timeout = 60

    async def setUp(self):
        self.server = RedisServer(need_tool("redis-server", "redis-server"), free_port())
        await self.server.start()
        self.addCleanup(self.server.stop)
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    async def store(self, failure_mode: str = "open", clock=None, **kw) -> RedisRateLimitStore:
        """A started store on the test's server, once it is connected."""
        store = RedisRateLimitStore.from_url(
            f"redis://127.0.0.1:{self.server.port}/0",
            reactor,
            failure_mode=failure_mode,
            backoff_max=0.2,
            **kw,
        )
        if clock is not None:
            # A process whose clock is far off: the store uses it for its
            # timers only, never for the buckets.
            store._clock = clock
        store.startService()
        self.addCleanup(store.stopService)
        await until(lambda: store.reachable, what="the store to connect")
        return store

    def messages(self):
        return [
            e["log_format"].format(**e)
            for e in self.log
            if e.get("log_namespace", "").startswith("balance.ratelimit")
        ]

    async def test_shared_limit(self):
        """
        Two stores (two connections, as two Balance processes would have)
        share one bucket: of 200 decisions fired at once, alternating
        between them, exactly the 20 of the limit pass; another key is not
        affected.
        """
        config = model.RateLimit(requests=20, per=60.0, burst=0, key="client_ip")
        a = RateLimiter(config, await self.store(), "web.0")
        b = RateLimiter(config, await self.store(), "web.0")
        pending = [(a if i % 2 else b).check(b"192.0.2.1", []) for i in range(200)]
        self.assertFalse(any(type(d) is Decision for d in pending))
        decisions = await gatherResults(pending)
        self.assertEqual(sum(d.allowed for d in decisions), 20)
        self.assertEqual(sorted(d.remaining for d in decisions if d.allowed), list(range(20)))
        refused = [d for d in decisions if not d.allowed]
        self.assertTrue(all(0 < d.retry_after <= 3.0 for d in refused), refused[:3])
        other = await a.check(b"192.0.2.2", [])
        self.assertEqual((other.allowed, other.remaining), (True, 19))

    async def test_server_time(self):
        """
        Buckets use Redis' clock: a process whose own clock is wrong by
        days still shares the bucket exactly, and tokens come back with
        real time.
        """
        skewed = Clock()  # its seconds() is 0, decades behind the real one
        a = await self.store()
        b = await self.store(clock=skewed)
        results = await gatherResults([(a if i % 2 else b).take(b"k", 10.0, 2) for i in range(10)])
        self.assertEqual(sum(r[0] for r in results), 2)
        start = reactor.seconds()
        retry_after = results[-1][3]
        self.assertTrue(0 < retry_after <= 0.1, retry_after)

        async def allowed():
            return (await b.take(b"k", 10.0, 2))[0]

        while not await allowed():
            await deferLater(reactor, 0.01, lambda: None)
        self.assertGreaterEqual(reactor.seconds() - start, retry_after - 0.02)

    async def test_bucket_expires(self):
        """A bucket key lives in Redis only until the bucket is full again."""
        store = await self.store()
        allowed, remaining, reset_after, _ = await store.take(b"web.0|ip", 2.0, 4)
        self.assertEqual((allowed, remaining), (True, 3))
        raw = await self.server.client()
        self.addCleanup(raw.transport.loseConnection)
        ttl = await raw.execute(b"PTTL", b"balance:rl:web.0|ip")
        self.assertTrue(0 < ttl <= 500, ttl)
        self.assertAlmostEqual(reset_after, 0.5, delta=0.01)

    async def test_noscript(self):
        """
        After SCRIPT FLUSH (or a Redis restart) decisions still work: the
        store falls back to EVAL, which loads the script again.
        """
        store = await self.store()
        raw = await self.server.client()
        self.addCleanup(raw.transport.loseConnection)
        self.assertEqual(await raw.execute(b"SCRIPT", b"FLUSH"), b"OK")
        first = await store.take(b"k", 1.0, 5)
        self.assertEqual(first[:2], (True, 4))
        self.assertEqual(await raw.execute(b"SCRIPT", b"EXISTS", SCRIPT_SHA), [1])
        second = await store.take(b"k", 1.0, 5)
        self.assertEqual(second[:2], (True, 3))

    async def fail_and_recover(self, failure_mode: str, expected):
        store = await self.store(failure_mode=failure_mode)
        self.assertEqual((await store.take(b"k", 100.0, 10))[:2], (True, 9))
        await self.server.stop()
        await until(lambda: not store.reachable, what="the store to notice")
        for _ in range(10):
            self.assertEqual(store.take(b"k", 100.0, 10), expected)
        # Several reconnect attempts fail in the meantime, quietly.
        await until(lambda: store._client._failures >= 3, what="reconnect attempts")
        self.assertEqual(store.take(b"k", 100.0, 10), expected)
        await self.server.start()
        await until(lambda: store.reachable, what="the store to reconnect")
        decision = await store.take(b"k", 100.0, 10)
        self.assertEqual(decision[:2], (True, 9))  # a new Redis: a fresh bucket
        url = f"redis://127.0.0.1:{self.server.port}/0"
        messages = self.messages()
        self.assertEqual(messages[0], f"rate limit store {url} connected")
        self.assertEqual(len(messages), 3, messages)
        self.assertRegex(
            messages[1], rf"^rate limit store {url} unreachable: .+; failing {failure_mode}$"
        )
        self.assertEqual(messages[2], f"rate limit store {url} reachable again")

    async def test_fail_open(self):
        """
        With Redis stopped, requests pass (failure_mode: open); that is
        logged once, and decisions come from Redis again once it is back.
        """
        await self.fail_and_recover("open", (True, -1, 0.0, 0.0))

    async def test_fail_closed(self):
        """With failure_mode: closed, requests are refused while Redis is down."""
        await self.fail_and_recover("closed", (False, 0, 1.0, 1.0))

    async def test_hung_server(self):
        """
        A Redis that stops answering (SIGSTOP) costs a decision at most
        the 100 ms timeout, then none; it is used again once it answers.
        """
        store = await self.store(failure_mode="closed")
        self.server.pause()
        try:
            start = reactor.seconds()
            results = await DeferredList(
                [store.take(b"k", 1.0, 5) for _ in range(5)], consumeErrors=True
            )
            took = reactor.seconds() - start
            self.assertEqual({r for _, r in results}, {(False, 0, 1.0, 1.0)})
            self.assertTrue(0.09 <= took < 0.5, took)
            self.assertEqual(store.take(b"k", 1.0, 5), (False, 0, 1.0, 1.0))
        finally:
            self.server.resume()
        await until(lambda: store.reachable, what="the store to reconnect")
        # (Timed-out decisions may still have taken their tokens once Redis
        # read them: a timeout cannot tell.  Hence another key here.)
        self.assertEqual((await store.take(b"k2", 1.0, 5))[:2], (True, 4))
        self.assertIn("no reply within 100 ms; failing closed", self.messages()[1])
