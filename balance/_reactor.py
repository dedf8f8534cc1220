"""
A leaner event dispatch for the epoll reactor.

Twisted's C{EPollReactor.doPoll} wraps every ready descriptor's
C{doRead}/C{doWrite} in C{log.callWithLogger}, which pushes a legacy
logging context (the C{[Protocol,3,127.0.0.1]} prefix of old-style log
lines) through two context-tracker layers.  On a proxy's data path that is
several microseconds per request, about a tenth of the CPU Balance spends
per proxied request.  Balance logs with C{twisted.logger} and structured
fields, which do not use that context, so it dispatches directly.
Exceptions are still caught and logged by C{_doReadOrWrite}, exactly as
before.
"""

from __future__ import annotations

import errno
import types


def _do_poll(self, timeout):
    if timeout is None:
        timeout = -1
    try:
        events = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = self._selectables
    dispatch = self._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is not None:
            dispatch(selectable, fd, event)


def streamline(reactor) -> bool:
    """
    Make C{reactor} dispatch I/O events without the legacy log context, if
    it is Twisted's epoll reactor (others are left alone).

    :return: whether the reactor was changed.
    """
    from twisted.internet.epollreactor import EPollReactor

    if not isinstance(reactor, EPollReactor) or type(reactor).doPoll is not EPollReactor.doPoll:
        return False
    reactor.doIteration = reactor.doPoll = types.MethodType(_do_poll, reactor)
    return True
