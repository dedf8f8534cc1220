# -*- test-case-name: tests.l4.test_relay,tests.l4.test_integration -*-
"""
The L4 TCP proxy: accept a client, connect to a backend of the listener's
cluster (next backend on failure), then relay bytes both ways until both
sides are done.

With SNI routes (C{routes: [{match: {sni: NAME}, cluster: C}]}), the proxy
first reads the client's TLS ClientHello without terminating TLS
(L{balance.l4.sni}), picks the cluster of the first route matching its
server name (the listener's C{cluster} when none does, or when the client
sends no TLS or no SNI within C{timeouts.handshake}), connects, and sends
the bytes it read before relaying the rest.  No match and no default
cluster: the connection is closed.

Flow control is Twisted's producer/consumer, wired as in
C{twisted.protocols.portforward}: each transport is the streaming producer of
the other, so when one side reads slower than the other writes, its
transport's buffer passes C{bufferSize} and Twisted stops reading the other
side.  The proxy therefore holds about two socket reads per direction, never
more, and buffers nothing itself.

Half-closes are passed on: when one side shuts down its write half, the other
side's write half is shut down after what is buffered, while bytes keep
flowing the other way.  When both have finished, or either goes away, both
are closed.

On Linux, once the backend is connected, a plain TCP tunnel (no TLS on
either side) is handed to L{balance.l4.splice}, which moves the bytes with
C{splice(2)} in the kernel with the same flow control, half-close and idle
timeout; the producer/consumer relay above is the fallback
(L{L4ProxyFactory.splice} switches the fast path off).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol
from twisted.internet.protocol import Factory, ServerFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from balance._timers import DeadlineWheel
from balance.acl import CidrMatcher
from balance.cluster.cluster import Cluster, NoBackendAvailable
from balance.config import model
from balance.interfaces import IDrainable
from balance.l4 import splice
from balance.l4.sni import ClientHello, ClientHelloParser, NotTLS, SNIRouter
from balance.observe.accesslog import tls_version
from balance.observe.metrics import ListenerMetrics
from balance.proxyproto import client_address, encode, server_address


class _State(enum.Enum):
    """Where a proxied connection is in its life."""

    #: Reading the client's ClientHello to choose a cluster by SNI.
    SNIFFING = "sniffing"
    #: The client is paused while a backend is being connected.
    CONNECTING = "connecting"
    #: Bytes flow both ways.
    OPEN = "open"
    #: Bytes flow both ways in the kernel (L{balance.l4.splice}).
    SPLICING = "splicing"
    #: The client shut down its write half; the backend's write half is shut
    #: down too (after what is buffered); the backend may still answer.
    DOWNSTREAM_DONE = "downstream done"
    #: The mirror image: the backend finished sending; the client may still
    #: send.
    UPSTREAM_DONE = "upstream done"
    #: Both sides are being closed; waiting for their connectionLost.
    CLOSING = "closing"
    #: Both sides are gone and the factory no longer counts the connection.
    CLOSED = "closed"


# The states in which each transport still has the other registered as its
# producer.  Unregistering matters: a transport that still has a producer
# after loseConnection() resumes the (dead) producer instead of closing once
# its buffer is empty, and a transport at EOF that is resumed as a producer
# reports EOF a second time.
_DOWNSTREAM_HAS_PRODUCER = frozenset({_State.OPEN, _State.DOWNSTREAM_DONE})
_UPSTREAM_HAS_PRODUCER = frozenset({_State.OPEN, _State.UPSTREAM_DONE})


def _shut_down_writes(transport) -> None:
    """
    Pass an EOF on: shut down C{transport}'s write half after what is
    buffered, and keep reading.  On TLS that is a close_notify (a TCP FIN
    alone would look like a truncation attack), after which the peer may
    still send.
    """
    if isinstance(transport, TLSMemoryBIOProtocol):
        transport.loseConnection()
    else:
        transport.loseWriteConnection()


def _describe_peer(transport) -> str:
    peer = client_address(transport)
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    if host is None:
        return str(peer)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@implementer(IProtocol, IHalfCloseableProtocol)
class L4ProxyProtocol:
    """
    The client side of one proxied connection, and the owner of its state:
    the upstream transport, the state, the idle timer.

    Not a subclass of L{twisted.internet.protocol.Protocol}, so that
    C{__slots__} really leaves out the per-instance C{__dict__}: this object
    lives as long as the connection.

    Its timeouts (the handshake while sniffing, then idle) live on the
    factory's L{DeadlineWheel}: activity only records a timestamp, and the
    deadline is checked when its bucket comes due.
    """

    __slots__ = (
        "transport",
        "_factory",
        "_state",
        "_up",
        "_cluster",
        "_backend",
        "_pending",
        "_last",
        "_bucket",
        "_downstream_lost",
        "_sniff",
        "_early",
        "_client_eof",
        "_ip",
        "_bytes_in",
        "_bytes_out",
        "_started",
        "_reason",
        "_splice",
        "_spliced_head",
    )

    def __init__(self, factory: L4ProxyFactory, ip: bytes = b""):
        self.transport = None
        self._factory = factory
        self._state = _State.CONNECTING
        self._up = None
        self._cluster: Cluster | None = None
        self._backend = None
        self._pending: Deferred | None = None
        self._last = 0.0
        # The DeadlineWheel token of the timeout, while one is armed.
        self._bucket = None
        self._downstream_lost = False
        # While sniffing: the ClientHello parser; then, until the upstream
        # is connected, the bytes it read; and whether the client already
        # shut down its write half.
        self._sniff: ClientHelloParser | None = None
        self._early: bytes | None = None
        self._client_eof = False
        # For limits.max_connections_per_ip, the access log and metrics.
        self._ip = ip
        self._bytes_in = 0
        self._bytes_out = 0
        self._started = 0.0
        # Why the connection ended, when not by its peers (access log).
        self._reason = ""
        self._splice: splice.SpliceRelay | None = None
        self._spliced_head = 0

    # IProtocol, for the client connection.

    def makeConnection(self, transport) -> None:
        """Attach to the client transport; see L{IProtocol.makeConnection}."""
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        """
        Connect to a backend of the listener's cluster; or, with SNI routes,
        read the ClientHello first.
        """
        factory = self._factory
        factory._opened(self)
        self._started = self._last = factory._seconds()
        if factory.router is not None:
            self._state = _State.SNIFFING
            self._sniff = ClientHelloParser()
            timeout = factory._sniff_timeout
            self._bucket = factory._timers.add(self, self._started + timeout, timeout)
            return
        self._connect(factory.cluster)

    def _connect(self, cluster: Cluster) -> None:
        # Don't read anything from the client until there is somewhere to
        # send it.
        self.transport.pauseProducing()
        factory = self._factory
        self._state = _State.CONNECTING
        self._cluster = cluster
        idle = factory._idle
        if idle > 0:
            self._bucket = factory._timers.add(self, factory._seconds() + idle, idle)
        pending = cluster.connect(factory._upstream_factory, log_context=factory._log_context)
        self._pending = pending
        pending.addCallbacks(self._upstream_connected, self._upstream_failed)
        pending.addErrback(self._unexpected)

    def dataReceived(self, data: bytes) -> None:
        """Pass bytes from the client to the backend."""
        factory = self._factory
        self._last = factory._seconds()
        size = len(data)
        self._bytes_in += size
        factory.metrics.bytes_in += size
        up = self._up
        if up is not None:
            up.write(data)
        elif self._sniff is not None:
            decision = self._sniff.feed(data)
            if decision is not None:
                self._route(decision)
        else:
            # Read before the pause took effect: send it first, in order.
            self._early = data if self._early is None else self._early + data

    def readConnectionLost(self) -> None:
        """
        The client shut down its write half: pass the EOF on to the backend,
        after what is buffered for it, and keep relaying its answer.
        """
        state = self._state
        if state is _State.OPEN:
            self._state = _State.DOWNSTREAM_DONE
            up = self._up
            up.unregisterProducer()
            _shut_down_writes(up)
        elif state is _State.UPSTREAM_DONE:
            self._close()
        elif state is _State.SNIFFING:
            # Nothing more is coming: decide on what arrived, and pass the
            # EOF on once the backend is connected.
            self._client_eof = True
            self._route(NotTLS("the client closed before a whole ClientHello"))

    def writeConnectionLost(self) -> None:
        """Our EOF reached the client; nothing to do."""

    def connectionLost(self, reason: Failure) -> None:
        """The client is gone: close the backend after what is buffered."""
        self._downstream_lost = True
        self._close()
        if self._up is None:
            self._finish()

    # SNI routing.

    def _route(self, decision: ClientHello | NotTLS) -> None:
        """Connect to the cluster the ClientHello asks for."""
        parser, self._sniff = self._sniff, None
        self._early = bytes(parser.buffered)
        factory = self._factory
        self._disarm()
        server_name = decision.server_name if isinstance(decision, ClientHello) else None
        name = factory.router.route(server_name)
        if name is None:
            self._reason = "no route for server name %s and no default cluster" % (server_name,)
            factory.log.warn(
                "closing connection from {client} on listener {listener}: no route for "
                "server name {server_name} and no default cluster",
                client=_describe_peer(self.transport),
                listener=factory.listener.name,
                server_name=server_name
                if server_name is not None
                else f"(none: {getattr(decision, 'reason', 'no SNI')})",
            )
            self._close()
            return
        self._connect(factory.clusters[name])

    def _sniff_timed_out(self) -> None:
        self._route(NotTLS("no whole ClientHello within timeouts.handshake"))

    # The backend side, called by _UpstreamProtocol.

    def _upstream_connected(self, result) -> None:
        backend, upstream = result
        self._pending = None
        self._backend = backend
        upstream._session = self
        down = self.transport
        up = self._up = upstream.transport
        version = self._cluster.model.send_proxy_protocol
        header = b""
        if version is not None:
            # First on the connection, before the client's bytes.
            header = encode(version, client_address(down), server_address(down))
            up.write(header)
        early, self._early = self._early, None
        factory = self._factory
        if factory.splice and not self._client_eof and splice.can_splice(down, up):
            # The relay counts what it delivers, the header and the early
            # bytes (already counted as they arrived) included.
            self._spliced_head = len(header) + len(early or b"")
            self._start_splice(down, up, early or b"")
            return
        if early:
            up.write(early)
        # Wire this and the peer transport together for flow control: a side
        # that reads slowly stops reads on the other side instead of filling
        # this proxy's memory.
        down.registerProducer(up, True)
        up.registerProducer(down, True)
        self._state = _State.OPEN
        self._last = self._factory._seconds()
        if self._client_eof:
            # Resuming a transport at EOF would report EOF again.
            self.readConnectionLost()
            return
        down.resumeProducing()

    def _start_splice(self, down, up, early: bytes) -> None:
        # The idle timeout stays ours (on the factory's wheel); deadline_passed
        # reads the relay's last activity.
        self._state = _State.SPLICING
        self._splice = splice.relay(
            down, up, self._factory._reactor, a_to_b=early, on_done=self._splice_done
        )

    def _splice_done(self, tunnel: splice.SpliceRelay, reason: Failure | None) -> None:
        # Both transports were told to close; their connectionLost finishes
        # the bookkeeping.  A reset or a timeout is not an error to log.
        self._splice = None
        if self._state is _State.SPLICING:
            self._state = _State.CLOSING
        metrics = self._factory.metrics
        # What the client sent (less what was counted as it arrived) and
        # what the backend sent, for the access log and the metrics.
        sent = max(0, tunnel.a_to_b - self._spliced_head)
        self._bytes_in += sent
        self._bytes_out += tunnel.b_to_a
        metrics.bytes_in += sent
        metrics.bytes_out += tunnel.b_to_a

    def _upstream_failed(self, reason: Failure) -> None:
        self._pending = None
        if reason.check(CancelledError):
            # We cancelled it: the client went away or timed out.
            return
        factory = self._factory
        self._reason = str(reason.value)
        if reason.check(NoBackendAvailable):
            factory.log.warn(
                "closing connection from {client} on listener {listener}: {reason}",
                client=_describe_peer(self.transport),
                listener=factory.listener.name,
                reason=reason.value,
            )
        else:
            factory.log.failure(
                "connecting upstream for listener {listener} failed unexpectedly",
                reason,
                listener=factory.listener.name,
            )
        self._close()

    def _upstream_data(self, data: bytes) -> None:
        factory = self._factory
        self._last = factory._seconds()
        size = len(data)
        self._bytes_out += size
        factory.metrics.bytes_out += size
        self.transport.write(data)

    def _upstream_eof(self) -> None:
        state = self._state
        if state is _State.OPEN:
            self._state = _State.UPSTREAM_DONE
            down = self.transport
            down.unregisterProducer()
            _shut_down_writes(down)
        elif state is _State.DOWNSTREAM_DONE:
            self._close()

    def _upstream_lost(self) -> None:
        self._up = None
        self._cluster.release(self._backend)
        self._close()
        if self._downstream_lost:
            self._finish()

    # Closing.

    def abort(self) -> None:
        """Drop both sides now, with whatever they still had buffered."""
        self._reason = self._reason or "aborted (drain timeout)"
        self._close(abort=True)

    def deadline_passed(self) -> None:
        """
        The bucket of this connection's timeout came due (see
        L{DeadlineWheel}): time the handshake out, or the idle period; or,
        after activity, wait for the deadline it moved to.
        """
        factory = self._factory
        self._bucket = None
        now = factory._seconds()
        if self._state is _State.SNIFFING:
            timeout = factory._sniff_timeout
            deadline = self._started + timeout
            if deadline > now:
                self._bucket = factory._timers.add(self, deadline, timeout)
            else:
                self._sniff_timed_out()
            return
        idle = factory._idle
        if idle <= 0:
            # Switched off by a reload.
            return
        last = self._last
        if self._splice is not None:
            last = max(last, self._splice.last_activity)
        deadline = last + idle
        if deadline > now:
            self._bucket = factory._timers.add(self, deadline, idle)
        else:
            self._reason = self._reason or "idle timeout"
            self._close(abort=True)

    def _disarm(self) -> None:
        bucket = self._bucket
        if bucket is not None:
            self._bucket = None
            self._factory._timers.discard(self, bucket)

    def _close(self, abort: bool = False) -> None:
        """
        Close both sides: gracefully (after flushing) unless C{abort}.  Safe
        to call again, and re-entrant: loseConnection() on a half-closed
        transport calls connectionLost() at once.
        """
        state = self._state
        if state is _State.CLOSED or (state is _State.CLOSING and not abort):
            return
        self._state = _State.CLOSING
        tunnel = self._splice
        if tunnel is not None:
            # The relay owns both sockets: it closes both transports.
            if abort:
                tunnel.abort()
            else:
                tunnel.close()
            return
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        down, up = self.transport, self._up
        if state in _DOWNSTREAM_HAS_PRODUCER:
            down.unregisterProducer()
        if up is not None and state in _UPSTREAM_HAS_PRODUCER:
            up.unregisterProducer()
        if abort:
            down.abortConnection()
            if up is not None:
                up.abortConnection()
        else:
            down.loseConnection()
            if up is not None:
                up.loseConnection()

    def _finish(self) -> None:
        if self._state is _State.CLOSED:
            return
        # The idle timeout stays armed until here so that a graceful close
        # stuck on a peer that never reads is aborted in the end.
        self._state = _State.CLOSED
        self._disarm()
        self._factory._closed(self)

    def _unexpected(self, reason: Failure) -> None:
        self._reason = "internal error: %s" % (reason.getErrorMessage(),)
        self._factory.log.failure(
            "L4 proxy connection on listener {listener} failed",
            reason,
            listener=self._factory.listener.name,
        )
        self._close(abort=True)


@implementer(IProtocol, IHalfCloseableProtocol)
class _UpstreamProtocol:
    """
    The backend side of a proxied connection: hands everything to the
    L{L4ProxyProtocol} that owns it.
    """

    __slots__ = ("transport", "_session")

    def __init__(self):
        self.transport = None
        self._session: L4ProxyProtocol | None = None

    def makeConnection(self, transport) -> None:
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        # The session attaches itself synchronously, from the callback of
        # the connect Deferred, before any byte can arrive.
        pass

    def dataReceived(self, data: bytes) -> None:
        self._session._upstream_data(data)

    def readConnectionLost(self) -> None:
        self._session._upstream_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        session, self._session = self._session, None
        if session is not None:
            session._upstream_lost()


class _UpstreamFactory(Factory):
    """Builds L{_UpstreamProtocol}s; one per L{L4ProxyFactory}."""

    # Endpoints call doStart/doStop per connection: no log line for each.
    noisy = False

    def buildProtocol(self, addr) -> _UpstreamProtocol:
        return _UpstreamProtocol()


def _acl(listener: model.Listener) -> CidrMatcher | None:
    """The listener's address ACL, or L{None} when it has no lists."""
    acl = CidrMatcher(listener.allow, listener.deny)
    return None if acl.empty else acl


