# -*- test-case-name: tests.http.test_router -*-
"""
HTTP routing: pick the first route of a listener that matches a request.

A ``Router`` is compiled once per config (at load and at every reload) from the
listener's ``routes`` and is then read-only, so it is safe to share. Matching
is pure: no I/O, no logging, no regex compilation. A lower-case Host without
port allocates nothing; other Host values cost a few small bytes objects.

Semantics (CONFIG.md, Envoy where it is silent). Routes are tried in config
order; the first one whose given conditions all hold wins.

  - ``host``: the request's Host header, compared without its port, without a
    trailing dot and case-insensitively. ``"*.example.com"`` matches any
    subdomain at any depth (``a.example.com``, ``a.b.example.com``) but not
    ``example.com`` itself. A port written in the route's host
    (``"example.com:8443"``) must appear, as written, in the Host header. A
    missing or empty Host, or an IP literal, matches only routes without
    ``host``. The port is what follows the first colon: Host values are
    expected to have been checked for syntax before routing.
  - ``path``: exact, case-sensitive comparison with the path as received
    (no percent-decoding, no dot-segment or slash normalisation).
  - ``path_prefix``: a plain byte prefix, as Envoy's ``prefix``: ``"/v1/"``
    matches ``/v1/`` and ``/v1/users`` but not ``/v1``; ``"/v1"`` matches
    ``/v1``, ``/v1/users`` and ``/v1beta``.
  - ``path_regex``: the whole path must match (``re.fullmatch``). The pattern
    is compiled once, as a bytes pattern from its UTF-8 encoding, so classes
    such as ``\\w`` are ASCII-only.
  - ``methods``: the request method is one of them, exactly (``GET`` does not
    imply ``HEAD``).
  - ``headers``: for each configured pair, some header with that name
    (case-insensitive) has exactly that value (case-sensitive, as the parser
    delivered it). When a header appears several times, any one occurrence
    with the value is enough; comma-joined lists are not split.

Config strings (paths, header values, bodies) are encoded as UTF-8. Header
names Balance writes are lower case, as Envoy writes them.

The action data of a route is precomputed in its ``CompiledRoute``: the
cluster, the path rewrite, the header edits, and, for ``direct_response`` and
``redirect``, the complete response bytes.

The compiled form: routes are indexed by exact host into ordered candidate
lists (that host's routes, the wildcard routes that cover it and the routes
without host, in config order). Hosts not in the index use the list of their
longest matching wildcard suffix, which is exact because the wildcards that
match one host always form a chain of suffixes. Long lists are indexed a
second time by the first path segment. A randomized test compares every
answer with a plain linear scan of the config, so the index cannot change
the meaning of a config.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from http import HTTPStatus
from urllib.parse import quote

from balance.config import model

__all__ = [
    "CompiledRoute",
    "Router",
    "RouterError",
    "reason_phrase",
    "split_target",
]

_REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}

# Statuses whose responses carry neither a body nor Content-Length
# (RFC 9110 8.6, 15.3.5, 15.4.5).
_BODYLESS = frozenset({204, 304}) | frozenset(range(100, 200))

# Framing and connection management belong to the proxy, not to the
# headers a user configures on a local response.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})

# How a candidate tests the path; Router.match spells these as literals.
_ANY_PATH = 0
_PREFIX = 1
_EXACT = 2
_REGEX = 3

# Index a candidate list by first path segment only when it is long enough
# for the extra lookup to pay off, and only while the duplication it costs
# (routes that cannot be bucketed appear in every bucket) stays bounded.
_SEGMENT_INDEX_MIN = 8
_SEGMENT_INDEX_GROWTH = 16

# Characters kept as they are when a redirect location is made ASCII.
_URI_SAFE = ":/?#[]@!$&'()*+,;=%~"


class RouterError(ValueError):
    """
    A route cannot be compiled, for example a ``path_regex`` that is a valid
    text pattern but not a valid bytes pattern. The message names the route.
    """


def reason_phrase(status: int) -> bytes:
    """
    The standard reason phrase for a status code.

    :param status: An HTTP status code, such as ``404``.
    :return: The phrase as bytes (``b"Not Found"``), or ``b"Unknown"`` for a
        code without a standard phrase.
    """
    return _REASONS.get(status, b"Unknown")


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """
    Split an origin-form request target into its path and its query.

    :param target: The request target as received, such as ``b"/a/b?x=1"``.
        An absolute-form target must be reduced to origin-form first.
    :return: ``(path, query)`` where ``query`` is everything from the first
        ``?`` on, the ``?`` included, or ``b""``; so ``path + query == target``
        always holds and a rewritten path is rejoined with ``+``.
    """
    i = target.find(b"?")
    if i < 0:
        return target, b""
    return target[:i], target[i:]


class CompiledRoute:
    """
    One route, matched: the original config and everything the proxy needs
    to act on it, precomputed. Read-only once built, shared by all requests.

    :ivar config: The ``model.Route`` it was compiled from (a synthetic one
        with only ``cluster`` set for a listener's default cluster).
    :ivar index: Its position in the listener's routes; the default cluster
        route comes last, at ``len(routes)``.
    :ivar label: The route's name for metrics and access logs: ``"0"``,
        ``"1"``, ... and ``"default"`` for the default cluster route.
    :ivar cluster: The cluster name to forward to, or ``None`` when the route
        answers locally.
    :ivar timeout: The route's ``timeout`` in seconds, or ``None``.
    :ivar rewrite: ``None`` when the route does not rewrite paths, else a
        callable ``rewrite(path) -> bytes`` applying ``rewrite: {path_prefix:
        ...}`` (see ``_rewrite``). It takes a whole target as well, query
        and all, since only the leading matched prefix changes.
    :ivar request_set: ``(name, value)`` pairs to add to the upstream
        request; names are lower-case bytes.
    :ivar request_set_names: The names of ``request_set``, as a frozenset.
    :ivar request_remove: Lower-case header names to drop from the upstream
        request. It already contains ``request_set_names``, so one pass that
        drops these names and then appends ``request_set`` implements "set"
        as "replace".
    :ivar response_set: As ``request_set``, for the downstream response.
    :ivar response_set_names: As ``request_set_names``.
    :ivar response_remove: As ``request_remove``, for the downstream
        response.
    :ivar status: The status code of the local response, or ``None``.
    :ivar local_response: For ``direct_response`` and ``redirect`` routes,
        the whole response as bytes for a keep-alive connection (status line,
        configured headers, then ``response_headers`` edits already applied,
        then ``content-length``, then the body); ``None`` for routes with a
        cluster. Configured ``content-length``, ``transfer-encoding`` and
        ``connection`` headers are dropped (framing is Balance's), and 1xx,
        204 and 304 responses have neither body nor ``content-length``. There
        is no ``Date`` header; ``local_reply`` has the ``HEAD`` variants.
    :ivar local_response_close: The same with ``Connection: close``, for a
        connection the proxy closes after writing it.
    """

    __slots__ = (
        "config",
        "index",
        "label",
        "cluster",
        "timeout",
        "rewrite",
        "request_set",
        "request_set_names",
        "request_remove",
        "response_set",
        "response_set_names",
        "response_remove",
        "status",
        "local_response",
        "local_response_close",
        "_replies",
        "_strip",
        "_rewrite_to",
        # Filled in by the listener that owns the router: the route's metrics
        # handle, rate limiter and address ACL (None when not configured).
        "metrics",
        "limiter",
        "acl",
    )

    def __init__(self, config: model.Route, index: int, label: str | None = None) -> None:
        """
        :param config: The validated route.
        :param index: Its position in the listener's routes.
        :param label: Its name for metrics; ``str(index)`` by default.
        """
        self.config = config
        self.index = index
        self.metrics = None
        self.limiter = None
        self.acl = None
        self.label = str(index) if label is None else label
        self.cluster = config.cluster
        self.timeout = config.timeout
        self.request_set, self.request_remove = _edits(config.request_headers)
        self.request_set_names = frozenset(name for name, _ in self.request_set)
        self.response_set, self.response_remove = _edits(config.response_headers)
        self.response_set_names = frozenset(name for name, _ in self.response_set)

        match = config.match
        self._strip = None
        self._rewrite_to = None
        if config.rewrite_path_prefix is not None:
            # With an exact path the "matched prefix" is the whole path, as
            # in Envoy; without a path or prefix there is nothing to replace.
            matched = match.path_prefix if match.path_prefix is not None else match.path
            if matched is not None:
                self._strip = matched.encode("utf-8")
                self._rewrite_to = config.rewrite_path_prefix.encode("utf-8")
        self.rewrite = None if self._strip is None else self._rewrite

        self._replies = None
        self.status = None
        if config.direct_response is not None:
            self.status = config.direct_response.status
            self._replies = _local_replies(
                config.direct_response.status,
                _encode_pairs(config.direct_response.headers),
                config.direct_response.body.encode("utf-8"),
                self.response_set,
                self.response_remove,
            )
        elif config.redirect is not None:
            self.status = config.redirect.status
            location = quote(config.redirect.location, safe=_URI_SAFE).encode("ascii")
            self._replies = _local_replies(
                config.redirect.status,
                (
                    (b"location", location),
                    (b"content-type", b"text/plain; charset=utf-8"),
                ),
                b"Redirecting to " + location + b"\n",
                self.response_set,
                self.response_remove,
            )
        if self._replies is None:
            self.local_response = self.local_response_close = None
        else:
            self.local_response, self.local_response_close = self._replies[:2]

    def _rewrite(self, path: bytes) -> bytes:
        """
        Apply the route's ``rewrite: {path_prefix: ...}`` to a request path;
        callers reach it as ``rewrite``, which is ``None`` for routes that
        do not rewrite.

        The matched ``path_prefix`` (or, for a route with an exact ``path``,
        the whole path) is replaced by the configured prefix as plain bytes:
        prefix ``/v1/`` rewritten to ``/`` turns ``/v1/users`` into
        ``/users``, while prefix ``/v1`` rewritten to ``/`` turns it into
        ``//users`` (as in Envoy). Routes with only ``path_regex`` or no
        path condition have nothing to replace: their ``rewrite`` is
        ``None``.

        :param path: The request path (``split_target``), or the whole
            target: the query after the prefix is kept as it is.
        :return: The path (or target) to send upstream; ``path`` itself when
            it does not start with the matched prefix.
        """
        strip = self._strip
        if strip is None or not path.startswith(strip):
            return path
        return self._rewrite_to + path[len(strip) :]

    def rewrite_target(self, target: bytes) -> bytes:
        """
        ``rewrite`` for a whole origin-form target, keeping its query string
        byte for byte: ``/v1/users?x=1`` becomes ``/users?x=1``. Safe to call
        on every route: targets of routes without rewrite come back as they
        are.

        :param target: The request target as received.
        :return: The target to send upstream.
        """
        if self._strip is None:
            return target
        path, query = split_target(target)
        return self._rewrite(path) + query

    def local_reply(self, head_only: bool = False, close: bool = False) -> bytes | None:
        """
        The local response, in the variant a request needs.

        :param head_only: The request is ``HEAD``: the same status line and
            headers (``Content-Length`` included) without the body.
        :param close: Add ``Connection: close``.
        :return: The bytes to write, or ``None`` for a route with a cluster.
        """
        if self._replies is None:
            return None
        return self._replies[2 * head_only + close]

    def __repr__(self) -> str:
        return f"<CompiledRoute {self.label} {self.config!r}>"


class Router:
    """
    The compiled, read-only routing table of one HTTP listener.

    :ivar routes: The ``CompiledRoute`` objects in config order, the default
        cluster route (if any) last.
    :ivar needs_headers: Whether any route matches on request headers. When
        it is false, ``match`` never looks at its ``headers`` argument and
        callers may pass ``()``.
    :ivar header_names: The lower-case names of the headers routes match on.
    """

    __slots__ = (
        "routes",
        "needs_headers",
        "header_names",
        "_by_host",
        "_wildcards",
        "_wildcard_suffixes",
        "_fallback",
        "_host_free",
    )

    def __init__(self, routes: Sequence[model.Route], default_cluster: str | None = None) -> None:
        """
        :param routes: The listener's routes, validated, in config order.
        :param default_cluster: The listener's ``cluster``, if it has one:
            requests that match no route go there, as if a last route without
            conditions named it.
        :raise RouterError: If a route cannot be compiled (names the route).
        """
        compiled = [CompiledRoute(route, i) for i, route in enumerate(routes)]
        if default_cluster is not None:
            compiled.append(
                CompiledRoute(model.Route(cluster=default_cluster), len(routes), "default")
            )
        self.routes = tuple(compiled)

        entries = [_Entry(route) for route in self.routes]
        self.header_names = frozenset(name for entry in entries for name, _ in entry.headers)
        self.needs_headers = bool(self.header_names)

        exact = {entry.host for entry in entries if entry.host is not None and not entry.wildcard}
        suffixes = {entry.host for entry in entries if entry.wildcard}
        # Every name is indexed with and without a trailing dot (the
        # absolute form of a name), so requests need no check for it.
        self._by_host = {}
        for host in exact:
            table = _table([e for e in entries if e.host is None or e.covers(host)])
            self._by_host[host] = self._by_host[host + b"."] = table
        # The wildcards matching one host are all suffixes of the longest of
        # them, so that longest suffix determines the whole candidate list.
        self._wildcards = {}
        for suffix in suffixes:
            table = _table(
                [e for e in entries if e.host is None or (e.wildcard and suffix.endswith(e.host))]
            )
            self._wildcards[suffix] = self._wildcards[suffix + b"."] = table
        self._wildcard_suffixes = tuple(self._wildcards)
        self._fallback = _table([e for e in entries if e.host is None])
        self._host_free = not exact and not suffixes

    def match(
        self, host: bytes, path: bytes, method: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> CompiledRoute | None:
        """
        Find the first route that matches a request.

        :param host: The Host header value as received (any case, with or
            without a port, possibly empty), or HTTP/2's ``:authority``.
        :param path: The request path without its query (``split_target``).
        :param method: The request method, such as ``b"GET"``.
        :param headers: The request headers as ``(name, value)`` pairs, names
            in any case. Only read when ``needs_headers`` is true, and then
            possibly more than once, so pass a list or tuple.
        :return: The matching route, or ``None`` when none matches (the
            caller answers 404).
        """
        # Fast path: a lower-case Host without port that names a route.
        table = self._by_host.get(host)
        port = b""
        if table is None:
            if self._host_free:
                table = self._fallback
            else:
                table, port = self._find_host(host)
        segments, candidates = table
        if segments is not None:
            # A path without its leading "/" (such as "*") yields some key
            # too; pinned routes all start with "/" and fail on it anyway.
            end = path.find(b"/", 1)
            candidates = segments.get(path[1:end] if end > 0 else path[1:], candidates)

        # Kinds are literal ints here (see _Entry): global lookups in this
        # loop would cost more than the comparisons themselves.
        for kind, pattern, extra, route in candidates:
            if kind:
                if kind == 1:
                    if not path.startswith(pattern):
                        continue
                elif kind == 2:
                    if path != pattern:
                        continue
                elif pattern(path) is None:
                    continue
            if extra is None:
                return route
            methods, want_port, wanted = extra
            if methods is not None and method not in methods:
                continue
            if want_port is not None and port != want_port:
                continue
            if wanted and not _headers_match(headers, wanted):
                continue
            return route
        return None

    def _find_host(self, host: bytes) -> tuple[tuple, bytes]:
        """
        The slower host lookup, for a Host that is not a plain lower-case
        indexed name: drop the port and lower-case, then try exact names,
        then the longest matching wildcard suffix.

        An IPv6 literal (``[::1]:80``) is cut at its first colon: no route
        host can match it, so it always ends in the host-less routes, which
        never look at the port.

        :return: ``(table, port)``; ``port`` is ``b""`` without one.
        """
        host, _, port = host.partition(b":")
        host = host.lower()
        table = self._by_host.get(host)
        if table is not None:
            return table, port
        if host.endswith(self._wildcard_suffixes):
            wildcards = self._wildcards
            # Dots from the left give suffixes from the longest; a dot at 0
            # would leave an empty label, which no wildcard covers.
            dot = host.find(b".", 1)
            while dot > 0:
                table = wildcards.get(host[dot:])
                if table is not None:
                    return table, port
                dot = host.find(b".", dot + 1)
        return self._fallback, port


def _headers_match(headers, wanted):
    """
    Whether, for every ``(name, value)`` in ``wanted``, some request header has
    that (lower-case) name and exactly that value. Comparing the value first
    means names are only lower-cased for the rare header whose value matches.
    """
    for name, value in wanted:
        for have_name, have_value in headers:
            if have_value == value and have_name.lower() == name:
                break
        else:
            return False
    return True


class _Entry:
    """A route's match conditions, converted to bytes once, while building."""

    __slots__ = ("host", "wildcard", "candidate", "segment", "headers")

    def __init__(self, route: CompiledRoute) -> None:
        match = route.config.match
        where = f"routes[{route.index}].match"
        if match.sni is not None:
            # Ignoring a condition would widen the route silently.
            raise RouterError(f"{where}.sni: SNI routes belong to tcp listeners")

        self.host = None
        self.wildcard = False
        port = None
        if match.host is not None:
            name, _, written_port = match.host.lower().partition(":")
            port = written_port.encode("ascii") if written_port else None
            self.wildcard = name.startswith("*.")
            if self.wildcard:
                name = name[1:]
            self.host = name.rstrip(".").encode("ascii")

        self.segment = None
        if match.path is not None:
            pattern = match.path.encode("utf-8")
            kind = _EXACT
            self.segment = _first_segment(pattern)
        elif match.path_prefix is not None:
            pattern = match.path_prefix.encode("utf-8")
            kind = _PREFIX
            # Only a prefix that contains its whole first segment pins the
            # request's first segment.
            if pattern.find(b"/", 1) > 0:
                self.segment = _first_segment(pattern)
        elif match.path_regex is not None:
            try:
                pattern = re.compile(match.path_regex.encode("utf-8")).fullmatch
            except re.error as e:
                raise RouterError(
                    f"{where}.path_regex: cannot be used on request bytes ({e}): "
                    f"{match.path_regex!r}"
                ) from None
            kind = _REGEX
        else:
            pattern = None
            kind = _ANY_PATH

        methods = frozenset(m.encode("ascii") for m in match.methods) or None
        self.headers = tuple(
            (name.lower().encode("ascii"), value.encode("utf-8")) for name, value in match.headers
        )
        extra = None
        if methods is not None or port is not None or self.headers:
            extra = (methods, port, self.headers)
        self.candidate = (kind, pattern, extra, route)

    def covers(self, host: bytes) -> bool:
        """Whether this route's host condition holds for the bare ``host``."""
        if self.wildcard:
            return host.endswith(self.host) and len(host) > len(self.host)
        return host == self.host


def _first_segment(path: bytes) -> bytes:
    """``b"api"`` for ``b"/api/users"`` and for ``b"/api"``."""
    end = path.find(b"/", 1)
    return path[1:end] if end > 0 else path[1:]


def _table(entries: list[_Entry]) -> tuple[dict | None, tuple]:
    """
    Compile an ordered candidate list into ``(segments, candidates)``:
    ``segments`` maps a first path segment to the ordered sub-list of
    candidates that can match a path with that segment, and is ``None`` when
    a second lookup would not pay off; ``candidates`` is the list for every
    other path: all of them without ``segments``, else only those whose path
    condition does not pin the first segment.
    """
    candidates = tuple(entry.candidate for entry in entries)
    if len(entries) < _SEGMENT_INDEX_MIN:
        return None, candidates
    keys = {entry.segment for entry in entries if entry.segment is not None}
    unpinned = sum(1 for entry in entries if entry.segment is None)
    if len(keys) < 2 or len(keys) * unpinned > _SEGMENT_INDEX_GROWTH * len(entries):
        return None, candidates
    # One pass in config order keeps every bucket in config order.
    buckets = {key: [] for key in keys}
    rest = []
    for entry in entries:
        if entry.segment is None:
            rest.append(entry.candidate)
            for bucket in buckets.values():
                bucket.append(entry.candidate)
        else:
            buckets[entry.segment].append(entry.candidate)
    return {key: tuple(bucket) for key, bucket in buckets.items()}, tuple(rest)


def _edits(edits: model.HeaderEdits) -> tuple[tuple[tuple[bytes, bytes], ...], frozenset[bytes]]:
    """``(set, remove)`` as bytes, ``remove`` including the names set."""
    to_set = _encode_pairs(edits.set)
    remove = frozenset(name.lower().encode("ascii") for name in edits.remove)
    return to_set, remove | {name for name, _ in to_set}


def _encode_pairs(pairs) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((name.lower().encode("ascii"), value.encode("utf-8")) for name, value in pairs)


def _local_replies(status, headers, body, response_set, response_remove):
    """
    The four variants of a local response: ``(keep-alive, close, keep-alive
    head only, close head only)``. The route's ``response_headers`` edits
    apply to it as they would to an upstream response; framing headers are
    always Balance's own.
    """
    if status in _BODYLESS:
        body = b""
    # response_remove holds the names of response_set too: "set" replaces.
    kept = [pair for pair in headers if pair[0] not in response_remove]
    head = [b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))]
    for name, value in kept + list(response_set):
        if name not in _FRAMING:
            head.append(name + b": " + value + b"\r\n")
    if status not in _BODYLESS:
        head.append(b"content-length: %d\r\n" % len(body))
    head = b"".join(head)
    close = head + b"connection: close\r\n\r\n"
    head += b"\r\n"
    return (head + body, close + body, head, close)
