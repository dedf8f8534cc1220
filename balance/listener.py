# -*- test-case-name: tests.test_listener -*-
"""
A listening socket as a service: listen on a Twisted endpoint string, and on
stop, stop accepting and drain the connections in flight.
"""

from __future__ import annotations

import socket

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, tcp
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

from balance._io import LeanPort

#: The listen(2) backlog when the endpoint string gives none.  Twisted's
#: default of 50 overflows under a burst of connections: the kernel then
#: drops SYNs (a client waits a second or more to retry) or, worse, the
#: final ACK, leaving clients that believe they are connected.  Linux caps
#: it at net.core.somaxconn.
BACKLOG = 1024


def with_backlog(description: str) -> str:
    """C{description} with C{backlog=BACKLOG} when it is a tcp, tcp6 or unix one without."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "unix") and "backlog=" not in description:
        return f"{description}:backlog={BACKLOG}"
    return description


class ListenerService(StreamServerEndpointService):
    """
    Listen on C{description} with C{factory} while running.

    Starting it binds at once, and a bind failure raises from
    C{privilegedStartService}/C{startService}, so that C{twistd} stops at
    startup instead of running without the port (as
    L{twisted.application.strports.service} does).

    Stopping it closes the listening port first, so new connections are
    refused, then waits for the factory's connections to finish
    (C{factory.drain()}, see L{balance.interfaces.IDrainable}) for at most
    C{drain_timeout} seconds, after which it aborts them
    (C{factory.abort_all()}).  A factory without C{drain} is not waited for.

    @ivar port: The L{IListeningPort} once listening, else L{None}; for
        example C{service.port.getHost().port} after listening on
        C{"tcp:0"}.
    """

    log = Logger()

    def __init__(
        self,
        description: str,
        factory,
        reactor,
        drain_timeout: float,
        endpoint=None,
        nodelay: bool = False,
    ):
        """
        @param description: A Twisted server endpoint string (C{tcp:},
            C{tcp6:}, C{unix:}, C{systemd:}, ...), already validated.
        @param factory: The server factory of accepted connections.
        @param reactor: The reactor to listen with and to time the drain.
        @param drain_timeout: Seconds in-flight connections may take to
            finish on stop.
        @param endpoint: The server endpoint to listen on instead of
            C{description}'s (a worker's socket adopted from its parent).
        @param nodelay: Whether to set C{TCP_NODELAY} on the listening
            socket, which Linux passes on to every socket it accepts (one
            system call per connection less for protocols that want it,
            such as TLS).

        @raise ValueError: If C{description} is not a valid endpoint string.
        """
        if endpoint is None:
            endpoint = endpoints.serverFromString(reactor, with_backlog(description))
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True
        self.description = description
        self.port = None
        self._reactor = reactor
        self._drain_timeout = drain_timeout
        self._nodelay = nodelay

    def privilegedStartService(self) -> None:
        """
        Bind the port.

        @raise Exception: Whatever the endpoint raised, typically
            L{twisted.internet.error.CannotListenError}.
        """
        super().privilegedStartService()
        # On a bind error the Deferred has already failed and been handled by
        # the call above (which raised); here it only ever holds the port.
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port):
        self.port = port
        if type(port) is tcp.Port and port.transport is tcp.Server:
            # The same object, with Balance's accept loop (and LeanServer).
            port.__class__ = LeanPort
            self._set_options(port)
        logger = getattr(port, "_logger", None)
        if isinstance(logger, Logger):
            # Twisted logs three lines per connection it must close while
            # the process is out of descriptors: a flood at the worst time.
            port._logger = Logger(
                namespace=logger.namespace,
                observer=_AcceptErrorLog(logger.observer, self.description, self._reactor),
            )
        return port

    def _set_options(self, port: LeanPort) -> None:
        if self._nodelay:
            port.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            port.balance_nodelay = True

    def stopService(self) -> Deferred:
        """
        Stop accepting, then drain.

        @return: A L{Deferred} that fires when every connection has finished,
            or has been aborted after the drain timeout.
        """
        if self._waitingForPort is None:
            # Never started: nothing listens and nothing is in flight.
            self.running = False
            return succeed(None)
        d = super().stopService()
        d.addCallback(lambda _: self._drain())
        d.addErrback(self._failed)
        return d

    def _drain(self) -> Deferred:
        drain = getattr(self.factory, "drain", None)
        if drain is None:
            return succeed(None)
        drained = maybeDeferred(drain)
        if not drained.called:
            drained.addTimeout(self._drain_timeout, self._reactor, onTimeoutCancel=self._abort)
        return drained

    def _abort(self, result, timeout: float) -> Deferred:
        count = getattr(self.factory, "active", "its")
        if callable(count):
            count = count()
        self.log.warn(
            "listener {description} did not drain within {timeout}s; aborting {count} connections",
            description=self.description,
            timeout=timeout,
            count=count,
        )
        self.factory.abort_all()
        # Aborted connections go away on the next reactor turn; wait for
        # that so that a stopped service has nothing left open.
        return self.factory.drain()

    def _failed(self, reason) -> None:
        self.log.failure(
            "stopping listener {description} failed", reason, description=self.description
        )


class _AcceptErrorLog:
    """
    The log observer of a listening port: events about connections refused
    for want of file descriptors (EMFILE and the like) become one warning
    per episode; an episode ends after C{quiet} seconds without such an
    event.  Other events pass through.
    """

    log = Logger()

    def __init__(self, observer, description: str, clock, quiet: float = 60.0):
        self.observer = observer
        self.description = description
        self.clock = clock
        self.quiet = quiet
        self.last = None

    def __call__(self, event) -> None:
        text = event.get("log_format") or ""
        if "EMFILE" not in text and "Could not accept" not in text:
            self.observer(event)
            return
        now = self.clock.seconds()
        if self.last is None or now - self.last >= self.quiet:
            self.log.warn(
                "listener {description}: out of file descriptors (raise the open files "
                "limit?); new connections are closed at once until some are freed",
                description=self.description,
            )
        self.last = now
