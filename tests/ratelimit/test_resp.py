"""
The small Redis client: RESP2 framing, pipelining, the watchdog and
reconnecting.
"""

from __future__ import annotations

import random

from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from balance.ratelimit._resp import (
    RedisClient,
    RedisError,
    RedisProtocol,
    RedisProtocolError,
    RedisTimeout,
    backoff,
    encode,
    parse,
)
from tests.ratelimit.fakes import FakeEndpoint, written


def connected(clock=None, timeout=None):
    proto = RedisProtocol(clock or Clock(), timeout)
    transport = StringTransportWithDisconnection()
    transport.protocol = proto
    proto.makeConnection(transport)
    return proto


REPLIES = (
    b"+OK\r\n"
    b":42\r\n"
    b"$5\r\nhello\r\n"
    b"$-1\r\n"
    b"*3\r\n:1\r\n$0\r\n\r\n*1\r\n+x\r\n"
    b"-NOSCRIPT No matching script.\r\n"
    b"*-1\r\n"
    b"$4\r\na\r\nb\r\n"
)
VALUES = [b"OK", 42, b"hello", None, [1, b"", [b"x"]], "error", None, b"a\r\nb"]


class FramingTests(SynchronousTestCase):
    """Encoding commands and parsing replies."""

    def test_encode(self):
        """Commands are arrays of bulk strings; str and numbers are converted."""
        self.assertEqual(
            encode((b"EVALSHA", "ab", 1, b"")),
            b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$0\r\n\r\n",
        )

    def test_parse_all_types(self):
        """Every RESP2 reply type parses, one after the other."""
        pos, values = 0, []
        while pos < len(REPLIES):
            value, pos = parse(REPLIES, pos)
            values.append("error" if isinstance(value, RedisError) else value)
        self.assertEqual(values, VALUES)

    def test_incomplete(self):
        """Every proper prefix of a reply is incomplete, not an error."""
        reply = b"*2\r\n$5\r\nhello\r\n:7\r\n"
        for i in range(len(reply)):
            self.assertEqual(parse(reply[:i], 0)[1], -1)

    def test_garbage(self):
        """Bytes that are not RESP2 raise RedisProtocolError."""
        for bad in (b"?x\r\n", b":abc\r\n", b"$3\r\nabcde\r\n"):
            self.assertRaises(RedisProtocolError, parse, bad, 0)


class ProtocolTests(SynchronousTestCase):
    """Commands go out at once and replies complete them in order."""

    def test_pipelined_fifo(self):
        """
        Several commands in a row complete in order, with replies fed one
        byte at a time and in one blob; an error reply fails its command
        only.
        """
        for chunked in (True, False):
            proto = connected()
            ds = [proto.execute(b"CMD", b"%d" % i) for i in range(len(VALUES))]
            self.assertEqual(written(proto).count(b"CMD"), len(VALUES))
            if chunked:
                for i in range(len(REPLIES)):
                    proto.dataReceived(REPLIES[i : i + 1])
            else:
                proto.dataReceived(REPLIES)
            results = []
            for d in ds:
                if VALUES[len(results)] == "error":
                    f = self.failureResultOf(d, RedisError)
                    self.assertEqual(f.value.code, "NOSCRIPT")
                    results.append("error")
                else:
                    results.append(self.successResultOf(d))
            self.assertEqual(results, VALUES)

    def test_cancelled_skipped(self):
        """A command its caller gave up on does not shift the replies."""
        proto = connected()
        first = proto.execute(b"A")
        second = proto.execute(b"B")
        first.cancel()
        self.failureResultOf(first)
        proto.dataReceived(b":1\r\n:2\r\n")
        self.assertEqual(self.successResultOf(second), 2)

    def test_connection_lost(self):
        """Pending commands fail with ConnectionLost, and later ones at once."""
        proto = connected()
        d = proto.execute(b"PING")
        proto.transport.loseConnection()
        self.failureResultOf(d, ConnectionLost)
        self.failureResultOf(proto.execute(b"PING"), ConnectionLost)

    def test_protocol_error_aborts(self):
        """Garbage from the server fails what is pending and drops the connection."""
        proto = connected()
        d = proto.execute(b"PING")
        proto.dataReceived(b"!!\r\n")
        self.failureResultOf(d, RedisProtocolError)
        self.assertFalse(proto.connected)

    def test_watchdog(self):
        """
        A server that stops answering: after C{timeout} the connection is
        aborted and its commands fail with RedisTimeout.
        """
        clock = Clock()
        proto = connected(clock, timeout=0.1)
        lost = []
        proto.on_lost = lost.append
        d1 = proto.execute(b"PING")
        clock.advance(0.06)
        d2 = proto.execute(b"PING")
        proto.dataReceived(b"+PONG\r\n")
        self.assertEqual(self.successResultOf(d1), b"PONG")
        clock.advance(0.05)  # the first watchdog fires; d2 waited only 0.05
        self.assertNoResult(d2)
        clock.advance(0.05)
        self.failureResultOf(d2, RedisTimeout)
        self.assertFalse(proto.connected)
        self.assertEqual(len(lost), 1)

    def test_watchdog_idle(self):
        """An idle connection has no timer."""
        clock = Clock()
        proto = connected(clock, timeout=0.1)
        d = proto.execute(b"PING")
        proto.dataReceived(b"+PONG\r\n")
        self.successResultOf(d)
        clock.advance(0.1)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertTrue(proto.connected)


