"""
Tests for L{balance.config.validate}: every class of config error is reported
as C{FILE:LINE: key.path: what was expected, got what}, all at once.
"""

import textwrap

from twisted.trial import unittest

from balance.config import model
from balance.config.load import load_text
from balance.config.validate import ConfigError, load_config, validate

GOOD = """\
listeners:
  - name: web
    listen: "tcp:8080:interface=127.0.0.1"
    protocol: tcp
    cluster: demo
clusters:
  - name: demo
    backends:
      - {address: "127.0.0.1:9001"}
      - {address: "127.0.0.1:9002", weight: 3}
"""


def check(text: str) -> model.Config:
    return validate(load_text(textwrap.dedent(text), "t.yaml"), "t.yaml")


class ValidTests(unittest.TestCase):
    def test_load_balancing(self):
        """Every lb policy, sticky cookies and slow start are accepted."""
        for lb in ("round_robin", "weighted_round_robin", "least_connections", "random",
                   "power_of_two", "peak_ewma"):
            config = check(GOOD + f"    lb: {lb}\n    sticky_cookie: srv\n    slow_start: 30s\n")
            cluster = config.cluster("demo")
            self.assertEqual((cluster.lb, cluster.sticky_cookie, cluster.slow_start),
                             (lb, "srv", 30.0))
        for lb in ("ring_hash", "maglev", "consistent_hash_bounded"):
            config = check(GOOD + f"    lb: {lb}\n    hash_on: cookie:user\n    bounded_load: 1.5\n")
            self.assertEqual(config.cluster("demo").hash_on, "cookie:user")

    def test_model(self):
        """A valid file becomes frozen model objects with defaults filled in."""
        config = check(GOOD + "whoami:\n  - {name: a, listen: 'tcp:9001'}\n")
        [listener] = config.listeners
        self.assertEqual(listener.name, "web")
        self.assertEqual(listener.protocol, "tcp")
        self.assertEqual(listener.timeouts.idle, 60.0)
        self.assertEqual(config.cluster("demo").connect_timeout, 2.0)
        self.assertEqual(
            config.cluster("demo").backends[1],
            model.Backend(address="127.0.0.1:9002", host="127.0.0.1", port=9002, weight=3),
        )
        self.assertEqual(config.whoami, (model.Whoami(name="a", listen="tcp:9001"),))
        self.assertEqual(config.drain_timeout, 30.0)
        self.assertRaises(AttributeError, setattr, listener, "name", "x")
        self.assertRaises(KeyError, config.cluster, "nope")

    def test_shorthand_and_ipv6(self):
        config = check(
            """\
            listeners: [{name: l, listen: "tcp6:8080", protocol: tcp, cluster: c}]
            clusters:
              - name: c
                connect_timeout: 250ms
                backends: ["[::1]:9001", "backend.internal:80"]
            """
        )
        self.assertEqual(
            [(b.host, b.port) for b in config.clusters[0].backends],
            [("::1", 9001), ("backend.internal", 80)],
        )
        self.assertEqual(config.clusters[0].connect_timeout, 0.25)

    def test_workers_auto(self):
        config = validate(load_text(GOOD + "workers: 1\n"), "t.yaml")
        self.assertEqual(config.workers, 1)

    def test_unix_and_systemd(self):
        check(
            """\
            listeners:
              - {name: a, listen: "unix:/tmp/balance.sock", protocol: tcp, cluster: c}
              - {name: b, listen: "systemd:domain=INET:index=0", protocol: tcp, cluster: c}
            clusters: [{name: c, backends: ["127.0.0.1:1"]}]
            """
        )


    def test_observability(self):
        """tracing, access_log on a tcp listener and max_connections_per_ip are accepted."""
        config = check(
            GOOD.replace(
                "protocol: tcp",
                "protocol: tcp\n    access_log: {path: /tmp/x.log, format: combined}"
                "\n    limits: {max_connections_per_ip: 8}",
            )
            + 'tracing: {service_name: edge, sample_ratio: 0.5, otlp_endpoint: "http://c:4318"}\n'
        )
        self.assertEqual(config.listeners[0].limits.max_connections_per_ip, 8)
        self.assertEqual(config.listeners[0].access_log.format, "combined")
        self.assertEqual(
            config.tracing, model.Tracing("edge", 0.5, "http://c:4318")
        )


