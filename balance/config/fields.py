"""
The building blocks of config validation: field parsers.

A field parser is C{parser(ctx, value, path, line) -> value}: it returns the
checked (and converted) value, or reports an error through C{ctx} and returns
L{BAD}, so that one bad key does not hide the others.  L{section} combines
parsers into a mapping with a fixed set of keys.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Callable

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

from balance.config.units import parse_duration, parse_size

BAD = object()

HTTP_METHODS = re.compile(r"^[A-Z][A-Z0-9_-]{0,31}$")
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)


class Context:
    """Collects errors for one file."""

    def __init__(self, path: str):
        self.path = path
        self.errors: list[tuple[int, str, str]] = []

    def error(self, line: int, key_path: str, message: str) -> object:
        self.errors.append((line, key_path, message))
        return BAD

    def lines(self) -> list[str]:
        ordered = sorted(enumerate(self.errors), key=lambda e: (e[1][0], e[0]))
        return [
            f"{self.path}:{line}: {key_path}: {message}"
            if key_path
            else f"{self.path}:{line}: {message}"
            for _, (line, key_path, message) in ordered
        ]


def describe(value) -> str:
    """Show a YAML value the way the user wrote it, for 'got ...'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    key = str(key)
    if not key.isprintable() or key != key.strip() or not key:
        # Quoted, so that an error stays one readable line.
        key = json.dumps(key)
    return f"{path}.{key}" if path else key


# -- scalar fields -----------------------------------------------------------


def string(ctx, value, path, line, *, empty=False):
    if not isinstance(value, str) or (not empty and not value):
        return ctx.error(line, path, f"expected a non-empty string, got {describe(value)}")
    return value


def http_url(ctx, value, path, line):
    """An C{http://} or C{https://} URL with a host (an OTLP collector)."""
    if not isinstance(value, str) or not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
        return ctx.error(
            line, path, f'expected a URL such as "http://127.0.0.1:4318", got {describe(value)}'
        )
    return value


