"""
Turn the YAML of a Balance config file into a L{balance.config.model.Config},
or into every error it contains at once, each C{FILE:LINE: key.path: what was
expected, got what}.

Each section is described by a table of fields; a field is a small parser
C{(ctx, value, path, line) -> value} that reports its own errors through the
L{balance.config.fields.Context} and returns L{BAD} when it could not produce a value, so one bad
key does not hide the others.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from balance.config import model
from balance.config.fields import (
    BAD,
    HOSTNAME,
    HTTP_METHODS,
    Context,
    address,
    boolean,
    choice,
    cidr,
    describe,
    duration,
    file_path,
    header_name,
    http_url,
    integer,
    join,
    list_of,
    map_of,
    name,
    nullable,
    number,
    percent,
    positive,
    scalar_text,
    section,
    server_endpoint,
    size,
    string,
    text,
)
from balance.config.load import ConfigSyntaxError, MarkedDict, MarkedList, load_file

LB_POLICIES = (
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "random",
    "power_of_two",
    "peak_ewma",
    "ring_hash",
    "maglev",
    "consistent_hash_bounded",
)
HASH_POLICIES = ("ring_hash", "maglev", "consistent_hash_bounded")
# An RFC 6265 cookie-name: an RFC 7230 token.
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
RETRY_CONDITIONS = ("connect-failure", "reset", "timeout", "5xx", "gateway-error")


class ConfigError(Exception):
    """
    A config file is invalid.

    @ivar errors: One line per problem, C{FILE:LINE: key.path: message},
        in file order.
    """

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


# -- sections ------------------------------------------------------------------


def _backend(ctx, value, path, line):
    if isinstance(value, str):
        # Shorthand: a bare "host:port" string.
        value = MarkedDict(address=value)
        value.key_lines["address"] = line
    parsed = section(
        {"address": address, "weight": integer(minimum=1, maximum=1000)},
        required=("address",),
    )(ctx, value, path, line)
    if parsed is BAD:
        return BAD
    host, port = parsed["address"]
    return model.Backend(
        address=value["address"], host=host, port=port, weight=parsed.get("weight", 1)
    )


_health_check = section(
    {
        "type": choice("http", "tcp", "grpc"),
        "path": string,
        "expect_status": list_of(integer(minimum=100, maximum=599), minimum=1),
        "expect_body": nullable(string),
        "host": nullable(string),
        "interval": duration(positive=True),
        "timeout": duration(positive=True),
        "healthy_threshold": positive(),
        "unhealthy_threshold": positive(),
        "service": nullable(string),
    },
    build=model.HealthCheck,
)

_upstream_tls = section(
    {
        "verify": boolean,
        "ca": nullable(file_path),
        "sni": nullable(string),
        "client_cert": nullable(file_path),
        "client_key": nullable(file_path),
    },
    build=model.UpstreamTLS,
)

_cluster = section(
    {
        "name": name,
        "lb": choice(*LB_POLICIES),
        "hash_on": nullable(string),
        "bounded_load": number(minimum=1.0, exclusive_minimum=True),
        "sticky_cookie": nullable(string),
        "slow_start": duration(),
        "backends": list_of(_backend, minimum=1),
        "upstream_protocol": choice("http/1.1", "h2"),
        "tls": nullable(_upstream_tls),
        "connect_timeout": duration(positive=True),
        "pool": section(
            {"max_idle_per_backend": integer(minimum=0), "idle_timeout": duration(positive=True)},
            build=model.Pool,
        ),
        "health_check": nullable(_health_check),
        "outlier_detection": nullable(
            section(
                {
                    "consecutive_failures": positive(),
                    "base_ejection": duration(positive=True),
                    "max_ejected_percent": percent,
                },
                build=model.OutlierDetection,
            )
        ),
        "panic_threshold": percent,
        "circuit_breaker": section(
            {
                "max_connections": positive(),
                "max_pending": integer(minimum=0),
                "max_requests": positive(),
            },
            build=model.CircuitBreaker,
        ),
        "send_proxy_protocol": nullable(choice("v1", "v2")),
    },
    required=("name", "backends"),
)


def _hash_on(ctx, value, path, line):
    if value in ("client_ip", "path"):
        return value
    if isinstance(value, str):
        kind, _, arg = value.partition(":")
        if kind in ("header", "cookie") and arg:
            return value
    return ctx.error(
        line, path, f"expected client_ip | header:NAME | cookie:NAME | path, got {describe(value)}"
    )


def _cluster_model(ctx, value, path, line):
    parsed = _cluster(ctx, value, path, line)
    if parsed is BAD:
        return BAD
    lines = getattr(value, "key_lines", {})
    if parsed.get("hash_on") is not None:
        if (
            _hash_on(ctx, parsed["hash_on"], join(path, "hash_on"), lines.get("hash_on", line))
            is BAD
        ):
            return BAD
    elif parsed.get("lb") in HASH_POLICIES:
        return ctx.error(
            lines.get("lb", line),
            join(path, "lb"),
            f"policy {parsed['lb']} needs hash_on (client_ip | header:NAME | cookie:NAME | path)",
        )
    if parsed.get("slow_start", 0) > 0 and parsed.get("lb") in HASH_POLICIES:
        # Ramping weights would move keys between backends and back.
        return ctx.error(
            lines.get("slow_start", line),
            join(path, "slow_start"),
            f"slow_start does not apply to policy {parsed['lb']}, which hashes keys to "
            "backends; use a policy that balances by weight or load, or slow_start: 0s",
        )
    cookie = parsed.get("sticky_cookie")
    if cookie is not None and not _COOKIE_NAME.fullmatch(cookie):
        return ctx.error(
            lines.get("sticky_cookie", line),
            join(path, "sticky_cookie"),
            f"expected a cookie name (letters, digits and !#$%&'*+-.^_`|~), got {describe(cookie)}",
        )
    return model.Cluster(**parsed)


def _version(ctx, value, path, line):
    # Unquoted 1.2 is read by YAML as a float; accept it as the user meant.
    if isinstance(value, float):
        value = f"{value:g}"
    return choice("1.2", "1.3")(ctx, value, path, line)


_listener_tls = section(
    {
        "certificates": list_of(
            section(
                {"cert": file_path, "key": file_path},
                required=("cert", "key"),
                build=model.Certificate,
            ),
            minimum=1,
        ),
        "default_certificate": nullable(file_path),
        "alpn": list_of(choice("h2", "http/1.1"), minimum=1),
        "min_version": _version,
        "client_ca": nullable(file_path),
        "client_cert_header": header_name,
        "ocsp_staple": nullable(file_path),
    },
    required=("certificates",),
    build=model.ListenerTLS,
)

_limits = section(
    {
        "max_connections": positive(),
        "max_header_bytes": size,
        "max_body_bytes": size,
        "max_connections_per_ip": nullable(positive()),
    },
    build=model.Limits,
)

_timeouts = section(
    {"handshake": duration(positive=True), "idle": duration(positive=True)},
    build=model.Timeouts,
)

_access_log = section(
    {"path": file_path, "format": choice("json", "combined")},
    required=("path",),
    build=model.AccessLog,
)


def _path_regex(ctx, value, path, line):
    if not isinstance(value, str):
        return ctx.error(line, path, f"expected a regular expression, got {describe(value)}")
    try:
        re.compile(value)
    except re.error as e:
        return ctx.error(line, path, f"expected a regular expression ({e}), got {describe(value)}")
    return value


def _abs_path(ctx, value, path, line):
    if not isinstance(value, str) or not value.startswith("/"):
        return ctx.error(line, path, f'expected a path starting with "/", got {describe(value)}')
    return value


def _method(ctx, value, path, line):
    if not isinstance(value, str) or not HTTP_METHODS.match(value):
        return ctx.error(line, path, f"expected an HTTP method in capitals, got {describe(value)}")
    return value


def _host_pattern(ctx, value, path, line):
    if not isinstance(value, str) or not value:
        return ctx.error(line, path, f'expected a host name or "*.domain", got {describe(value)}')
    bare = value[2:] if value.startswith("*.") else value
    if not HOSTNAME.match(bare.split(":")[0]):
        return ctx.error(line, path, f'expected a host name or "*.domain", got {describe(value)}')
    return value.lower()


_match = section(
    {
        "host": _host_pattern,
        "path": _abs_path,
        "path_prefix": _abs_path,
        "path_regex": _path_regex,
        "methods": list_of(_method, minimum=1),
        "headers": map_of(header_name, scalar_text),
        "sni": _host_pattern,
    },
    build=model.Match,
)

_header_edits = section(
    {"set": map_of(header_name, scalar_text), "remove": list_of(header_name)},
    build=model.HeaderEdits,
)


def _retry_on(ctx, value, path, line):
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and (value in RETRY_CONDITIONS or re.match(r"^[1-5]\d\d$", value)):
        return value
    return ctx.error(
        line,
        path,
        f"expected one of {' | '.join(RETRY_CONDITIONS)} or a status code, got {describe(value)}",
    )


_retry = section(
    {
        "attempts": integer(minimum=1, maximum=10),
        "on": list_of(_retry_on),
        "backoff": section({"base": duration(), "max": duration()}, build=model.Backoff),
        "per_try_timeout": nullable(duration(positive=True)),
        "budget": percent,
    },
    build=model.Retry,
)


def _rate_limit_key(ctx, value, path, line):
    if value in ("client_ip", "route"):
        return value
    if isinstance(value, str) and value.startswith("header:") and len(value) > 7:
        return value
    return ctx.error(line, path, f"expected client_ip | header:NAME | route, got {describe(value)}")


_rate_limit = section(
    {
        "requests": positive(),
        "per": duration(positive=True),
        "burst": integer(minimum=0),
        "key": _rate_limit_key,
    },
    required=("requests", "per"),
    build=model.RateLimit,
)


def _status(low, high):
    return integer(minimum=low, maximum=high)


_route = section(
    {
        "match": _match,
        "cluster": name,
        "rewrite": section({"path_prefix": _abs_path}),
        "request_headers": _header_edits,
        "response_headers": _header_edits,
        "timeout": nullable(duration(positive=True)),
        "retry": nullable(_retry),
        "rate_limit": nullable(_rate_limit),
        "websocket": boolean,
        "websocket_max_message_bytes": nullable(size),
        "allow": list_of(cidr),
        "direct_response": section(
            {
                "status": _status(200, 599),
                "body": text,
                "headers": map_of(header_name, scalar_text),
            },
            build=model.DirectResponse,
        ),
        "redirect": section(
            {"status": choice(301, 302, 303, 307, 308), "location": string},
            required=("location",),
            build=model.Redirect,
        ),
    },
)


def _route_model(ctx, value, path, line):
    parsed = _route(ctx, value, path, line)
    if parsed is BAD:
        return BAD
    actions = [k for k in ("cluster", "direct_response", "redirect") if k in parsed]
    if len(actions) != 1:
        got = ", ".join(actions) if actions else "none"
        return ctx.error(
            line, path, f"expected exactly one of cluster, direct_response, redirect, got {got}"
        )
    rewrite = parsed.pop("rewrite", None)
    if rewrite:
        parsed["rewrite_path_prefix"] = rewrite.get("path_prefix")
    return model.Route(**parsed)


_listener = section(
    {
        "name": name,
        "listen": server_endpoint,
        "protocol": choice("tcp", "http"),
        "proxy_protocol": boolean,
        "tls": nullable(_listener_tls),
        "limits": _limits,
        "allow": list_of(cidr),
        "deny": list_of(cidr),
        "timeouts": _timeouts,
        "access_log": nullable(_access_log),
        "cluster": name,
        "routes": list_of(_route_model),
    },
    required=("name", "listen"),
    build=model.Listener,
)

_admin = section(
    {"listen": server_endpoint, "token_file": nullable(file_path)},
    build=model.Admin,
)


def _workers(ctx, value, path, line):
    if value == "auto":
        return 0
    return integer(minimum=1, maximum=256)(ctx, value, path, line)


def _redis_url(ctx, value, path, line):
    if not isinstance(value, str) or not re.match(r"^rediss?://[^/\s]+(/\d+)?$", value):
        return ctx.error(line, path, f'expected "redis://host:port/db", got {describe(value)}')
    return value


_top = section(
    {
        "admin": nullable(_admin),
        "workers": _workers,
        "drain_timeout": duration(),
        "listeners": list_of(_listener),
        "clusters": list_of(_cluster_model),
        "rate_limit_store": nullable(
            section(
                {"redis": _redis_url, "failure_mode": choice("open", "closed")},
                required=("redis",),
                build=model.RateLimitStore,
            )
        ),
        "tracing": nullable(
            section(
                {
                    "service_name": string,
                    "sample_ratio": number(minimum=0.0, maximum=1.0),
                    "otlp_endpoint": nullable(http_url),
                },
                build=model.Tracing,
            )
        ),
        "whoami": list_of(
            section(
                {"name": name, "listen": server_endpoint},
                required=("name", "listen"),
                build=model.Whoami,
            )
        ),
    },
)


# -- whole-file checks ---------------------------------------------------------


def _line_of(raw, *keys) -> int:
    """Find the line of a nested key in the raw YAML tree, as deep as it goes."""
    node, line = raw, getattr(raw, "line", 0)
    for key in keys:
        if isinstance(node, MarkedDict) and key in node:
            line = node.key_lines.get(key, line)
            node = node[key]
        elif isinstance(node, MarkedList) and isinstance(key, int) and key < len(node):
            line = node.item_lines[key]
            node = node[key]
        else:
            break
    return line


def _items(raw, key):
    value = raw.get(key) if isinstance(raw, dict) else None
    if not isinstance(value, list):
        return []
    return [(i, item) for i, item in enumerate(value) if isinstance(item, dict)]


def _cross_checks(ctx, raw):
    """
    Checks that span sections: unique names and listen addresses, references
    to clusters.  They read the raw tree, so they also run when some
    sections had errors of their own and all problems are reported at once.
    """
    cluster_names = {
        c.get("name") for _, c in _items(raw, "clusters") if isinstance(c.get("name"), str)
    }

    for section_name in ("listeners", "clusters", "whoami"):
        seen = {}
        for i, item in _items(raw, section_name):
            item_name = item.get("name")
            if not isinstance(item_name, str):
                continue
            if item_name in seen:
                ctx.error(
                    _line_of(raw, section_name, i, "name"),
                    f"{section_name}[{i}].name",
                    f'duplicate name "{item_name}", already used by {section_name}[{seen[item_name]}]',
                )
            else:
                seen[item_name] = i

    sockets = [(f"listeners[{i}]", ("listeners", i), item) for i, item in _items(raw, "listeners")]
    sockets += [(f"whoami[{i}]", ("whoami", i), w) for i, w in _items(raw, "whoami")]
    if isinstance(raw.get("admin"), dict):
        sockets.append(("admin", ("admin",), raw["admin"]))
    addresses = {}
    for where, keys, item in sockets:
        listen = item.get("listen")
        if not isinstance(listen, str):
            continue
        if listen in addresses:
            ctx.error(
                _line_of(raw, *keys, "listen"),
                f"{where}.listen",
                f'"{listen}" is already used by {addresses[listen]}',
            )
        else:
            addresses[listen] = where

    for i, listener in _items(raw, "listeners"):
        where = f"listeners[{i}]"
        protocol = listener.get("protocol", "http")
        ref = listener.get("cluster")
        if isinstance(ref, str) and ref not in cluster_names:
            ctx.error(
                _line_of(raw, "listeners", i, "cluster"),
                f"{where}.cluster",
                f'expected the name of a cluster, got "{ref}" (no such cluster)',
            )
        routes = _items(listener, "routes")
        for j, route in routes:
            rwhere = f"{where}.routes[{j}]"
            keys = ("listeners", i, "routes", j)
            ref = route.get("cluster")
            if isinstance(ref, str) and ref not in cluster_names:
                ctx.error(
                    _line_of(raw, *keys, "cluster"),
                    f"{rwhere}.cluster",
                    f'expected the name of a cluster, got "{ref}" (no such cluster)',
                )
            match = route.get("match")
            match_keys = set(match) if isinstance(match, dict) else set()
            if protocol == "tcp":
                if match_keys != {"sni"}:
                    ctx.error(
                        _line_of(raw, *keys, "match"),
                        f"{rwhere}.match",
                        "expected exactly {sni: NAME} on a tcp listener's route",
                    )
                if "cluster" not in route:
                    ctx.error(
                        _line_of(raw, *keys),
                        rwhere,
                        "expected a cluster on a tcp listener's route",
                    )
            elif "sni" in match_keys:
                ctx.error(
                    _line_of(raw, *keys, "match", "sni"),
                    f"{rwhere}.match.sni",
                    "sni routes are for tcp listeners; use match.host on http listeners",
                )
        if protocol == "tcp" and routes and isinstance(listener.get("tls"), dict):
            ctx.error(
                _line_of(raw, "listeners", i, "tls"),
                f"{where}.tls",
                "sni routes pass TLS through without terminating it; a tcp listener "
                "with routes cannot also have tls",
            )
        _tls_cross_checks(ctx, raw, i, listener.get("tls"))
        if "cluster" not in listener and not listener.get("routes"):
            ctx.error(
                _line_of(raw, "listeners", i),
                where,
                "expected a cluster or routes: there is nowhere to send connections",
            )


def _tls_cross_checks(ctx, raw, i, tls):
    if not isinstance(tls, dict):
        return
    default = tls.get("default_certificate")
    certificates = tls.get("certificates")
    if isinstance(default, str) and isinstance(certificates, list):
        paths = [c.get("cert") for c in certificates if isinstance(c, dict)]
        if default not in paths:
            ctx.error(
                _line_of(raw, "listeners", i, "tls", "default_certificate"),
                f"listeners[{i}].tls.default_certificate",
                f'expected the cert of one of the certificates, got "{default}"',
            )


def _tls_file_checks(ctx, raw, config: model.Config):
    """
    Read the certificates, keys and CA files that TLS settings name, as
    they will be at start, so that a missing file or a key that does not
    match its certificate is a config error (and C{--check} finds it).
    """
    from balance.tls.certs import CertificateError, read_ca_bundle, read_certificate

    def check(keys, read, *args, fields=None):
        try:
            read(*args)
        except CertificateError as e:
            # keys ends with the config key at fault, or with None when that
            # depends on which file failed (e.field, renamed by `fields`).
            field = (fields or {}).get(e.field, e.field)
            where = [*keys[:-1], field] if keys[-1] is None else list(keys)
            shown = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in where)
            ctx.error(_line_of(raw, *where), shown.lstrip("."), str(e))

    for i, li in enumerate(config.listeners):
        if li.tls is None:
            continue
        for j, c in enumerate(li.tls.certificates):
            check(("listeners", i, "tls", "certificates", j, None), read_certificate, c.cert, c.key)
        if li.tls.client_ca is not None:
            check(("listeners", i, "tls", "client_ca"), read_ca_bundle, li.tls.client_ca)
    for i, c in enumerate(config.clusters):
        tls = c.tls
        if tls is None:
            continue
        if tls.ca is not None:
            check(("clusters", i, "tls", "ca"), read_ca_bundle, tls.ca)
        if tls.client_cert is not None:
            check(
                ("clusters", i, "tls", None),
                read_certificate,
                tls.client_cert,
                tls.client_key or tls.client_cert,
                fields={"cert": "client_cert", "key": "client_key"},
            )
        elif tls.client_key is not None:
            ctx.error(
                _line_of(raw, "clusters", i, "tls", "client_key"),
                f"clusters[{i}].tls.client_key",
                "expected client_cert too: a client key without its certificate is unused",
            )


# Features whose keys are part of the contract but which this version does
# not implement yet: refusing them is better than silently ignoring them
# (a "tls:" that serves plaintext would be a security hole).
_UNSUPPORTED: list[tuple[tuple, Callable, str]] = []


def unsupported(keys: tuple, test: Callable, what):
    """Declare a contract feature that this version refuses with a message."""
    _UNSUPPORTED.append((keys, test, what))


def _unsupported_checks(ctx, raw, config: model.Config):
    scopes = {
        "listeners": [
            (f"listeners[{i}]", ("listeners", i), li) for i, li in enumerate(config.listeners)
        ],
        "routes": [
            (f"listeners[{i}].routes[{j}]", ("listeners", i, "routes", j), route)
            for i, li in enumerate(config.listeners)
            for j, route in enumerate(li.routes)
        ],
        "clusters": [(f"clusters[{i}]", ("clusters", i), c) for i, c in enumerate(config.clusters)],
        "": [("", (), config)],
    }
    for keys, test, what in _UNSUPPORTED:
        scope, key_path = keys[0], keys[1:]
        for shown, raw_keys, item in scopes[scope]:
            if not test(item):
                continue
            message = what(item) if callable(what) else what
            ctx.error(
                _line_of(raw, *raw_keys, *key_path),
                ".".join(p for p in (shown, *key_path) if p),
                f"{message} is not implemented in this version of Balance",
            )


unsupported(
    ("clusters", "send_proxy_protocol"),
    lambda c: c.send_proxy_protocol is not None and c.tls is not None,
    "send_proxy_protocol together with cluster tls",
)
unsupported(
    ("clusters", "send_proxy_protocol"),
    lambda c: c.send_proxy_protocol is not None and c.upstream_protocol == "h2",
    "send_proxy_protocol together with upstream_protocol h2",
)


def _websocket_checks(ctx, raw, config: model.Config):
    """C{websocket_max_message_bytes} only means something with C{websocket: true}."""
    for i, listener in enumerate(config.listeners):
        for j, route in enumerate(listener.routes):
            limit = route.websocket_max_message_bytes
            if limit is None:
                continue
            where = ("listeners", i, "routes", j, "websocket_max_message_bytes")
            shown = f"listeners[{i}].routes[{j}].websocket_max_message_bytes"
            if not route.websocket:
                ctx.error(
                    _line_of(raw, *where),
                    shown,
                    "needs websocket: true on the same route (frame-aware mode of its tunnels)",
                )
            elif limit < 1:
                ctx.error(_line_of(raw, *where), shown, "expected at least 1 byte, got 0")


def _health_checks(ctx, raw, config: model.Config):
    """gRPC health checks need an HTTP/2 cluster; C{service} is theirs."""
    for i, cluster in enumerate(config.clusters):
        check = cluster.health_check
        if check is None:
            continue
        where = ("clusters", i, "health_check")
        shown = f"clusters[{i}].health_check"
        if check.type == "grpc" and cluster.upstream_protocol != "h2":
            ctx.error(
                _line_of(raw, *where, "type"),
                f"{shown}.type",
                "grpc checks speak HTTP/2: the cluster needs upstream_protocol: h2",
            )
        if check.service is not None and check.type != "grpc":
            ctx.error(
                _line_of(raw, *where, "service"),
                f"{shown}.service",
                f"only grpc checks name a service, this one is type {check.type}",
            )


def validate(raw, path: str) -> model.Config:
    """
    Check a parsed YAML tree and build the config model.

    @param raw: What L{balance.config.load.load_text} returned.
    @param path: The file name, for messages.
    @raise ConfigError: With every problem found.
    """
    ctx = Context(path)
    if raw is None:
        raw = MarkedDict()
    parsed = _top(ctx, raw, "", getattr(raw, "line", 1))
    if isinstance(raw, dict):
        _cross_checks(ctx, raw)
    if not ctx.errors and not parsed.get("listeners") and not parsed.get("whoami"):
        ctx.error(1, "listeners", "expected at least one listener")
    if ctx.errors:
        raise ConfigError(ctx.lines())
    config = model.Config(path=path, **parsed)
    _unsupported_checks(ctx, raw, config)
    _websocket_checks(ctx, raw, config)
    _health_checks(ctx, raw, config)
    _tls_file_checks(ctx, raw, config)
    if ctx.errors:
        raise ConfigError(ctx.lines())
    return config


def load_config(path: str) -> model.Config:
    """
    Read, parse and validate a config file.

    @raise ConfigError: With every problem found, including YAML syntax errors
        and an unreadable file.
    """
    try:
        raw = load_file(path)
    except ConfigSyntaxError as e:
        raise ConfigError([str(e)]) from None
    return validate(raw, path)
