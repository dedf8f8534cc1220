# -*- test-case-name: tests.cluster.test_round_robin -*-
"""
The roles with several implementations, as C{zope.interface} interfaces.

Config selects implementations by name from registries (for example
L{balance.cluster.lb.POLICIES}); the code that drives them depends only on
the interfaces here.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ILoadBalancer(Interface):
    """
    A load-balancing policy: decides which backend of a cluster gets the next
    connection or request.

    A policy is pure: no sockets, no reactor, no logging, no hidden clock or
    randomness.  It reads the backends' runtime state
    (L{balance.cluster.backend.Backend.eligible}, C{weight}, C{active}) when
    it picks, and keeps whatever bookkeeping of its own it needs (a cursor, a
    ring, latency averages) in itself.  Policies that use randomness take an
    injected C{random.Random}, and those that use time an injected clock
    (an object with C{seconds()}), through
    L{balance.cluster.lb.options.Options}.

    The caller (L{balance.cluster.cluster.Cluster}) drives it in this order
    for each unit of work (a TCP connection, or an HTTP request):
    C{pick}, then C{started} once it commits to the backend, then
    C{finished} exactly once, and C{observe} with the latency whenever it
    measured one.
    """

    def update(backends):
        """
        Replace the backends the policy chooses from.

        Called once at construction and again whenever the set of backends
        changes (reload, DNS re-resolution).  Health and drain changes do not
        call it: they show in C{backend.eligible} at the next pick.  Hash
        policies rebuild their ring or table here, and only here.

        @param backends: The new backends, in config order.
        @type backends: sequence of L{balance.cluster.backend.Backend}
        """

    def pick(key=None, exclude=()):
        """
        Choose a backend.

        @param key: What hashing policies hash (client address, header,
            cookie or path, as C{bytes}; see L{balance.cluster.lb.keys}), or
            L{None} when the request has none, in which case hashing policies
            fall back to round robin.  Other policies ignore it.
        @param exclude: Backends that must not be chosen, typically those a
            retry or a connect failover already tried.
        @type exclude: container of L{balance.cluster.backend.Backend}

        @return: An eligible backend not in C{exclude}, or L{None} when
            there is none.
        @rtype: L{balance.cluster.backend.Backend} or L{None}
        """

    def started(backend):
        """
        Note that a connection or request to C{backend} has started.

        Called after a successful L{pick} once the caller commits to it (for
        example when it starts connecting), after C{backend.active} has been
        incremented.  Policies that weigh load (bounded-load hashing) use it;
        others ignore it.
        """

    def finished(backend):
        """
        Note that a connection or request to C{backend} has finished (or its
        attempt failed), after C{backend.active} has been decremented.
        Called exactly once per L{started}, possibly for a backend that an
        L{update} has removed since.
        """

    def observe(backend, latency):
        """
        Record how long C{backend} took to answer: for HTTP, from sending
        the request to receiving the response head; for TCP, how long the
        connection took to establish.

        Latency-aware policies (peak EWMA) use it; others ignore it.  Not
        called for attempts that failed before an answer.

        @param latency: Seconds, a float at least 0.
        """


class IDrainable(Interface):
    """
    A server factory whose connections can be drained on shutdown.

    L{balance.listener.ListenerService} stops accepting, then calls
    L{drain} and, if the drain timeout passes first, L{abort_all}.
    """

    active = Attribute("The number of connections currently open, an int.")

    def drain():
        """
        @return: A L{Deferred} that fires with L{None} once no connection of
            this factory is open (at once if none is).  Cancelling it stops
            waiting and changes nothing else.
        """

    def abort_all():
        """
        Abort every open connection of this factory now, dropping buffered
        data.  Their C{connectionLost} runs on a later reactor turn, after
        which L{drain} fires.
        """