class ClientTests(SynchronousTestCase):
    """One ready connection, reconnecting with backoff."""

    def setUp(self):
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.events = []
        self.prepared = []

    def client(self, prepare=True):
        def prep(proto):
            self.prepared.append(proto)
            return proto.execute(b"PING")

        return RedisClient(
            self.endpoint,
            self.clock,
            prepare=prep if prepare else None,
            on_up=lambda: self.events.append("up"),
            on_down=lambda f: self.events.append(("down", f.getErrorMessage())),
            rng=random.Random(1),
        )

    def test_ready_after_prepare(self):
        """The connection is usable only once prepare succeeded."""
        c = self.client()
        c.start()
        self.assertIsNone(c.protocol)
        self.assertEqual(c.state, "connecting")
        self.endpoint.last.dataReceived(b"+PONG\r\n")
        self.assertIs(c.protocol, self.endpoint.last)
        self.assertEqual(c.state, "connected")
        self.assertEqual(self.events, ["up"])

    def test_reconnect_with_backoff(self):
        """
        Refused attempts are retried with growing delays; a lost
        connection is replaced.
        """
        self.endpoint.refuse = True
        c = self.client(prepare=False)
        c.start()
        delays = []
        for _ in range(5):
            [call] = self.clock.getDelayedCalls()
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
        self.assertEqual(self.endpoint.attempts, 6)
        self.assertEqual(delays, sorted(delays))
        self.assertLessEqual(delays[-1], 5.0)
        self.endpoint.refuse = False
        self.clock.advance(10)
        self.assertEqual(c.state, "connected")
        proto = c.protocol
        proto.transport.loseConnection()
        self.assertIsNone(c.protocol)
        self.assertEqual(c.state, "waiting")
        self.clock.advance(1)
        self.assertIsNot(c.protocol, None)
        self.assertIsNot(c.protocol, proto)
        self.assertEqual([e if e == "up" else "down" for e in self.events].count("down"), 7)

    def test_prepare_failure(self):
        """A connection whose prepare fails is dropped and retried."""
        c = self.client()
        c.start()
        first = self.endpoint.last
        first.dataReceived(b"-NOAUTH Authentication required.\r\n")
        self.assertFalse(first.connected)
        self.assertEqual(c.state, "waiting")
        self.assertEqual(self.events, [("down", "NOAUTH Authentication required.")])

    def test_connect_timeout(self):
        """An attempt that hangs is given up after connect_timeout."""
        self.endpoint.hang = True
        c = self.client()
        c.start()
        self.clock.advance(1.0)
        self.assertEqual(c.state, "waiting")
        self.assertEqual(len(self.events), 1)

    def test_stop(self):
        """stop() closes the connection and stops reconnecting."""
        c = self.client(prepare=False)
        c.start()
        proto = c.protocol
        d = c.stop()
        self.successResultOf(d)
        self.assertFalse(proto.connected)
        self.assertEqual(c.state, "stopped")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.events, ["up"])

    def test_stop_while_waiting(self):
        """stop() while waiting to retry cancels the retry."""
        self.endpoint.refuse = True
        c = self.client()
        c.start()
        self.successResultOf(c.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_backoff(self):
        """Delays double up to the maximum, with up to half of jitter."""
        rng = random.Random(3)
        for attempt, base in ((1, 0.1), (2, 0.2), (3, 0.4), (10, 5.0), (100, 5.0)):
            delay = backoff(attempt, 0.1, 5.0, rng)
            self.assertTrue(base / 2 <= delay <= base, (attempt, delay))

    def test_failure_is_logged_by_caller(self):
        """on_down gets the reason as a Failure."""
        reasons = []
        c = RedisClient(FakeEndpoint(), self.clock, on_down=reasons.append)
        c._endpoint.refuse = True
        c.start()
        self.assertIsInstance(reasons[0], Failure)
