# -*- test-case-name: tests.properties.test_config -*-
"""
Whatever text a config file holds, loading and validating it either gives a
model or raises errors whose every line is C{FILE:LINE: message}: never a
traceback, never another exception.
"""

from __future__ import annotations

import re

import yaml
from hypothesis import example, given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from balance.config import model
from balance.config.load import ConfigSyntaxError, load_text
from balance.config.validate import ConfigError, validate

PATH = "prop.yaml"
LINE = re.compile(r"^prop\.yaml:\d+: .")

# Every key of the format, so that generated documents reach deep into
# validation rather than stopping at "unknown key".
KEYS = [
    "admin", "listen", "token_file", "workers", "listeners", "name", "protocol",
    "proxy_protocol", "tls", "certificates", "cert", "key", "default_certificate",
    "alpn", "min_version", "client_ca", "client_cert_header", "ocsp_staple", "limits",
    "max_connections", "max_header_bytes", "max_body_bytes", "max_connections_per_ip",
    "allow", "deny", "timeouts", "handshake", "idle", "access_log", "path", "format",
    "cluster", "routes", "match", "host", "path_prefix", "path_regex", "methods",
    "headers", "sni", "rewrite", "request_headers", "response_headers", "set", "remove",
    "timeout", "retry", "attempts", "on", "backoff", "base", "max", "per_try_timeout",
    "budget", "rate_limit", "requests", "per", "burst", "websocket",
    "websocket_max_message_bytes", "direct_response", "status", "body", "redirect",
    "location", "clusters", "lb", "hash_on", "bounded_load", "sticky_cookie",
    "slow_start", "backends", "address", "weight", "upstream_protocol", "verify", "ca",
    "client_cert", "client_key", "connect_timeout", "pool", "max_idle_per_backend",
    "idle_timeout", "health_check", "type", "expect_status", "expect_body", "interval",
    "healthy_threshold", "unhealthy_threshold", "outlier_detection",
    "consecutive_failures", "base_ejection", "max_ejected_percent", "panic_threshold",
    "circuit_breaker", "max_pending", "max_requests", "send_proxy_protocol",
    "rate_limit_store", "redis", "failure_mode", "tracing", "service_name",
    "sample_ratio", "otlp_endpoint", "whoami", "drain_timeout",
]  # fmt: skip

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "tcp:0:interface=127.0.0.1", "tcp:8080", "unix:/x", "systemd:domain=INET:index=0",
            "127.0.0.1:80", "[::1]:80", "a.example:0", "host:99999", "http", "tcp",
            "round_robin", "maglev", "5s", "250ms", "-1s", "1e400s", "10MiB", "1.5", "50%",
            "150%", "*.example.com", "/v1/", "(", "[", "GET", "get", "client_ip",
            "header:x-a", "cookie:", "redis://127.0.0.1:6379/0", "", "\x00", "\u2028",
            "1.2", "1.3", "h2", "v1", "v2",
        ]
    ),
    st.text(max_size=20),
)  # fmt: skip

DOCUMENTS = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children, max_size=6
        ),
    ),
    max_leaves=40,
)

VALID = """\
listeners:
  - name: web
    listen: "tcp:0:interface=127.0.0.1"
    cluster: app
    routes:
      - match: {path_prefix: /v1/, methods: [GET]}
        cluster: app
clusters:
  - name: app
    backends: ["127.0.0.1:9001", {address: "127.0.0.1:9002", weight: 2}]
"""


def check(test: SynchronousTestCase, text: str) -> None:
    """Load and validate C{text}; only a model or well-formed errors may come out."""
    try:
        raw = load_text(text, PATH)
    except ConfigSyntaxError as e:
        lines = str(e).splitlines()
        test.assertEqual(len(lines), 1, str(e))
        test.assertRegex(lines[0], LINE)
        return
    try:
        config = validate(raw, PATH)
    except ConfigError as e:
        test.assertTrue(e.errors)
        for line in e.errors:
            test.assertRegex(line, LINE)
            test.assertNotIn("Traceback", line)
        return
    test.assertIsInstance(config, model.Config)


class LoaderProperties(SynchronousTestCase):
    @given(st.text(max_size=300))
    @example("listeners: [")
    @example("\t- a")
    @example("a: !!python/object:os.system ls")
    @example("&a [*a]")
    @example("a: &x 1\nb: *y")
    @example("a: &a {<<: *a}")
    @example("[" * 3000 + "]" * 3000)
    @example(
        "a: &a [x, x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n"
            for i in range(9)
        )
    )
    @example("<<: 1")
    @example("listeners:\n  - <<: [1, 2]")
    def test_any_text(self, text):
        """Arbitrary text."""
        check(self, text)

    @given(DOCUMENTS)
    def test_any_document(self, document):
        """Arbitrary YAML documents built from the format's own keys."""
        check(self, yaml.safe_dump(document, allow_unicode=True))

    @given(st.data())
    def test_mutated_valid_config(self, data):
        """A valid file with one line replaced, deleted or duplicated."""
        lines = VALID.splitlines()
        i = data.draw(st.integers(0, len(lines) - 1))
        action = data.draw(st.sampled_from(["replace", "delete", "duplicate", "indent"]))
        if action == "replace":
            key = data.draw(st.sampled_from(KEYS))
            value = yaml.safe_dump(data.draw(DOCUMENTS), default_flow_style=True).strip()
            indent = len(lines[i]) - len(lines[i].lstrip())
            lines[i] = " " * indent + f"{key}: {value}"
        elif action == "delete":
            del lines[i]
        elif action == "duplicate":
            lines.insert(i, lines[i])
        else:
            lines[i] = " " + lines[i]
        check(self, "\n".join(lines) + "\n")

    @given(st.lists(st.sampled_from(KEYS), min_size=1, max_size=5), DOCUMENTS)
    def test_nested_under_listener(self, keys, value):
        """Any value at any key path under a listener and a cluster."""
        doc = yaml.safe_load(VALID)
        target = doc["listeners"][0]
        for key in keys[:-1]:
            target = target.setdefault(key, {}) if isinstance(target, dict) else target
            if not isinstance(target, dict):
                break
        if isinstance(target, dict):
            target[keys[-1]] = value
        doc["clusters"][0][keys[0]] = value
        check(self, yaml.safe_dump(doc, allow_unicode=True))
