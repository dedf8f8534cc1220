"""
twistd plugin: C{twistd balance --config FILE}.

Only a declaration: twistd imports every plugin module to list them, so the
real code is imported lazily from L{balance.tap}.
"""

from twisted.application.service import ServiceMaker

balance = ServiceMaker(
    "Balance",
    "balance.tap",
    "An L4/L7 proxy and load balancer configured by one YAML file.",
    "balance",
)

try:
    from twisted.application.reactors import Reactor
except ImportError:  # pragma: no cover
    pass
else:
    #: C{twistd --reactor=uvloop}: the asyncio reactor on uvloop.
    uvloop = Reactor(
        "uvloop", "balance.uvloopreactor", "Twisted's asyncio reactor on a uvloop event loop."
    )
