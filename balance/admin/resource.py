# -*- test-case-name: tests.admin.test_api -*-
"""
The admin API as one ``twisted.web`` resource: authentication, dispatch by
method and path, and the JSON, text and HTML answers.

One leaf resource owns every path, so that authentication, 404 and 405 are
decided in one place and in one order: the bearer token first (so that an
unauthenticated client learns nothing, not even which paths exist), then
the path, then the method.
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import unquote_to_bytes, urlsplit

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from balance.admin import dashboard, views
from balance.config.validate import ConfigError
from balance.observe.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

__all__ = ["AdminResource"]

_JSON = b"application/json; charset=utf-8"
_TEXT = b"text/plain; charset=utf-8"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})

# A path segment that matches anything (a cluster name, a backend address).
_ANY = None

# (path segments, {method: handler name}, needs the token).  The dashboard
# page holds no data (it fetches everything with the token), and probes
# reveal only that the process is alive and ready, so these three answer
# without a token: a browser cannot attach one to a page load, and
# Kubernetes or load-balancer probes should not need the secret.
_ROUTES = (
    (("",), {b"GET": "_dashboard"}, False),
    (("healthz",), {b"GET": "_healthz"}, False),
    (("ready",), {b"GET": "_ready"}, False),
    (("metrics",), {b"GET": "_metrics"}, True),
    (("stats",), {b"GET": "_stats"}, True),
    (("clusters",), {b"GET": "_clusters"}, True),
    (("clusters", _ANY, "backends", _ANY, "drain"), {b"POST": "_drain"}, True),
    (("clusters", _ANY, "backends", _ANY, "enable"), {b"POST": "_enable"}, True),
    (("reload",), {b"POST": "_reload"}, True),
    (("config",), {b"GET": "_config"}, True),
)


def _match(segments: list[str]):
    """
    The route of ``segments`` and the values of its wildcards, or
    ``(None, ())``.
    """
    for pattern, methods, protected in _ROUTES:
        if len(pattern) != len(segments):
            continue
        captured = []
        for want, got in zip(pattern, segments, strict=True):
            if want is _ANY:
                if not got:
                    break
                captured.append(got)
            elif want != got:
                break
        else:
            return (methods, protected), tuple(captured)
    return None, ()


def _segments(request: Request) -> list[str]:
    """The request's path segments, percent-decoded; no trailing empty one."""
    segments = [unquote_to_bytes(s).decode("utf-8", "replace") for s in request.postpath]
    if len(segments) > 1 and segments[-1] == "":
        segments.pop()
    return segments


def _json_body(document) -> bytes:
    return json.dumps(document, indent=2).encode("utf-8") + b"\n"


