"""
Shared test utilities: real loopback peers (echo and streaming backends, a
client that sends and checks), free ports, and waiting for conditions.

These run on the global reactor, for trial tests over real sockets.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SkipTest
from zope.interface import implementer

from balance.config import model


def wait_for(predicate, timeout: float = 30.0, what: str = "a condition") -> Deferred:
    """
    Poll C{predicate} on the reactor until it is true.

    @return: A L{Deferred} that fires with L{None} once C{predicate()} is
        true, or fails with L{AssertionError} after C{timeout} seconds.
    """
    d = Deferred()
    deadline = reactor.seconds() + timeout

    def check():
        if predicate():
            d.callback(None)
        elif reactor.seconds() > deadline:
            d.errback(AssertionError(f"timed out after {timeout}s waiting for {what}"))
        else:
            reactor.callLater(0.002, check)

    check()
    return d


def need_tool(name: str, package: str | None = None, aliases=()) -> str:
    """
    The path of an external tool (or of the first of its C{aliases} found).
    Locally a missing tool skips the test; in CI (C{CI=true}) it fails it,
    so that CI cannot pass by skipping.

    :param package: the Debian package that provides it, for the message.
    """
    for candidate in (name, *aliases):
        path = shutil.which(candidate)
        if path is not None:
            return path
    message = f"{name} is not installed (apt-get install {package or name}; see .ci/run)"
    if os.environ.get("CI", "").lower() == "true":
        raise AssertionError(message + "; CI must have it")
    raise SkipTest(message)


def unix_socket_path(testcase, name: str = "sock") -> str:
    """
    A fresh path for a Unix socket, removed after C{testcase}.

    AF_UNIX paths are limited to 108 bytes, which a deep checkout overruns
    under trial's temp directory, so the socket lives in a short private
    directory under /tmp instead.
    """
    directory = tempfile.mkdtemp(prefix="balance-", dir="/tmp")
    testcase.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, name)


_handed_out: set[int] = set()


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now, and that
    this process was not given before (the kernel may hand the same free
    port to two binds in a row, and a test often asks for several before
    binding any).
    """
    while True:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        finally:
            s.close()
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:C{port}."""
    s = socket.socket()
    s.settimeout(0.2)
    try:
        return s.connect_ex(("127.0.0.1", port)) == 0
    finally:
        s.close()


def closed_port(host: str = "127.0.0.1") -> int:
    """
    A port that refuses connections: bound by the OS, then released.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def ipv6_available() -> bool:
    """Whether this machine can listen on C{::1}."""
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        s.bind(("::1", 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


def backend_model(host: str, port: int, weight: int = 1) -> model.Backend:
    """A config backend for C{host}:C{port}."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return model.Backend(address=address, host=host, port=port, weight=weight)


def buffered(transport) -> int:
    """
    Bytes waiting in a Twisted socket transport's user-space write buffer.
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class _PeerFactory(Factory):
    """
    A server factory that remembers its connections.

    @ivar name: A label for assertions.
    @ivar protocols: Every protocol built, in order.
    """

    noisy = False

    def __init__(self, name: str = "backend"):
        self.name = name
        self.protocols: list = []

    def buildProtocol(self, addr):
        p = self.protocol()
        p.factory = self
        self.protocols.append(p)
        return p

    @property
    def open(self) -> int:
        """The connections not yet lost."""
        return sum(1 for p in self.protocols if not p.lost.called)


@implementer(IHalfCloseableProtocol)
class EchoProtocol(Protocol):
    """
    Echo every byte back, with flow control (the transport is its own
    producer, so a client that does not read stops the echo from reading),
    and close after the echo once the client has shut down its write half.

    @ivar received: Bytes received so far.
    @ivar lost: Fires with None on connectionLost; C{reason} then holds why.
    """

    def __init__(self):
        self.received = 0
        self.lost = Deferred()

    def connectionMade(self):
        self.transport.registerProducer(self.transport, True)

    def dataReceived(self, data):
        self.received += len(data)
        self.transport.write(data)

    def readConnectionLost(self):
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


class EchoFactory(_PeerFactory):
    """Serves L{EchoProtocol}."""

    protocol = EchoProtocol


@implementer(IPushProducer)
class StreamProtocol(Protocol):
    """
    Send C{factory.total} bytes as fast as the peer takes them, a chunk at a
    time as a push producer (so C{sent} stops growing when flow control
    holds the sender back), then close.

    @ivar sent: Bytes handed to the transport so far.
    @ivar paused: Whether the transport has paused the sender.
    """

    chunk = b"s" * 65536

    def __init__(self):
        self.sent = 0
        self.paused = False
        self.lost = Deferred()

    def connectionMade(self):
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self):
        self.paused = False
        total = self.factory.total
        while not self.paused and self.sent < total:
            chunk = self.chunk[: total - self.sent]
            self.sent += len(chunk)
            self.transport.write(chunk)
        if self.sent >= total and self.transport.producer is self:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self.paused = True

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


class StreamFactory(_PeerFactory):
    """Serves L{StreamProtocol}, sending C{total} bytes per connection."""

    protocol = StreamProtocol

    def __init__(self, total: int, name: str = "stream"):
        super().__init__(name)
        self.total = total


class SilentFactory(_PeerFactory):
    """Accepts connections and never sends; remembers what it received."""

    class protocol(Protocol):
        def __init__(self):
            self.received = bytearray()
            self.lost = Deferred()

        def dataReceived(self, data):
            self.received += data

        def connectionLost(self, reason):
            self.reason = reason
            self.lost.callback(None)


@implementer(IPushProducer)
class CheckingClient(Protocol):
    """
    Send C{payload} (while reading, through a push producer), optionally
    shut down the write half afterwards, and check that what comes back is
    C{expected}, byte for byte.

    @ivar received: Bytes received so far.
    @ivar mismatch: Offset of the first differing byte, or L{None}.
    @ivar ready: Fires with this protocol on connectionMade.
    @ivar lost: Fires with None on connectionLost; C{reason} then holds why.
    """

    chunk_size = 256 * 1024

    def __init__(self, payload: bytes = b"", expected=None, half_close: bool = True):
        self.payload = payload
        self.expected = payload if expected is None else expected
        self.half_close = half_close
        self.sent = 0
        self.received = 0
        self.mismatch = None
        self.paused = False
        self.on_data = None
        self.ready = Deferred()
        self.lost = Deferred()

    def connectionMade(self):
        self.ready.callback(self)
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self):
        self.paused = False
        payload = self.payload
        while not self.paused and self.sent < len(payload):
            chunk = payload[self.sent : self.sent + self.chunk_size]
            self.sent += len(chunk)
            self.transport.write(chunk)
        if self.sent >= len(payload) and self.transport.producer is self:
            self.transport.unregisterProducer()
            if self.half_close:
                self.transport.loseWriteConnection()

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self.paused = True

    def dataReceived(self, data):
        start = self.received
        self.received += len(data)
        if self.mismatch is None and data != self.expected[start : self.received]:
            for i, byte in enumerate(data):
                if start + i >= len(self.expected) or self.expected[start + i] != byte:
                    self.mismatch = start + i
                    break
        if self.on_data is not None:
            self.on_data()

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)

    @property
    def complete(self) -> bool:
        """Everything expected came back, nothing else, and nothing wrong."""
        return self.mismatch is None and self.received == len(self.expected)


def connect_client(port: int, protocol: Protocol, host: str = "127.0.0.1") -> Deferred:
    """
    Connect C{protocol} to C{host}:C{port}.

    @return: A L{Deferred} firing with C{protocol} once connected, or
        failing with the connection error.
    """
    return connectProtocol(TCP4ClientEndpoint(reactor, host, port), protocol)
