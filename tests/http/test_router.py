"""
Tests for ``balance.http.router``: which route a request gets, and what the
proxy is told to do with it.

Besides examples of each rule, a randomized test compares the compiled router
with a plain linear scan of the config written from CONFIG.md, over many
random route sets and requests, so that indexing can never change which route
wins.
"""

from __future__ import annotations

import random
import re

from twisted.trial.unittest import SynchronousTestCase

from balance.config.model import DirectResponse, HeaderEdits, Match, Redirect, Route
from balance.http.router import Router, RouterError, reason_phrase, split_target


def route(cluster: str = "c", **match) -> Route:
    """A route to ``cluster`` with the given match conditions."""
    return Route(match=Match(**match), cluster=cluster)


def label(router: Router, host=b"example.com", path=b"/", method=b"GET", headers=()):
    """The label of the route ``router`` picks, or ``None``."""
    found = router.match(host, path, method, headers)
    return None if found is None else found.label


def reference(routes, default_cluster, host, path, method, headers):
    """
    The index of the first matching route, by a plain linear scan written
    from CONFIG.md and the router's documented semantics, on text.
    """
    text = host.decode("latin-1")
    if text.startswith("["):
        name = text[: text.find("]") + 1]
        port = text[len(name) + 1 :]
    else:
        name, _, port = text.partition(":")
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    path = path.decode("latin-1")
    method = method.decode("latin-1")
    have = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in headers]
    for i, r in enumerate(routes):
        m = r.match
        if m.host is not None:
            pattern, _, want_port = m.host.lower().partition(":")
            pattern = pattern.rstrip(".")
            if want_port and want_port != port:
                continue
            if pattern.startswith("*."):
                if not (name.endswith(pattern[1:]) and len(name) > len(pattern) - 1):
                    continue
            elif name != pattern:
                continue
        if m.path is not None and path != m.path:
            continue
        if m.path_prefix is not None and not path.startswith(m.path_prefix):
            continue
        if m.path_regex is not None and re.fullmatch(m.path_regex, path) is None:
            continue
        if m.methods and method not in m.methods:
            continue
        if not all((n, v) in have for n, v in m.headers):
            continue
        return i
    return len(routes) if default_cluster is not None else None


ROUTE_HOSTS = [
    "example.com",
    "a.example.com",
    "b.a.example.com",
    "other.org",
    "localhost",
    "*.example.com",
    "*.a.example.com",
    "*.org",
    "example.com:8443",
    "*.example.com:8443",
    "other.org.",
]
REQUEST_HOSTS = [
    b"example.com",
    b"EXAMPLE.com",
    b"example.com:8443",
    b"example.com:80",
    b"example.com.",
    b"a.example.com",
    b"A.Example.Com:8443",
    b"b.a.example.com",
    b"c.b.a.example.com",
    b"x.example.com",
    b"other.org",
    b"www.other.org:8443",
    b"localhost",
    b"localhost:8080",
    b"elsewhere.net",
    b".example.com",
    b"EXAMPLE.COM.:8443",
    b"x.a.example.com.",
    b"[::1]:8443",
    b"127.0.0.1",
    b"",
]
EXACT_PATHS = ["/", "/a", "/a/b", "/api", "/api/v1", "/healthz"]
PREFIXES = ["/", "/a", "/a/", "/api/", "/api/v1/", "/ap", "//", "/healthz"]
REGEXES = [r"/a/[0-9]+", r"/api/.*", r"/(a|b)", r".*z", r"/[a-z]+/"]
REQUEST_PATHS = [
    b"/",
    b"/a",
    b"/a/",
    b"/a/1",
    b"/a/b",
    b"/api",
    b"/api/",
    b"/api/v1/x",
    b"/apix",
    b"/healthz",
    b"//x",
    b"/b",
    b"/z/",
    b"*",
    b"",
]
METHODS = ["GET", "POST", "PUT"]
MATCH_HEADERS = [("x-canary", "1"), ("x-env", "prod"), ("x-canary", "2")]
REQUEST_HEADERS = [
    (b"X-Canary", b"1"),
    (b"x-canary", b"2"),
    (b"X-ENV", b"prod"),
    (b"x-env", b"Prod"),
    (b"Accept", b"*/*"),
]