class AdminResource(Resource):
    """
    Every path of the admin API (see the README, "Admin API").

    :ivar target: The :class:`~balance.admin.IAdminTarget` the API reads
        and drives.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, target, token: bytes | None = None):
        """
        :param target: The running process, an ``IAdminTarget`` provider.
        :param token: The bearer token requests must carry, or ``None`` to
            accept requests without one.
        """
        super().__init__()
        self.target = target
        self._token = token

    def render(self, request: Request):
        """
        Authenticate, dispatch and answer ``request``.

        :return: The body, or ``NOT_DONE_YET`` while a reload runs.
        """
        request.setHeader(b"server", b"balance")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        segments = _segments(request)
        route, captured = _match(segments)
        protected = route is None or route[1]
        if protected and not self._authorized(request):
            request.setHeader(b"www-authenticate", b'Bearer realm="balance admin"')
            return self._error(request, http.UNAUTHORIZED, "a valid bearer token is required")
        if route is None:
            return self._error(
                request, http.NOT_FOUND, f"no admin resource at /{'/'.join(segments)}"
            )
        methods = route[0]
        method = b"GET" if request.method == b"HEAD" else request.method
        handler = methods.get(method)
        if handler is None:
            allowed = sorted(methods)
            if b"GET" in methods:
                allowed.append(b"HEAD")
            request.setHeader(b"allow", b", ".join(allowed))
            return self._error(
                request,
                http.NOT_ALLOWED,
                f"method {request.method.decode('latin-1')} is not allowed here; "
                f"use {b', '.join(allowed).decode('ascii')}",
            )
        if method == b"POST" and self._cross_site(request):
            return self._error(
                request, http.FORBIDDEN, "cross-site requests may not change anything"
            )
        return getattr(self, handler)(request, *captured)

    def set_token(self, token: bytes | None) -> None:
        """
        Require ``Authorization: Bearer <token>`` from now on (or, with
        ``None``, no token).
        """
        self._token = token

    # -- checks ---------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        header = request.getHeader(b"authorization")
        if header is None:
            return False
        scheme, _, credentials = header.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(credentials.strip(), self._token)

    @staticmethod
    def _cross_site(request: Request) -> bool:
        """
        Whether a browser sent ``request`` from a page of another origin.

        Without a token, any web page the operator visits could otherwise
        make the browser POST a drain to the loopback admin port (a form
        needs no CORS preflight).  Browsers say where a request comes from
        in ``Origin`` and ``Sec-Fetch-Site``; non-browser clients send
        neither and pass.
        """
        if request.getHeader(b"sec-fetch-site") in (b"cross-site", b"same-site"):
            return True
        origin = request.getHeader(b"origin")
        if origin is None:
            return False
        netloc = urlsplit(origin.decode("latin-1")).netloc.encode("latin-1")
        return origin == b"null" or netloc != (request.getHeader(b"host") or b"")

    # -- answers --------------------------------------------------------------------------

    def _json(self, request: Request, document, code: int = http.OK) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", _JSON)
        return _json_body(document)

    def _error(self, request: Request, code: int, message: str) -> bytes:
        return self._json(request, {"error": message}, code)

    def _text(self, request: Request, text: str, code: int = http.OK) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", _TEXT)
        return text.encode("utf-8")

    # -- handlers (named in _ROUTES) ------------------------------------------------------

    def _dashboard(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", dashboard.CONTENT_SECURITY_POLICY)
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"referrer-policy", b"no-referrer")
        return dashboard.PAGE

    def _healthz(self, request: Request) -> bytes:
        return self._text(request, "ok\n")

    def _ready(self, request: Request) -> bytes:
        target = self.target
        if target.draining:
            return self._text(request, "draining\n", http.SERVICE_UNAVAILABLE)
        if not target.ready:
            return self._text(request, "not ready\n", http.SERVICE_UNAVAILABLE)
        return self._text(request, "ready\n")

    def _metrics(self, request: Request) -> bytes:
        metrics = self.target.metrics
        if metrics is None:
            return self._error(request, http.NOT_FOUND, "this process keeps no metrics")
        request.setHeader(b"content-type", METRICS_CONTENT_TYPE.encode("ascii"))
        return metrics.render()

    def _stats(self, request: Request) -> bytes:
        t = self.target
        return self._json(
            request, views.stats_view(t.config, t.clusters, t.metrics, t.ready, t.draining)
        )

    def _clusters(self, request: Request) -> bytes:
        return self._json(request, views.clusters_view(self.target.clusters))

    def _config(self, request: Request) -> bytes:
        return self._json(request, views.config_view(self.target.config))

    def _drain(self, request: Request, cluster: str, address: str) -> bytes:
        return self._set_drained(request, cluster, address, True)

    def _enable(self, request: Request, cluster: str, address: str) -> bytes:
        return self._set_drained(request, cluster, address, False)

    def _set_drained(self, request: Request, name: str, address: str, drained: bool) -> bytes:
        cluster = self.target.clusters.get(name)
        if cluster is None:
            return self._error(request, http.NOT_FOUND, f"no cluster named {name!r}")
        # A configured host:port stands for every address its name resolved
        # to; a backend's unique name picks one of them.
        backends = cluster.backends_at(address) or tuple(
            b for b in cluster.backends if b.name == address
        )
        if not backends:
            return self._error(
                request, http.NOT_FOUND, f"cluster {name!r} has no backend {address!r}"
            )
        for backend in backends:
            backend.drained = drained
        self.log.info(
            "admin API: {action} backend {address} of cluster {cluster}",
            action="drained" if drained else "enabled",
            address=address,
            cluster=name,
        )
        return self._json(
            request,
            {
                "cluster": name,
                "address": address,
                "drained": drained,
                "backends": [views.backend_view(b) for b in backends],
            },
        )

    def _reload(self, request: Request):
        values = request.args.get(b"dry_run", [b"0"])
        value = values[-1].decode("latin-1").strip().lower()
        if value not in _TRUE and value not in _FALSE:
            return self._error(request, http.BAD_REQUEST, f"dry_run must be 1 or 0, got {value!r}")
        dry_run = value in _TRUE
        reload = self.target.reload
        if reload is None:
            return self._error(
                request, http.NOT_IMPLEMENTED, "this process cannot reload its config"
            )
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        (
            maybeDeferred(reload, dry_run)
            .addCallback(self._reloaded, dry_run)
            .addErrback(self._reload_failed, dry_run)
            .addCallback(self._finish, request, gone)
            .addErrback(self._answer_failed, request, gone)
        )
        return NOT_DONE_YET

    def _reloaded(self, result, dry_run: bool) -> tuple[int, dict]:
        if not isinstance(result, dict):
            raise TypeError(f"reload() answered {type(result).__name__}, not a dict")
        answer = {"ok": bool(result.get("ok")), "dry_run": dry_run, "errors": [], **result}
        return (http.OK if answer["ok"] else http.BAD_REQUEST), answer

    def _reload_failed(self, reason: Failure, dry_run: bool) -> tuple[int, dict]:
        if reason.check(ConfigError):
            errors = list(reason.value.errors)
            return http.BAD_REQUEST, {"ok": False, "dry_run": dry_run, "errors": errors}
        self.log.failure("config reload through the admin API failed", reason)
        message = f"reload failed: {reason.getErrorMessage()} (details in the log)"
        return http.INTERNAL_SERVER_ERROR, {"ok": False, "dry_run": dry_run, "errors": [message]}

    def _finish(self, answer: tuple[int, dict], request: Request, gone: list[bool]) -> None:
        if gone:
            # The client hung up; the reload itself went ahead.
            return
        code, document = answer
        body = self._json(request, document, code)
        request.write(body)
        request.finish()

    def _answer_failed(self, reason: Failure, request: Request, gone: list[bool]) -> None:
        # For example a reloader's answer that is not JSON-serialisable.
        self.log.failure("answering a config reload request failed", reason)
        if not gone and not request.finished:
            request.write(
                self._error(
                    request, http.INTERNAL_SERVER_ERROR, "reload answer failed; see the log"
                )
            )
            request.finish()
