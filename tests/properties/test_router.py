# -*- test-case-name: tests.properties.test_router -*-
"""
The compiled router agrees with a naive matcher written here from the
documented semantics (L{balance.http.router}), for generated route sets
and requests: the index by host and first path segment never changes which
route a request gets.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from balance.config.model import Match, Route
from balance.http.router import Router

NAMES = ["example.com", "api.example.com", "a.b.example.com", "other.org", "localhost", "x"]
ROUTE_HOSTS = st.one_of(
    st.sampled_from(NAMES),
    st.sampled_from(NAMES).map(lambda n: "*." + n),
    st.tuples(st.sampled_from(NAMES), st.sampled_from(["80", "8443"])).map(":".join),
    st.sampled_from(NAMES).map(lambda n: n + "."),
)
SEGMENTS = st.sampled_from(["", "a", "api", "v1", "b", "healthz", "x.y", "%2F"])
PATHS = st.lists(SEGMENTS, min_size=1, max_size=4).map(lambda s: "/" + "/".join(s))
REGEXES = st.sampled_from([r"/a/[0-9]+", r"/api/.*", r"/(a|b)", r".*z", r"/[a-z]+/", r"/"])
METHODS = ["GET", "POST", "PUT", "HEAD"]
HEADER_PAIRS = st.sampled_from([("x-canary", "1"), ("x-env", "prod"), ("X-Canary", "2")])


@st.composite
def routes(draw):
    match = {}
    if draw(st.booleans()):
        match["host"] = draw(ROUTE_HOSTS).lower()
    kind = draw(st.integers(0, 3))
    if kind == 1:
        match["path"] = draw(PATHS)
    elif kind == 2:
        match["path_prefix"] = draw(PATHS)
    elif kind == 3:
        match["path_regex"] = draw(REGEXES)
    if draw(st.integers(0, 3)) == 0:
        match["methods"] = tuple(draw(st.sets(st.sampled_from(METHODS), min_size=1, max_size=2)))
    if draw(st.integers(0, 4)) == 0:
        match["headers"] = tuple(dict(draw(st.lists(HEADER_PAIRS, min_size=1, max_size=2))).items())
    return Route(match=Match(**match), cluster="c")


@st.composite
def hosts(draw):
    base = draw(
        st.one_of(
            st.sampled_from(NAMES + ["z.example.com", "example.co", ".example.com"]),
            st.sampled_from(["127.0.0.1", "[::1]", ""]),
        )
    )
    if draw(st.booleans()):
        base = "".join(c.upper() if draw(st.booleans()) else c for c in base)
    if base and draw(st.booleans()):
        base = draw(st.sampled_from(["sub.", "a.b."])) + base
    if base and draw(st.booleans()):
        base += "."
    if draw(st.booleans()):
        base += ":" + draw(st.sampled_from(["80", "8443", ""]))
    return base.encode()


REQUEST_HEADERS = st.lists(
    st.sampled_from(
        [(b"X-Canary", b"1"), (b"x-canary", b"2"), (b"X-ENV", b"prod"), (b"x-env", b"Prod"),
         (b"Accept", b"*/*")]
    ),
    max_size=3,
)  # fmt: skip


def naive(routes, default, host: bytes, path: bytes, method: bytes, headers):
    """The index of the first route that matches, by a plain reading of the rules."""
    name, _, port = host.partition(b":")
    name = name.lower()
    if name.endswith(b"."):
        name = name[:-1]
    for i, route in enumerate(routes):
        m = route.match
        if m.host is not None:
            want, _, want_port = m.host.lower().encode().partition(b":")
            want = want.rstrip(b".")
            if want.startswith(b"*."):
                suffix = want[1:]
                if not (name.endswith(suffix) and len(name) > len(suffix)):
                    continue
            elif name != want:
                continue
            if want_port and port != want_port:
                continue
        if m.path is not None and path != m.path.encode():
            continue
        if m.path_prefix is not None and not path.startswith(m.path_prefix.encode()):
            continue
        if m.path_regex is not None and re.fullmatch(m.path_regex.encode(), path) is None:
            continue
        if m.methods and method.decode() not in m.methods:
            continue
        if any(
            not any(n.lower() == hn.lower().encode() and v == hv.encode() for n, v in headers)
            for hn, hv in m.headers
        ):
            continue
        return i
    return len(routes) if default else None


class RouterProperties(SynchronousTestCase):
    @given(
        st.lists(routes(), max_size=25),
        st.booleans(),
        st.lists(
            st.tuples(hosts(), PATHS.map(str.encode), st.sampled_from(METHODS), REQUEST_HEADERS),
            min_size=1,
            max_size=20,
        ),
    )
    def test_agrees_with_naive(self, config_routes, default, requests):
        router = Router(config_routes, "d" if default else None)
        for host, path, method, headers in requests:
            route = router.match(host, path, method.encode(), headers)
            got = None if route is None else route.index
            self.assertEqual(
                got,
                naive(config_routes, default, host, path, method.encode(), headers),
                (host, path, method, headers),
            )