def random_route(rng: random.Random) -> Route:
    """A route with a random mix of conditions."""
    match = {}
    if rng.random() < 0.5:
        match["host"] = rng.choice(ROUTE_HOSTS)
    kind = rng.randrange(4)
    if kind == 1:
        match["path"] = rng.choice(EXACT_PATHS)
    elif kind == 2:
        match["path_prefix"] = rng.choice(PREFIXES)
    elif kind == 3 and rng.random() < 0.5:
        match["path_regex"] = rng.choice(REGEXES)
    if rng.random() < 0.25:
        match["methods"] = tuple(rng.sample(METHODS, rng.randint(1, 2)))
    if rng.random() < 0.2:
        match["headers"] = tuple(dict(rng.sample(MATCH_HEADERS, rng.randint(1, 2))).items())
    return route(**match)


def random_request(rng: random.Random):
    """A random ``(host, path, method, headers)``."""
    headers = rng.sample(REQUEST_HEADERS, rng.randint(0, 3))
    return (
        rng.choice(REQUEST_HOSTS),
        rng.choice(REQUEST_PATHS),
        rng.choice(METHODS).encode("ascii"),
        headers,
    )


class HostTests(SynchronousTestCase):
    """Routing on the Host header."""

    def test_exact_host_ignores_case_and_port(self):
        """
        A route for api.example.com takes requests for API.Example.COM and for
        api.example.com:8080, but not for other names.
        """
        router = Router((route(host="api.example.com"),))
        self.assertEqual(label(router, b"api.example.com"), "0")
        self.assertEqual(label(router, b"API.Example.COM"), "0")
        self.assertEqual(label(router, b"api.example.com:8080"), "0")
        self.assertEqual(label(router, b"Api.Example.Com:443"), "0")
        self.assertIsNone(label(router, b"www.example.com"))
        self.assertIsNone(label(router, b"example.com"))

    def test_trailing_dot(self):
        """
        The absolute form of a name, with a trailing dot, is the same host,
        in requests and in routes.
        """
        router = Router((route("a", host="api.example.com"), route("b", host="other.org.")))
        self.assertEqual(label(router, b"api.example.com."), "0")
        self.assertEqual(label(router, b"API.example.com.:80"), "0")
        self.assertEqual(label(router, b"other.org"), "1")
        self.assertEqual(label(router, b"other.org."), "1")

    def test_port_in_route(self):
        """
        A route whose host names a port only takes requests whose Host header
        carries that port.
        """
        router = Router(
            (route("tls", host="example.com:8443"), route("wild", host="*.example.com:8443"))
        )
        self.assertEqual(label(router, b"example.com:8443"), "0")
        self.assertEqual(label(router, b"EXAMPLE.COM:8443"), "0")
        self.assertIsNone(label(router, b"example.com"))
        self.assertIsNone(label(router, b"example.com:443"))
        self.assertEqual(label(router, b"a.example.com:8443"), "1")
        self.assertIsNone(label(router, b"a.example.com"))

    def test_wildcard_any_depth(self):
        """
        *.example.com takes every subdomain, however deep, in any case and
        with any port.
        """
        router = Router((route(host="*.example.com"),))
        for host in (
            b"a.example.com",
            b"a.b.example.com",
            b"x.y.z.example.com",
            b"A.EXAMPLE.com:81",
        ):
            self.assertEqual(label(router, host), "0", host)

    def test_wildcard_not_bare_domain(self):
        """
        *.example.com does not take example.com itself, nor names that merely
        end in the same letters.
        """
        router = Router((route(host="*.example.com"),))
        for host in (b"example.com", b"example.com.", b".example.com", b"badexample.com", b"com"):
            self.assertIsNone(label(router, host), host)

    def test_nested_wildcards(self):
        """
        With *.example.com and *.a.example.com both configured, a name under
        both gets whichever comes first in the config.
        """
        router = Router(
            (route("outer", host="*.example.com"), route("inner", host="*.a.example.com"))
        )
        self.assertEqual(label(router, b"x.a.example.com"), "0")
        router = Router(
            (route("inner", host="*.a.example.com"), route("outer", host="*.example.com"))
        )
        self.assertEqual(label(router, b"x.a.example.com"), "0")
        self.assertEqual(label(router, b"a.example.com"), "1")
        self.assertEqual(label(router, b"x.b.example.com"), "1")

    def test_no_host(self):
        """
        A request without Host (HTTP/1.0), or with an IP literal, only gets
        routes without a host condition.
        """
        router = Router((route(host="*.example.com"), route(host="example.com"), route()))
        self.assertEqual(label(router, b""), "2")
        self.assertEqual(label(router, b"[::1]:8080"), "2")
        self.assertEqual(label(router, b"127.0.0.1:80"), "2")


