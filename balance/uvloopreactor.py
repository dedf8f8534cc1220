# -*- test-case-name: tests.test_uvloopreactor -*-
"""
Twisted's asyncio reactor on a uvloop event loop: C{twistd --reactor=uvloop
balance ...} (the reactor plugin is declared in
C{twisted/plugins/balance_plugin.py}).

Balance's data path does the same work on any reactor; what differs is the
cost of waiting for and dispatching I/O events.  bench/README.md has the
measurements behind the default (the epoll reactor).
"""

from __future__ import annotations

import asyncio


def install():
    """
    Install Twisted's asyncio reactor over a new uvloop event loop.

    :raise ImportError: when uvloop is not installed (C{pip install uvloop}).
    """
    import uvloop
    from twisted.internet import asyncioreactor

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    return asyncioreactor.install(loop)
