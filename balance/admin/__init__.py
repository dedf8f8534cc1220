# -*- test-case-name: tests.admin -*-
"""
The admin API and dashboard: ``/metrics``, ``/healthz``, ``/ready``,
``/stats``, ``/clusters`` (drain and enable), ``/reload``, ``/config`` and a
live HTML page at ``/``, on the listener of ``admin.listen``.

The root service provides :class:`IAdminTarget`; :class:`AdminService`
serves it.
"""

from balance.admin._interfaces import IAdminTarget
from balance.admin.resource import AdminResource
from balance.admin.service import AdminService, AdminTokenError, read_token

__all__ = ["AdminResource", "AdminService", "AdminTokenError", "IAdminTarget", "read_token"]