class OrderTests(SynchronousTestCase):
    """The first matching route wins, whatever the index does."""

    def test_first_match_wins(self):
        """
        Routes for a host, for a wildcard and for any host are tried in config
        order, interleaved as they were written.
        """
        routes = (
            route(host="api.example.com", path="/exact"),
            route(path_prefix="/any/"),
            route(host="*.example.com", path_prefix="/wild/"),
            route(host="api.example.com", path_prefix="/"),
            route(path_prefix="/wild/"),
            route(),
        )
        router = Router(routes)
        self.assertEqual(label(router, b"api.example.com", b"/exact"), "0")
        self.assertEqual(label(router, b"api.example.com", b"/any/x"), "1")
        self.assertEqual(label(router, b"api.example.com", b"/wild/x"), "2")
        self.assertEqual(label(router, b"api.example.com", b"/other"), "3")
        self.assertEqual(label(router, b"www.example.com", b"/wild/x"), "2")
        self.assertEqual(label(router, b"www.example.com", b"/other"), "5")
        self.assertEqual(label(router, b"other.org", b"/wild/x"), "4")
        self.assertEqual(label(router, b"other.org", b"/exact"), "5")

    def test_same_as_linear_scan(self):
        """
        Over many random route sets and random requests, the router picks
        exactly the route a plain top-to-bottom scan of the config picks.
        """
        rng = random.Random(20240611)
        for _ in range(400):
            routes = tuple(random_route(rng) for _ in range(rng.randint(0, 30)))
            default = rng.choice([None, "fallback"])
            router = Router(routes, default)
            for _ in range(60):
                request = random_request(rng)
                found = router.match(*request)
                self.assertEqual(
                    None if found is None else found.index,
                    reference(routes, default, *request),
                    (routes, default, request),
                )

    def test_long_lists_same_as_linear_scan(self):
        """
        Large configs, which the router indexes by the first path segment,
        still pick exactly what a top-to-bottom scan picks.
        """
        rng = random.Random(7)
        segments = ["a", "api", "b", "healthz", "static", "v1", "v2", ""]
        paths = [b"/" + s.encode() + tail for s in segments for tail in (b"", b"/", b"/x", b"x")]
        paths += [b"", b"*", b"//"]
        indexed = 0
        for _ in range(150):
            routes = []
            for _ in range(rng.randint(8, 60)):
                seg = rng.choice(segments)
                kind = rng.random()
                if kind < 0.4:
                    match = {"path_prefix": f"/{seg}/"}
                elif kind < 0.7:
                    match = {"path": f"/{seg}" + rng.choice(["", "/", "/x"])}
                elif kind < 0.8:
                    match = {"path_prefix": f"/{seg}"}
                elif kind < 0.9:
                    match = {"path_regex": f"/{seg}.*"}
                else:
                    match = {}
                if rng.random() < 0.3:
                    match["host"] = rng.choice(["example.com", "*.example.com"])
                if rng.random() < 0.2:
                    match["methods"] = ("POST",)
                routes.append(route(**match))
            routes = tuple(routes)
            router = Router(routes)
            indexed += any(
                segments is not None
                for segments, _ in [router._fallback, *router._by_host.values()]
            )
            for _ in range(80):
                request = (
                    rng.choice([b"example.com", b"www.example.com", b"other.org"]),
                    rng.choice(paths),
                    rng.choice([b"GET", b"POST"]),
                    [],
                )
                found = router.match(*request)
                self.assertEqual(
                    None if found is None else found.index,
                    reference(routes, None, *request),
                    (routes, request),
                )
        # The configs above must actually exercise the segment index.
        self.assertGreater(indexed, 50)