@implementer(IDrainable)
class L4ProxyFactory(ServerFactory):
    """
    Accepts the client connections of one C{protocol: tcp} listener and
    proxies each to a backend of its cluster, or of the cluster its SNI
    routes choose.

    @ivar listener: The listener config (its name, cluster, routes and
        timeouts are used).
    @ivar cluster: The L{Cluster} connections go to by default (the
        listener's C{cluster}), or L{None}.
    @ivar clusters: Every runtime cluster by name.
    @ivar router: The L{SNIRouter} of the listener's routes, or L{None}
        when it has none (connections then go to C{cluster} at once).
    @ivar splice: Whether plain TCP tunnels may use L{balance.l4.splice}
        (the default where it is available); false forces the
        producer/consumer relay.
    @ivar metrics: The listener's L{ListenerMetrics} (connections and bytes),
        or L{None}.
    """

    splice = True

    log = Logger()

    def __init__(
        self,
        listener: model.Listener,
        clusters: Mapping[str, Cluster],
        reactor,
        metrics: ListenerMetrics | None = None,
        access_log=None,
    ):
        """
        @param listener: The validated listener config.
        @param clusters: The runtime clusters by name; those the listener
            and its routes name must be there.
        @param reactor: Provides the time and the timers (L{IReactorTime}).
        @param metrics: The listener's counters (connections, bytes).
        @param access_log: An L{balance.observe.accesslog.AccessLog} that
            gets a line per connection, or L{None}.
        """
        self.metrics = metrics if metrics is not None else ListenerMetrics(listener.name)
        self.access_log = access_log
        self.max_per_ip = listener.limits.max_connections_per_ip
        # Open connections by client address, for max_connections_per_ip.
        self._per_ip: dict[str, int] = {}
        self.listener = listener
        self.clusters = clusters
        self.cluster = clusters[listener.cluster] if listener.cluster is not None else None
        self.router = SNIRouter(listener.routes, listener.cluster) if listener.routes else None
        self.acl = _acl(listener)
        self._sniff_timeout = listener.timeouts.handshake
        self._reactor = reactor
        self._seconds = reactor.seconds
        self._idle = listener.timeouts.idle
        # The handshake and idle timeouts of every connection.
        self._timers = DeadlineWheel(reactor)
        self._sessions: set[L4ProxyProtocol] = set()
        self._drain_waiters: list[Deferred] = []
        self._upstream_factory = _UpstreamFactory()
        self._log_context = {"listener": listener.name}

    def reconfigure(self, listener: model.Listener) -> None:
        """
        Take the settings of a reloaded C{listener} (same socket): new
        connections use its cluster, routes and timeouts; open ones go on
        with what they started with.
        """
        clusters = self.clusters
        self.listener = listener
        self.cluster = clusters[listener.cluster] if listener.cluster is not None else None
        self.router = SNIRouter(listener.routes, listener.cluster) if listener.routes else None
        self.acl = _acl(listener)
        self.max_per_ip = listener.limits.max_connections_per_ip
        self._sniff_timeout = listener.timeouts.handshake
        self._idle = listener.timeouts.idle
        self._log_context = {"listener": listener.name}

    def buildProtocol(self, addr) -> L4ProxyProtocol | None:
        """
        Make the protocol of one client connection, or refuse it (the
        socket is closed at once) when the listener's allow/deny lists
        exclude the client's address, or when the client already has
        C{limits.max_connections_per_ip} connections open.
        """
        host = getattr(addr, "host", "")
        acl = self.acl
        if acl is not None and not acl.allowed(host):
            self.metrics.refuse("denied")
            return None
        limit = self.max_per_ip
        if limit is not None and host and self._per_ip.get(host, 0) >= limit:
            self.metrics.refuse("max_connections_per_ip")
            return None
        return L4ProxyProtocol(self, host)

    @property
    def active(self) -> int:
        """The number of client connections open (or still closing)."""
        return len(self._sessions)

    def drain(self) -> Deferred:
        """
        @return: A L{Deferred} that fires with L{None} once no connection is
            open: at once when none is.  Cancelling it only stops waiting.
        """
        if not self._sessions:
            return succeed(None)
        d = Deferred(self._drain_waiters.remove)
        self._drain_waiters.append(d)
        return d

    def abort_all(self) -> None:
        """Abort every connection, both sides, dropping buffered data."""
        for session in list(self._sessions):
            session.abort()

    def _opened(self, session: L4ProxyProtocol) -> None:
        self._sessions.add(session)
        ip = session._ip
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        m = self.metrics
        m.connections_total += 1
        m.active += 1

    def _closed(self, session: L4ProxyProtocol) -> None:
        self._sessions.discard(session)
        ip = session._ip
        n = self._per_ip.get(ip, 0)
        if n > 1:
            self._per_ip[ip] = n - 1
        else:
            self._per_ip.pop(ip, None)
        self.metrics.active -= 1
        if self.access_log is not None:
            backend = session._backend
            self.access_log.write_connection(
                self.listener.name,
                ip or "-",
                backend.address if backend is not None else None,
                session._bytes_in,
                session._bytes_out,
                self._seconds() - session._started,
                session._reason,
                tls_version(session),
            )
        if not self._sessions and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)