class ErrorTests(unittest.TestCase):
    def test_tracing(self):
        """A collector that is not an http(s) URL, or a ratio out of range, is refused."""
        errors = self.errors(GOOD + "tracing: {sample_ratio: 2, otlp_endpoint: c:4318}\n")
        self.assertEqual(len(errors), 2, errors)
        self.assertIn("tracing.sample_ratio", errors[0])
        self.assertIn('tracing.otlp_endpoint: expected a URL such as "http://127.0.0.1:4318"', errors[1])

    def errors(self, text: str) -> list[str]:
        e = self.assertRaises(ConfigError, check, text)
        return e.errors

    def test_unknown_key(self):
        self.assertEqual(
            self.errors(GOOD + "  - name: other\n    backend: []\n"),
            [
                "t.yaml:11: clusters[1].backends: required key is missing",
                't.yaml:12: clusters[1].backend: unknown key (did you mean "backends"?); '
                "expected one of: name, lb, hash_on, bounded_load, sticky_cookie, slow_start, "
                "backends, upstream_protocol, tls, connect_timeout, pool, health_check, "
                "outlier_detection, panic_threshold, circuit_breaker, send_proxy_protocol",
            ],
        )

    def test_top_level_unknown_key(self):
        [error] = self.errors(GOOD + "listener: []\n")
        self.assertTrue(
            error.startswith('t.yaml:11: listener: unknown key (did you mean "listeners"?)'),
            error,
        )

    def test_wrong_types(self):
        self.assertEqual(
            self.errors(
                """\
                listeners: {name: web}
                clusters:
                  - name: [demo]
                    backends: "127.0.0.1:9001"
                    connect_timeout: 5
                whoami: 3
                """
            ),
            [
                "t.yaml:1: listeners: expected a list, got a mapping",
                "t.yaml:3: clusters[0].name: expected a name of letters, digits, "
                "'.', '_' or '-', got a list",
                't.yaml:4: clusters[0].backends: expected a list, got "127.0.0.1:9001"',
                "t.yaml:5: clusters[0].connect_timeout: expected a duration such as "
                '"250ms", "5s", "2m" or "1h", got 5',
                "t.yaml:6: whoami: expected a list, got 3",
            ],
        )

    def test_bad_durations(self):
        errors = self.errors(GOOD + "    connect_timeout: 0s\n" + "drain_timeout: soon\n")
        self.assertEqual(
            errors,
            [
                't.yaml:11: clusters[0].connect_timeout: expected a duration above zero, got "0s"',
                't.yaml:12: drain_timeout: expected a duration such as "250ms", "5s", '
                '"2m" or "1h", got "soon"',
            ],
        )

    def test_bad_endpoint(self):
        errors = self.errors(GOOD.replace('"tcp:8080:interface=127.0.0.1"', '"tpc:8080"'))
        self.assertEqual(
            errors,
            [
                "t.yaml:3: listeners[0].listen: expected a Twisted server endpoint such as "
                '"tcp:8080:interface=127.0.0.1" (Unknown endpoint type: \'tpc\'), got "tpc:8080"'
            ],
        )

    def test_bad_endpoint_option(self):
        [error] = self.errors(GOOD.replace("interface=127.0.0.1", "iface=127.0.0.1"))
        self.assertIn("(unknown option iface)", error)

    def test_port_out_of_range(self):
        [error] = self.errors(GOOD.replace('"tcp:8080:', '"tcp:80800:'))
        self.assertIn("(port out of range)", error)

    def test_bad_systemd(self):
        [error] = self.errors(GOOD.replace('"tcp:8080:interface=127.0.0.1"', '"systemd:index=0"'))
        self.assertIn("systemd endpoints need domain=INET, INET6 or UNIX", error)

    def test_bad_addresses(self):
        errors = self.errors(
            GOOD.replace('"127.0.0.1:9001"', '"foo"').replace('"127.0.0.1:9002"', '"[::1]:0"')
        )
        self.assertEqual(
            errors,
            [
                't.yaml:9: clusters[0].backends[0].address: expected "host:port", got "foo"',
                't.yaml:10: clusters[0].backends[1].address: expected "host:port", got "[::1]:0"',
            ],
        )

    def test_duplicate_names(self):
        errors = self.errors(
            GOOD
            + "  - name: demo\n    backends: ['127.0.0.1:1']\n"
            + "whoami:\n  - {name: a, listen: 'tcp:9001'}\n  - {name: a, listen: 'tcp:9002'}\n"
        )
        self.assertEqual(
            errors,
            [
                't.yaml:11: clusters[1].name: duplicate name "demo", already used by clusters[0]',
                't.yaml:15: whoami[1].name: duplicate name "a", already used by whoami[0]',
            ],
        )

    def test_duplicate_key(self):
        [error] = self.errors(GOOD + "    lb: round_robin\n    lb: round_robin\n")
        self.assertEqual(error, "t.yaml:12: clusters[0].lb: key given more than once")

    def test_duplicate_listen(self):
        [error] = self.errors(
            GOOD + "whoami:\n  - {name: a, listen: 'tcp:8080:interface=127.0.0.1'}\n"
        )
        self.assertEqual(
            error,
            't.yaml:12: whoami[0].listen: "tcp:8080:interface=127.0.0.1" is already used by '
            "listeners[0]",
        )

    def test_missing_cluster(self):
        [error] = self.errors(GOOD.replace("cluster: demo", "cluster: dmeo"))
        self.assertEqual(
            error,
            't.yaml:5: listeners[0].cluster: expected the name of a cluster, got "dmeo" '
            "(no such cluster)",
        )

    def test_missing_cluster_in_route(self):
        errors = self.errors(
            """\
            listeners:
              - name: web
                listen: "tcp:8080"
                routes:
                  - match: {path_prefix: /}
                    cluster: nope
            clusters: []
            """
        )
        self.assertEqual(
            errors,
            [
                "t.yaml:6: listeners[0].routes[0].cluster: expected the name of a cluster, "
                'got "nope" (no such cluster)'
            ],
        )

    def test_nowhere_to_go(self):
        [error] = self.errors(GOOD.replace("    cluster: demo\n", ""))
        self.assertEqual(
            error,
            "t.yaml:2: listeners[0]: expected a cluster or routes: there is nowhere to send "
            "connections",
        )

    def test_route_actions(self):
        errors = self.errors(
            """\
            listeners:
              - name: web
                listen: "tcp:8080"
                routes:
                  - match: {path: /a}
                  - match: {path: /b}
                    cluster: c
                    redirect: {location: "https://x/"}
            clusters: [{name: c, backends: ["127.0.0.1:1"]}]
            """
        )
        self.assertEqual(
            errors,
            [
                "t.yaml:5: listeners[0].routes[0]: expected exactly one of cluster, "
                "direct_response, redirect, got none",
                "t.yaml:6: listeners[0].routes[1]: expected exactly one of cluster, "
                "direct_response, redirect, got cluster, redirect",
            ],
        )

    def test_tcp_routes(self):
        errors = self.errors(
            GOOD.replace(
                "    cluster: demo\n",
                "    cluster: demo\n    routes: [{match: {host: a.com}, cluster: demo}]\n",
                1,
            )
        )
        self.assertEqual(
            errors,
            [
                "t.yaml:6: listeners[0].routes[0].match: expected exactly {sni: NAME} "
                "on a tcp listener's route"
            ],
        )

    def test_hash_policy_needs_key(self):
        [error] = self.errors(GOOD + "    lb: maglev\n")
        self.assertEqual(
            error,
            "t.yaml:11: clusters[0].lb: policy maglev needs hash_on "
            "(client_ip | header:NAME | cookie:NAME | path)",
        )

    def test_slow_start_not_for_hash_policies(self):
        """slow_start with a hash policy is refused: ramps would move keys."""
        [error] = self.errors(GOOD + "    lb: maglev\n    hash_on: path\n    slow_start: 30s\n")
        self.assertEqual(
            error,
            "t.yaml:13: clusters[0].slow_start: slow_start does not apply to policy maglev, "
            "which hashes keys to backends; use a policy that balances by weight or load, "
            "or slow_start: 0s",
        )

    def test_sticky_cookie_name(self):
        """A sticky cookie name must be a valid cookie name."""
        [error] = self.errors(GOOD + '    sticky_cookie: "my cookie"\n')
        self.assertEqual(
            error,
            "t.yaml:11: clusters[0].sticky_cookie: expected a cookie name "
            "(letters, digits and !#$%&'*+-.^_`|~), got \"my cookie\"",
        )

    def test_choices(self):
        errors = self.errors(GOOD.replace("protocol: tcp", "protocol: udp") + "    lb: fastest\n")
        self.assertEqual(
            errors,
            [
                't.yaml:4: listeners[0].protocol: expected one of tcp | http, got "udp"',
                "t.yaml:11: clusters[0].lb: expected one of round_robin | weighted_round_robin "
                "| least_connections | random | power_of_two | peak_ewma | ring_hash | maglev "
                '| consistent_hash_bounded, got "fastest"',
            ],
        )

    def test_percent_and_sizes(self):
        errors = self.errors(
            GOOD + "    panic_threshold: 150%\n" + "    circuit_breaker: {max_connections: 0}\n"
        )
        self.assertEqual(
            errors,
            [
                "t.yaml:11: clusters[0].panic_threshold: expected a percentage from 0% to "
                '100%, got "150%"',
                "t.yaml:12: clusters[0].circuit_breaker.max_connections: expected an integer "
                ">= 1, got 0",
            ],
        )

    def test_all_errors_at_once(self):
        """Errors in several sections are all reported, in file order."""
        errors = self.errors(
            """\
            listeners:
              - name: web
                listen: "tcp:x"
                protocol: tcp
                cluster: missing
            clusters:
              - name: c
                backends: ["nope"]
            whoami:
              - {name: w}
            """
        )
        self.assertEqual([e.split(":")[1] for e in errors], ["3", "5", "8", "10"])

    def test_not_a_mapping(self):
        [error] = self.errors("- a\n- b\n")
        self.assertEqual(error, "t.yaml:1: expected a mapping, got a list")

    def test_empty(self):
        [error] = self.errors("")
        self.assertEqual(error, "t.yaml:1: listeners: expected at least one listener")

    def test_unsupported(self):
        """
        Contract keys of features this version lacks are refused by name,
        never silently ignored.
        """
        [error] = self.errors(GOOD + "    send_proxy_protocol: v2\n    tls: {verify: false}\n")
        self.assertEqual(
            error,
            "t.yaml:11: clusters[0].send_proxy_protocol: send_proxy_protocol together with "
            "cluster tls is not implemented in this version of Balance",
        )

    def test_proxy_protocol(self):
        """
        proxy_protocol and send_proxy_protocol (v1, v2) are accepted, and
        workers N or auto.
        """
        config = check(
            GOOD.replace("protocol: tcp", "protocol: tcp\n    proxy_protocol: true")
            + "    send_proxy_protocol: v2\nworkers: auto\n"
        )
        self.assertTrue(config.listeners[0].proxy_protocol)
        self.assertEqual(config.cluster("demo").send_proxy_protocol, "v2")
        self.assertEqual(config.workers, 0)

    def test_send_proxy_protocol_tls(self):
        """A PROXY header cannot go before backend TLS in this version: refused by name."""
        [error] = self.errors(GOOD + "    send_proxy_protocol: v1\n    tls: {verify: false}\n")
        self.assertEqual(
            error,
            "t.yaml:11: clusters[0].send_proxy_protocol: send_proxy_protocol together with "
            "cluster tls is not implemented in this version of Balance",
        )

    def test_websocket(self):
        """
        WebSocket routes validate; a message limit needs websocket: true
        and at least a byte.
        """
        config = """\
            listeners:
              - name: web
                listen: "tcp:8080"
                routes:
                  - {match: {path_prefix: "/ws/"}, cluster: c, websocket: true, %s}
            clusters:
              - {name: c, backends: ["127.0.0.1:9001"]}
            """
        model = check(config % "websocket_max_message_bytes: 64KiB")
        route = model.listeners[0].routes[0]
        self.assertEqual((route.websocket, route.websocket_max_message_bytes), (True, 65536))
        [error] = self.errors(
            config.replace("websocket: true", "websocket: false") % "websocket_max_message_bytes: 1"
        )
        self.assertEqual(
            error,
            "t.yaml:5: listeners[0].routes[0].websocket_max_message_bytes: needs websocket: "
            "true on the same route (frame-aware mode of its tunnels)",
        )
        [error] = self.errors(config % "websocket_max_message_bytes: 0")
        self.assertIn("expected at least 1 byte", error)

    def test_load_config_syntax(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("listeners: [\n")
        e = self.assertRaises(ConfigError, load_config, path)
        [error] = e.errors
        self.assertTrue(error.startswith(f"{path}:2: invalid YAML: "), error)


class HealthCheckTypeTests(unittest.TestCase):
    """C{type: grpc} needs an HTTP/2 cluster; C{service} belongs to it."""

    def errors(self, cluster: str) -> list[str]:
        text = (
            "listeners:\n"
            "  - {name: web, listen: 'tcp:8080', cluster: app}\n"
            "clusters:\n"
            "  - name: app\n"
            "    backends: ['127.0.0.1:9000']\n" + cluster
        )
        try:
            validate(load_text(text, "t.yaml"), "t.yaml")
        except ConfigError as e:
            return e.errors
        return []

    def test_grpc(self):
        self.assertEqual(
            self.errors("    upstream_protocol: h2\n    health_check: {type: grpc, service: a.B}\n"), []
        )

    def test_grpc_needs_h2(self):
        self.assertEqual(
            self.errors("    health_check:\n      type: grpc\n"),
            [
                "t.yaml:7: clusters[0].health_check.type: grpc checks speak HTTP/2: "
                "the cluster needs upstream_protocol: h2"
            ],
        )

    def test_service_needs_grpc(self):
        self.assertEqual(
            self.errors("    health_check: {type: http, service: a.B}\n"),
            [
                "t.yaml:6: clusters[0].health_check.service: only grpc checks name a "
                "service, this one is type http"
            ],
        )