class PathTests(SynchronousTestCase):
    """Routing on the request path."""

    def test_exact_path(self):
        """
        path: /healthz takes /healthz only: not /healthz/, not /HEALTHZ, not
        /healthz/x.
        """
        router = Router((route(path="/healthz"),))
        self.assertEqual(label(router, path=b"/healthz"), "0")
        for path in (b"/healthz/", b"/HEALTHZ", b"/healthz/x", b"/", b""):
            self.assertIsNone(label(router, path=path), path)

    def test_prefix_is_plain_bytes(self):
        """
        path_prefix is a plain byte prefix, as in Envoy: /v1/ does not take
        /v1, and /v1 takes /v1beta too.
        """
        router = Router((route(path_prefix="/v1/"),))
        self.assertEqual(label(router, path=b"/v1/"), "0")
        self.assertEqual(label(router, path=b"/v1/users"), "0")
        self.assertIsNone(label(router, path=b"/v1"))
        router = Router((route(path_prefix="/v1"),))
        for path in (b"/v1", b"/v1/users", b"/v1beta"):
            self.assertEqual(label(router, path=path), "0", path)
        self.assertIsNone(label(router, path=b"/v2"))

    def test_regex_is_full_match(self):
        """
        path_regex must match the whole path, not just its beginning.
        """
        router = Router((route(path_regex=r"/users/[0-9]+"),))
        self.assertEqual(label(router, path=b"/users/42"), "0")
        self.assertIsNone(label(router, path=b"/users/42/posts"))
        self.assertIsNone(label(router, path=b"/x/users/42"))
        self.assertIsNone(label(router, path=b"/users/"))

    def test_regex_compiled_once(self):
        """
        Regular expressions are compiled when the router is built; matching
        requests compiles nothing.
        """
        router = Router((route(path_regex=r"/a/[0-9]+"), route(path_regex=r"/b/.*")))

        def no_compiling(*args, **kwargs):
            raise AssertionError("a regex was compiled while matching")

        self.patch(re, "compile", no_compiling)
        self.patch(re, "_compile", no_compiling)
        self.assertEqual(label(router, path=b"/a/1"), "0")
        self.assertEqual(label(router, path=b"/b/x"), "1")
        self.assertIsNone(label(router, path=b"/c"))

    def test_regex_not_valid_on_bytes(self):
        """
        A pattern that cannot be used on request bytes is refused when the
        router is built, naming the route.
        """
        with self.assertRaises(RouterError) as caught:
            Router((route(path="/"), route(path_regex="(?u)/x")))
        self.assertIn("routes[1].match.path_regex", str(caught.exception))

    def test_sni_refused(self):
        """
        An SNI condition, which means nothing to HTTP routing, is refused
        rather than silently ignored.
        """
        self.assertRaises(RouterError, Router, (route(sni="db.example.com"),))

    def test_split_target(self):
        """
        A request target splits into path and query so that joining them
        gives the target back.
        """
        self.assertEqual(split_target(b"/a/b?x=1&y=/z"), (b"/a/b", b"?x=1&y=/z"))
        self.assertEqual(split_target(b"/a/b"), (b"/a/b", b""))
        self.assertEqual(split_target(b"/a?"), (b"/a", b"?"))
        self.assertEqual(split_target(b"/?a?b"), (b"/", b"?a?b"))


