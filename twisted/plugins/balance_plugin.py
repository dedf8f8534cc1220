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
