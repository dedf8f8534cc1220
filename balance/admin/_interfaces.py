# -*- test-case-name: tests.admin.test_api -*-
"""
What the admin API needs from the running process, as an interface, so
that the API does not depend on how the service tree is built.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = ["IAdminTarget"]


class IAdminTarget(Interface):
    """
    The running process, as the admin API sees it.

    The admin API reads every attribute anew at each request and keeps no
    reference to what it read, so a reload that replaces ``config``,
    ``clusters`` or ``metrics`` on the target shows at the next request.
    Everything is read and written on the reactor thread.
    """

    config = Attribute(
        """
        The ``balance.config.model.Config`` in effect, served (secrets
        redacted) by ``GET /config``.
        """
    )

    clusters = Attribute(
        """
        The runtime ``balance.cluster.cluster.Cluster`` objects by name.
        ``GET /clusters`` shows their backends; the drain and enable requests
        set ``drained`` on them.
        """
    )

    metrics = Attribute(
        """
        The process's ``balance.observe.metrics.Metrics``, or ``None`` when
        it has none: then ``GET /metrics`` answers 404 and ``GET /stats``
        shows only the live state.
        """
    )

    ready = Attribute(
        """
        ``True`` once the config is loaded and every listener is bound.
        ``GET /ready`` answers 200 while this is true and ``draining`` is not.
        """
    )

    draining = Attribute(
        """
        ``True`` from the moment the process starts to stop (SIGTERM): the
        listeners no longer accept and in-flight work is finishing.
        ``GET /ready`` answers 503 from then on.
        """
    )

    reload = Attribute(
        """
        ``None`` when this process cannot reload (``POST /reload`` answers
        501), else a callable ``reload(dry_run: bool) -> Deferred[dict]``.

        With ``dry_run`` true it only validates the config file and reports
        what a reload would change; with ``dry_run`` false it also applies
        the change.  The Deferred fires with a JSON-serialisable dict that
        has at least:

        - ``"ok"``: ``True`` if the file is valid (and, without ``dry_run``,
          the new config is now in effect), ``False`` otherwise;
        - ``"errors"``: the validation errors, one ``FILE:LINE: key.path:
          message`` string each (empty when ``ok``).

        Other keys (for example ``"changes"``) go to the client as they are.
        The Deferred may instead fail with
        ``balance.config.validate.ConfigError``, which the API answers as
        ``{"ok": false, "errors": error.errors}``; any other failure is
        logged and answered with 500.
        """
    )