class MethodAndHeaderTests(SynchronousTestCase):
    """Routing on the method and on request headers."""

    def test_methods(self):
        """
        methods: [GET, POST] takes GET and POST, not PUT, and GET does not
        imply HEAD.
        """
        router = Router((route(methods=("GET", "POST")),))
        self.assertEqual(label(router, method=b"GET"), "0")
        self.assertEqual(label(router, method=b"POST"), "0")
        self.assertIsNone(label(router, method=b"PUT"))
        self.assertIsNone(label(router, method=b"HEAD"))
        self.assertIsNone(label(router, method=b"get"))

    def test_header_names_any_case(self):
        """
        A route matching x-canary: 1 takes requests that send X-Canary: 1 or
        X-CANARY: 1; the value must be exact.
        """
        router = Router((route("canary", headers=(("x-canary", "1"),)), route("main")))
        self.assertEqual(label(router, headers=[(b"X-Canary", b"1")]), "0")
        self.assertEqual(label(router, headers=[(b"X-CANARY", b"1")]), "0")
        self.assertEqual(label(router, headers=[(b"x-canary", b"10")]), "1")
        self.assertEqual(label(router, headers=[(b"x-canary", b" 1")]), "1")
        self.assertEqual(label(router, headers=[(b"x-other", b"1")]), "1")
        self.assertEqual(label(router, headers=[]), "1")

    def test_all_headers_must_match(self):
        """
        Every configured header must be present with its value.
        """
        router = Router((route(headers=(("x-a", "1"), ("x-b", "2"))),))
        self.assertEqual(label(router, headers=[(b"X-B", b"2"), (b"X-A", b"1")]), "0")
        self.assertIsNone(label(router, headers=[(b"X-A", b"1")]))

    def test_repeated_header(self):
        """
        When a header is sent several times, one occurrence with the value is
        enough.
        """
        router = Router((route(headers=(("x-env", "prod"),)),))
        self.assertEqual(label(router, headers=[(b"X-Env", b"dev"), (b"x-env", b"prod")]), "0")
        self.assertIsNone(label(router, headers=[(b"X-Env", b"dev"), (b"x-env", b"test")]))

    def test_needs_headers(self):
        """
        The router tells the caller whether, and which, headers matter, and
        does not look at headers when none do.
        """
        router = Router((route(headers=(("X-Canary", "1"),)), route(path="/a")))
        self.assertTrue(router.needs_headers)
        self.assertEqual(router.header_names, frozenset({b"x-canary"}))

        class Untouchable:
            def __iter__(self):
                raise AssertionError("headers were read")

        router = Router((route(path="/a", methods=("GET",)), route(host="example.com")))
        self.assertFalse(router.needs_headers)
        self.assertEqual(router.header_names, frozenset())
        self.assertEqual(label(router, path=b"/a", headers=Untouchable()), "0")


