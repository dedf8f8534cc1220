# -*- test-case-name: tests.l4 -*-
"""
Layer 4: TCP connections proxied byte for byte to a cluster.
"""

from balance.l4.relay import L4ProxyFactory, L4ProxyProtocol

__all__ = ["L4ProxyFactory", "L4ProxyProtocol"]
