# -*- test-case-name: tests.cluster.test_keys -*-
"""
The keys hash policies hash, per a cluster's ``hash_on``.

``hash_on`` is one of ``client_ip``, ``header:NAME``, ``cookie:NAME`` or
``path``.  :func:`key_function` parses it once, at cluster build time,
into a function of the request that returns the key as ``bytes``, or
``None`` when the request has none (the hash policy then falls back to
round robin).  Pure: no I/O, bytes in, bytes out.

- ``client_ip``: the client's address, as given (``b"203.0.113.7"``).
- ``header:NAME``: the value of the first header called NAME, compared
  without regard to case, as received.
- ``cookie:NAME``: the value of cookie NAME in the ``Cookie`` header(s),
  surrounding double quotes removed.
- ``path``: the request target's path, without the query string (as
  HAProxy's ``balance uri``); an absolute-form target keeps its scheme and
  authority.

On a tcp listener only ``client_ip`` applies: see :func:`connection_key`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

Headers = Iterable[tuple[bytes, bytes]]
KeyFunction = Callable[[bytes, Headers, bytes], "bytes | None"]


def header_value(headers: Headers, name: bytes) -> bytes | None:
    """
    The value of the first header called ``name`` (lowercase), or
    ``None``.
    """
    size = len(name)
    for key, value in headers:
        if len(key) == size and key.lower() == name:
            return value
    return None


def cookie_value(headers: Headers, name: bytes) -> bytes | None:
    """
    The value of the cookie called ``name`` (case-sensitive, as cookie
    names are) in the request's ``Cookie`` headers, or ``None``.

    Pairs are separated by ``;``; whitespace around them and double quotes
    around a value are dropped.  A pair without ``=`` is not a cookie.
    """
    for key, value in headers:
        if len(key) != 6 or key.lower() != b"cookie":
            continue
        if name not in value:
            continue
        for pair in value.split(b";"):
            cookie, sep, content = pair.partition(b"=")
            if sep and cookie.strip() == name:
                content = content.strip()
                if len(content) >= 2 and content[0] == 0x22 and content[-1] == 0x22:
                    content = content[1:-1]
                return content
    return None


def _path(path: bytes) -> bytes:
    end = path.find(b"?")
    return path if end < 0 else path[:end]


def parse(spec: str) -> tuple[str, bytes]:
    """
    Split a ``hash_on`` value into its kind and argument.

    :return: ``("client_ip", b"")``, ``("header", NAME lowercased)``,
        ``("cookie", NAME)`` or ``("path", b"")``.
    :raise ValueError: If ``spec`` is none of those (config validation
        lets only these through).
    """
    if spec in ("client_ip", "path"):
        return spec, b""
    kind, _, argument = spec.partition(":")
    if kind == "header" and argument:
        return kind, argument.lower().encode("latin-1")
    if kind == "cookie" and argument:
        return kind, argument.encode("latin-1")
    raise ValueError(
        f"hash_on: expected client_ip | header:NAME | cookie:NAME | path, got {spec!r}"
    )


def key_function(spec: str) -> KeyFunction:
    """
    Build the function that extracts the key that ``spec`` names from a
    request.

    :param spec: A ``hash_on`` value.
    :return: ``f(client_ip, headers, path) -> bytes | None``, where
        ``client_ip`` is ``bytes``, ``headers`` the request's ``(name,
        value)`` pairs as received, and ``path`` the request target.
    :raise ValueError: If ``spec`` is not a ``hash_on`` value.
    """
    kind, argument = parse(spec)
    if kind == "client_ip":
        return lambda client_ip, headers, path: client_ip
    if kind == "path":
        return lambda client_ip, headers, path: _path(path)
    if kind == "header":
        return lambda client_ip, headers, path: header_value(headers, argument)
    return lambda client_ip, headers, path: cookie_value(headers, argument)


def extract(spec: str, client_ip: bytes, headers: Headers, path: bytes) -> bytes | None:
    """
    The key ``spec`` names in a request, or ``None`` when it has none.
    Parses ``spec`` each time: on the request path, use
    :func:`key_function` once instead.
    """
    return key_function(spec)(client_ip, headers, path)


def connection_key(spec: str, client_ip: bytes) -> bytes | None:
    """
    The key of a TCP connection: the client's address when ``spec`` is
    ``client_ip``; ``None`` (round robin) for anything else, which needs a
    request that a TCP connection does not have.
    """
    return client_ip if spec == "client_ip" else None