class ActionTests(SynchronousTestCase):
    """What a matched route tells the proxy to do."""

    def test_labels_and_config(self):
        """
        Matched routes carry their config, their position and a label for
        metrics.
        """
        routes = (route("a", path="/a"), Route(match=Match(path="/b"), cluster="b", timeout=1.5))
        router = Router(routes)
        found = router.match(b"x", b"/b", b"GET", ())
        self.assertIs(found.config, routes[1])
        self.assertEqual((found.index, found.label, found.cluster), (1, "1", "b"))
        self.assertEqual((found.timeout, found.status, found.rewrite), (1.5, None, None))
        self.assertIs(router.routes[0].config, routes[0])
        self.assertIn("CompiledRoute 1", repr(found))

    def test_default_cluster(self):
        """
        A listener's cluster takes requests that match no route, after every
        route has had its chance.
        """
        router = Router((route("api", host="api.example.com"),), "web")
        self.assertEqual(router.match(b"api.example.com", b"/", b"GET", ()).cluster, "api")
        found = router.match(b"other.org", b"/x", b"DELETE", ())
        self.assertEqual((found.cluster, found.index, found.label), ("web", 1, "default"))
        self.assertEqual(Router((), "web").match(b"", b"*", b"OPTIONS", ()).cluster, "web")

    def test_no_match(self):
        """
        Without a default cluster, a request no route takes gets None (the
        proxy answers 404).
        """
        router = Router((route(host="api.example.com", path_prefix="/v1/"),))
        self.assertIsNone(label(router, b"api.example.com", b"/v2/"))
        self.assertIsNone(label(router, b"www.example.com", b"/v1/"))
        self.assertIsNone(label(Router(()), b"api.example.com", b"/"))

    def test_rewrite_prefix(self):
        """
        rewrite: {path_prefix: /} on path_prefix: /v1/ sends /v1/users
        upstream as /users, and the target helper keeps the query string.
        """
        found = Router(
            (Route(match=Match(path_prefix="/v1/"), cluster="api", rewrite_path_prefix="/"),)
        ).match(b"", b"/v1/users", b"GET")
        self.assertEqual(found.rewrite(b"/v1/users"), b"/users")
        self.assertEqual(found.rewrite(b"/v1/"), b"/")
        self.assertEqual(found.rewrite(b"/v1/users?x=/v1/"), b"/users?x=/v1/")
        self.assertEqual(found.rewrite(b"/elsewhere"), b"/elsewhere")
        self.assertEqual(found.rewrite_target(b"/v1/users?x=/v1/&y"), b"/users?x=/v1/&y")
        self.assertEqual(found.rewrite_target(b"/v1/?"), b"/?")

    def test_rewrite_is_plain_bytes(self):
        """
        Like the prefix match, the rewrite replaces bytes: prefix /v1 rewritten
        to / turns /v1/users into //users, and /api to /backend turns /apix
        into /backendx.
        """
        rewrite = Route(match=Match(path_prefix="/v1"), cluster="c", rewrite_path_prefix="/")
        self.assertEqual(Router((rewrite,)).routes[0].rewrite(b"/v1/users"), b"//users")
        rewrite = Route(
            match=Match(path_prefix="/api"), cluster="c", rewrite_path_prefix="/backend"
        )
        self.assertEqual(Router((rewrite,)).routes[0].rewrite(b"/apix"), b"/backendx")

    def test_rewrite_exact_path(self):
        """
        With an exact path, the rewrite replaces the whole path.
        """
        found = Router(
            (Route(match=Match(path="/old"), cluster="c", rewrite_path_prefix="/new"),)
        ).routes[0]
        self.assertEqual(found.rewrite_target(b"/old?a=1"), b"/new?a=1")

    def test_no_rewrite(self):
        """
        Routes without a rewrite, or without a prefix to replace, leave
        targets alone.
        """
        plain = Router((route(path_prefix="/v1/"),)).routes[0]
        regex = Router(
            (Route(match=Match(path_regex="/v1/.*"), cluster="c", rewrite_path_prefix="/"),)
        ).routes[0]
        for found in (plain, regex):
            self.assertIsNone(found.rewrite)
            self.assertEqual(found.rewrite_target(b"/v1/x?q"), b"/v1/x?q")

    def test_header_edits(self):
        """
        Header edits are bytes with lower-case names, and the names to remove
        include the names set, so that "set" replaces what the client sent.
        """
        found = Router(
            (
                Route(
                    cluster="c",
                    request_headers=HeaderEdits(set=(("X-Env", "prod"),), remove=("X-Debug",)),
                    response_headers=HeaderEdits(
                        set=(("strict-transport-security", "max-age=63072000"),),
                        remove=("server",),
                    ),
                ),
            )
        ).routes[0]
        self.assertEqual(found.request_set, ((b"x-env", b"prod"),))
        self.assertEqual(found.request_remove, frozenset({b"x-debug", b"x-env"}))
        self.assertEqual(found.request_set_names, frozenset({b"x-env"}))
        self.assertEqual(found.response_set, ((b"strict-transport-security", b"max-age=63072000"),))
        self.assertEqual(
            found.response_remove, frozenset({b"server", b"strict-transport-security"})
        )
        self.assertEqual(found.response_set_names, frozenset({b"strict-transport-security"}))
        self.assertIsNone(found.local_response)
        self.assertIsNone(found.local_reply(head_only=True))


