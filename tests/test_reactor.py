"""Tests for L{balance._reactor}: the leaner epoll dispatch."""

import socket

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.selectreactor import SelectReactor
from twisted.python.failure import Failure
from twisted.trial import unittest

from balance._reactor import streamline


class _Reader:
    """A read descriptor on one end of a socket pair."""

    def __init__(self, sock, fail=False):
        self.sock = sock
        self.fail = fail
        self.read = b""
        self.lost = None

    def fileno(self):
        return self.sock.fileno()

    def doRead(self):
        if self.fail:
            raise RuntimeError("boom")
        self.read += self.sock.recv(100)

    def connectionLost(self, reason):
        self.lost = reason

    def logPrefix(self):
        return "reader"


class StreamlineTests(unittest.TestCase):
    def make_reactor(self):
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        return reactor

    def test_dispatches(self):
        """A streamlined epoll reactor still delivers readable events."""
        reactor = self.make_reactor()
        self.assertTrue(streamline(reactor))
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        reader = _Reader(a)
        reactor.addReader(reader)
        b.send(b"hello")
        reactor.doIteration(1)
        self.assertEqual(reader.read, b"hello")
        reactor.removeReader(reader)

    def test_errorsStillHandled(self):
        """
        An exception in a descriptor's doRead is logged and the descriptor
        disconnected, as Twisted does without the streamlining.
        """
        reactor = self.make_reactor()
        streamline(reactor)
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        reader = _Reader(a, fail=True)
        reactor.addReader(reader)
        b.send(b"x")
        reactor.doIteration(1)
        self.assertIsInstance(reader.lost, Failure)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_otherReactors(self):
        """Reactors other than epoll are left alone."""
        self.assertFalse(streamline(SelectReactor()))