def name(ctx, value, path, line):
    if not isinstance(value, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", value):
        return ctx.error(
            line,
            path,
            f"expected a name of letters, digits, '.', '_' or '-', got {describe(value)}",
        )
    return value


def boolean(ctx, value, path, line):
    if not isinstance(value, bool):
        return ctx.error(line, path, f"expected true or false, got {describe(value)}")
    return value


def integer(minimum=None, maximum=None):
    def parse(ctx, value, path, line):
        if isinstance(value, bool) or not isinstance(value, int):
            return ctx.error(line, path, f"expected an integer, got {describe(value)}")
        if minimum is not None and value < minimum:
            return ctx.error(line, path, f"expected an integer >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            return ctx.error(line, path, f"expected an integer <= {maximum}, got {value}")
        return value

    return parse


def number(minimum=None, maximum=None, exclusive_minimum=False):
    def parse(ctx, value, path, line):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return ctx.error(line, path, f"expected a number, got {describe(value)}")
        if minimum is not None and (value < minimum or (exclusive_minimum and value == minimum)):
            op = ">" if exclusive_minimum else ">="
            return ctx.error(line, path, f"expected a number {op} {minimum}, got {value}")
        if maximum is not None and value > maximum:
            return ctx.error(line, path, f"expected a number <= {maximum}, got {value}")
        return float(value)

    return parse


def duration(positive=False):
    def parse(ctx, value, path, line):
        expected = 'expected a duration such as "250ms", "5s", "2m" or "1h"'
        if not isinstance(value, str):
            return ctx.error(line, path, f"{expected}, got {describe(value)}")
        try:
            seconds = parse_duration(value)
        except ValueError:
            return ctx.error(line, path, f"{expected}, got {describe(value)}")
        if positive and seconds <= 0:
            return ctx.error(line, path, f"expected a duration above zero, got {describe(value)}")
        return seconds

    return parse


def size(ctx, value, path, line):
    try:
        return parse_size(value)
    except ValueError:
        return ctx.error(
            line,
            path,
            'expected a size in bytes or with a unit such as "64KiB" or "10MiB", '
            f"got {describe(value)}",
        )


def percent(ctx, value, path, line):
    expected = 'expected a percentage such as "50%"'
    if isinstance(value, str) and value.endswith("%"):
        try:
            n = float(value[:-1])
        except ValueError:
            return ctx.error(line, path, f"{expected}, got {describe(value)}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        n = float(value)
    else:
        return ctx.error(line, path, f"{expected}, got {describe(value)}")
    if not 0 <= n <= 100:
        return ctx.error(
            line, path, f"expected a percentage from 0% to 100%, got {describe(value)}"
        )
    return n


def choice(*choices):
    def parse(ctx, value, path, line):
        if value not in choices or isinstance(value, bool):
            shown = " | ".join(str(c) for c in choices)
            return ctx.error(line, path, f"expected one of {shown}, got {describe(value)}")
        return value

    return parse


def nullable(parser):
    def parse(ctx, value, path, line):
        if value is None:
            return None
        return parser(ctx, value, path, line)

    return parse


def scalar_text(ctx, value, path, line):
    """A header value or body: strings, and numbers written without quotes."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return ctx.error(line, path, f"expected a string, got {describe(value)}")
    text = str(value)
    if any(c in text for c in "\r\n\0"):
        return ctx.error(line, path, "expected a value without CR, LF or NUL")
    return text


def text(ctx, value, path, line):
    """A free text such as a response body: numbers are taken as text too."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return ctx.error(line, path, f"expected a string, got {describe(value)}")
    return str(value)


def header_name(ctx, value, path, line):
    if not isinstance(value, str) or not HEADER_NAME.match(value):
        return ctx.error(line, path, f"expected an HTTP header name, got {describe(value)}")
    return value.lower()


def cidr(ctx, value, path, line):
    if not isinstance(value, str):
        return ctx.error(line, path, f'expected a CIDR such as "10.0.0.0/8", got {describe(value)}')
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        return ctx.error(line, path, f'expected a CIDR such as "10.0.0.0/8", got {describe(value)}')


def file_path(ctx, value, path, line):
    return string(ctx, value, path, line)


def _check_systemd(description: str) -> str | None:
    # Twisted's systemd parser looks the socket up while parsing, which fails
    # outside systemd; check only the syntax here.
    args = dict(part.split("=", 1) for part in description.split(":")[1:] if "=" in part)
    if args.get("domain") not in ("INET", "INET6", "UNIX"):
        return "systemd endpoints need domain=INET, INET6 or UNIX"
    if "index" not in args and "name" not in args:
        return "systemd endpoints need index=N or name=NAME"
    if "index" in args and not args["index"].isdigit():
        return "systemd index must be a number"
    return None


def _endpoint_reason(e: Exception) -> str:
    """Say why Twisted refused an endpoint string, in the user's terms."""
    text = str(e)
    if "invalid literal for int()" in text:
        return "the port must be a number"
    m = re.search(r"unexpected keyword argument '(\w+)'", text)
    if m:
        return f"unknown option {m.group(1)}"
    if isinstance(e, OSError) and e.filename:
        return f"cannot read {e.filename}: {e.strerror}"
    return text or type(e).__name__


def server_endpoint(ctx, value, path, line):
    expected = 'expected a Twisted server endpoint such as "tcp:8080:interface=127.0.0.1"'
    if not isinstance(value, str) or not value:
        return ctx.error(line, path, f"{expected}, got {describe(value)}")
    if value.startswith("systemd:"):
        problem = _check_systemd(value)
        if problem:
            return ctx.error(line, path, f"{expected}: {problem}, got {describe(value)}")
        return value
    try:
        endpoint = serverFromString(MemoryReactor(), value)
    except Exception as e:
        reason = _endpoint_reason(e)
        return ctx.error(line, path, f"{expected} ({reason}), got {describe(value)}")
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        return ctx.error(line, path, f"{expected} (port out of range), got {describe(value)}")
    return value


def split_address(text: str) -> tuple[str, int]:
    """
    Split C{"host:port"} or C{"[v6]:port"}.

    @raise ValueError: If it is not one of those with a port in 1..65535 and
        a plausible host name or IP literal.
    """
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(text)
        ipaddress.IPv6Address(host)
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(text)
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not HOSTNAME.match(host):
                raise ValueError(text) from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(text)
    return host, int(port)


def address(ctx, value, path, line):
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return split_address(value)
    except ValueError:
        return ctx.error(line, path, f'expected "host:port", got {describe(value)}')


# -- containers --------------------------------------------------------------


def list_of(parser, minimum=0):
    def parse(ctx, value, path, line):
        if not isinstance(value, list):
            return ctx.error(line, path, f"expected a list, got {describe(value)}")
        if len(value) < minimum:
            return ctx.error(line, path, f"expected at least {minimum} item(s), got {len(value)}")
        lines = getattr(value, "item_lines", [line] * len(value))
        items = [parser(ctx, item, join(path, i), lines[i]) for i, item in enumerate(value)]
        if any(item is BAD for item in items):
            return BAD
        return tuple(items)

    return parse


def map_of(key_parser, value_parser):
    """A mapping of free-form keys, e.g. header names to values."""

    def parse(ctx, value, path, line):
        if not isinstance(value, dict):
            return ctx.error(line, path, f"expected a mapping, got {describe(value)}")
        duplicates(ctx, value, path)
        key_lines = getattr(value, "key_lines", {})
        items = []
        for key, item in value.items():
            key_path = join(path, key)
            key_line = key_lines.get(key, line)
            items.append(
                (
                    key_parser(ctx, key, key_path, key_line),
                    value_parser(ctx, item, key_path, key_line),
                )
            )
        if any(k is BAD or v is BAD for k, v in items):
            return BAD
        return tuple(items)

    return parse


def duplicates(ctx, value, path):
    for key, dup_line in getattr(value, "duplicates", ()):
        ctx.error(dup_line, join(path, key), "key given more than once")


def section(fields: dict[str, Callable], required=(), build=None):
    """
    A mapping with a fixed set of keys: unknown keys are errors, missing
    required keys are errors, each value goes through its field's parser.

    @param build: Called with the parsed values as keyword arguments when
        none is bad; a dict of the values is returned when not given.
    """

    def parse(ctx, value, path, line):
        if not isinstance(value, dict):
            return ctx.error(line, path, f"expected a mapping, got {describe(value)}")
        duplicates(ctx, value, path)
        key_lines = getattr(value, "key_lines", {})
        values = {}
        for key, item in value.items():
            key_path = join(path, key)
            key_line = key_lines.get(key, line)
            parser = fields.get(key)
            if parser is None:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                ctx.error(
                    key_line,
                    key_path,
                    f"unknown key{hint}; expected one of: {', '.join(fields)}",
                )
                values[key] = BAD
                continue
            values[key] = parser(ctx, item, key_path, key_line)
        for key in required:
            if key not in value:
                values[key] = ctx.error(line, join(path, key), "required key is missing")
        if any(v is BAD for v in values.values()):
            return BAD
        if build is None:
            return values
        return build(**values)

    return parse


def positive():
    """An integer of at least one."""
    return integer(minimum=1)
