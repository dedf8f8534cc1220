"""
Test doubles for the Redis client: an endpoint whose connections are
in-memory transports the test reads and answers by hand.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import StringTransportWithDisconnection


class FakeEndpoint:
    """
    A client endpoint that connects to nothing: each C{connect} builds the
    protocol on a L{StringTransportWithDisconnection} at once, refuses
    while C{refuse} is set, or waits while C{hang} is set.

    :ivar protocols: every protocol connected, in order.
    :ivar pending: the Deferreds of connections left hanging.
    """

    def __init__(self):
        self.refuse = False
        self.hang = False
        self.attempts = 0
        self.protocols = []
        self.pending = []

    def connect(self, factory):
        self.attempts += 1
        if self.refuse:
            return fail(ConnectionRefusedError("refused by the test"))
        if self.hang:
            d = Deferred()
            self.pending.append(d)
            return d
        proto = factory.buildProtocol(None)
        transport = StringTransportWithDisconnection()
        transport.protocol = proto
        proto.makeConnection(transport)
        self.protocols.append(proto)
        return succeed(proto)

    @property
    def last(self):
        """The most recent protocol."""
        return self.protocols[-1]


def written(proto) -> bytes:
    """Take what C{proto} wrote so far."""
    data = proto.transport.value()
    proto.transport.clear()
    return data