class LocalResponseTests(SynchronousTestCase):
    """Responses Balance answers itself, precomputed as bytes."""

    def test_direct_response(self):
        """
        direct_response: {status: 200, body: "ok\\n", headers: {content-type:
        text/plain}} becomes one ready-to-write response, with a close
        variant and HEAD variants.
        """
        found = Router(
            (
                Route(
                    match=Match(path="/healthz"),
                    direct_response=DirectResponse(
                        status=200, body="ok\n", headers=(("content-type", "text/plain"),)
                    ),
                ),
            )
        ).match(b"example.com", b"/healthz", b"GET")
        self.assertEqual((found.cluster, found.status), (None, 200))
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n"
        self.assertEqual(found.local_response, head + b"\r\nok\n")
        self.assertEqual(found.local_response_close, head + b"connection: close\r\n\r\nok\n")
        self.assertEqual(found.local_reply(), found.local_response)
        self.assertEqual(found.local_reply(close=True), found.local_response_close)
        self.assertEqual(found.local_reply(head_only=True), head + b"\r\n")
        self.assertEqual(
            found.local_reply(head_only=True, close=True), head + b"connection: close\r\n\r\n"
        )

    def test_direct_response_utf8_and_status(self):
        """
        Bodies are sent as UTF-8 with their length in bytes, and the status
        line carries the standard phrase.
        """
        found = Router((Route(direct_response=DirectResponse(status=503, body="café")),)).routes[0]
        self.assertEqual(
            found.local_response,
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\n\r\ncaf\xc3\xa9",
        )

    def test_direct_response_no_content(self):
        """
        A 204 answer has neither body nor Content-Length, whatever the config
        says.
        """
        found = Router((Route(direct_response=DirectResponse(status=204, body="x")),)).routes[0]
        self.assertEqual(found.local_response, b"HTTP/1.1 204 No Content\r\n\r\n")

    def test_framing_headers_are_balances(self):
        """
        Configured Content-Length, Transfer-Encoding and Connection headers
        cannot corrupt the framing of a local response.
        """
        found = Router(
            (
                Route(
                    direct_response=DirectResponse(
                        body="ok",
                        headers=(
                            ("content-length", "99"),
                            ("transfer-encoding", "chunked"),
                            ("connection", "keep-alive"),
                            ("x-ok", "1"),
                        ),
                    )
                ),
            )
        ).routes[0]
        self.assertEqual(
            found.local_response, b"HTTP/1.1 200 OK\r\nx-ok: 1\r\ncontent-length: 2\r\n\r\nok"
        )

    def test_response_headers_apply(self):
        """
        A route's response_headers edits apply to its local response too:
        "set" replaces a configured header, "remove" drops one.
        """
        found = Router(
            (
                Route(
                    direct_response=DirectResponse(
                        body="", headers=(("x-a", "1"), ("x-b", "2"), ("x-c", "3"))
                    ),
                    response_headers=HeaderEdits(set=(("x-a", "new"),), remove=("x-b",)),
                ),
            )
        ).routes[0]
        self.assertEqual(
            found.local_response,
            b"HTTP/1.1 200 OK\r\nx-c: 3\r\nx-a: new\r\ncontent-length: 0\r\n\r\n",
        )

    def test_redirect(self):
        """
        redirect: {status: 301, location: https://example.com/new/} answers a
        301 with that Location and a short text body.
        """
        found = Router(
            (
                Route(
                    match=Match(path_prefix="/old/"),
                    redirect=Redirect(status=301, location="https://example.com/new/"),
                ),
            )
        ).match(b"example.com", b"/old/page", b"GET")
        body = b"Redirecting to https://example.com/new/\n"
        head = (
            b"HTTP/1.1 301 Moved Permanently\r\n"
            b"location: https://example.com/new/\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\n" % len(body)
        )
        self.assertEqual(found.status, 301)
        self.assertEqual(found.local_response, head + b"\r\n" + body)
        self.assertEqual(found.local_response_close, head + b"connection: close\r\n\r\n" + body)
        self.assertEqual(found.local_reply(head_only=True), head + b"\r\n")

    def test_redirect_location_made_ascii(self):
        """
        A location with spaces or non-ASCII characters is percent-encoded;
        existing escapes and URI delimiters are kept.
        """
        found = Router(
            (Route(redirect=Redirect(location="https://ex.com/a b/é?q=1&r=%41#f")),)
        ).routes[0]
        self.assertIn(
            b"\r\nlocation: https://ex.com/a%20b/%C3%A9?q=1&r=%41#f\r\n", found.local_response
        )
        self.assertTrue(found.local_response.startswith(b"HTTP/1.1 302 Found\r\n"))

    def test_reason_phrase(self):
        """
        Status lines use the standard phrases, and "Unknown" for codes
        without one.
        """
        self.assertEqual(reason_phrase(200), b"OK")
        self.assertEqual(reason_phrase(404), b"Not Found")
        self.assertEqual(reason_phrase(308), b"Permanent Redirect")
        self.assertEqual(reason_phrase(599), b"Unknown")
