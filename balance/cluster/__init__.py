# -*- test-case-name: tests.cluster -*-
"""
Clusters of backends: runtime backend state, load-balancing policies, and
connecting to a backend with failover.
"""

from balance.cluster.backend import Backend
from balance.cluster.cluster import Cluster, NoBackendAvailable

__all__ = ["Backend", "Cluster", "NoBackendAvailable"]
