# -*- test-case-name: tests.test_acl -*-
"""
Access control by client address: the C{allow} and C{deny} CIDR lists of
listeners and routes.  Pure: parsed once per config, then asked per
connection (or request).

Rules: C{deny} wins; an empty C{allow} lets everyone else in; a non-empty
one only the addresses it covers.  IPv4 and IPv6 both work, and an
IPv4-mapped IPv6 address (C{::ffff:10.1.2.3}, what a dual-stack socket
reports for IPv4 clients) is treated as the IPv4 address it carries, on both
sides: C{10.0.0.0/8} covers C{::ffff:10.1.2.3}, and C{::ffff:10.0.0.0/104}
covers C{10.1.2.3}; but a wider IPv6 network such as C{::/0} covers IPv6
clients only.  A peer without an IP address (a UNIX socket) matches no CIDR.

Lookups cost one set membership test per distinct prefix length in the
lists, whatever the number of CIDRs: networks are kept as integers,
grouped by prefix length.
"""

from __future__ import annotations

import ipaddress
import socket

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_ip(ip: bytes | str):
    """
    An address as C{(version, integer)}, or L{None} if it is not an IP
    address.  IPv4-mapped IPv6 addresses come back as IPv4; an IPv6 zone
    (C{fe80::1%eth0}) is ignored.
    """
    if type(ip) is bytes:
        ip = ip.decode("latin-1")
    try:
        if ":" in ip:
            zone = ip.find("%")
            if zone >= 0:
                ip = ip[:zone]
            n = int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big")
            if n >> 32 == 0xFFFF:
                return 4, n & 0xFFFFFFFF
            return 6, n
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
    except (OSError, ValueError):
        return None


class _Table:
    """CIDRs of one IP version: C{[(shift, {network >> shift})]}."""

    __slots__ = ("groups",)

    def __init__(self, networks, bits: int):
        by_length: dict[int, set[int]] = {}
        for net in networks:
            shift = bits - net.prefixlen
            by_length.setdefault(shift, set()).add(int(net.network_address) >> shift)
        # Shortest prefixes first: they cover the most addresses.
        self.groups = tuple(sorted(by_length.items(), reverse=True))

    def __contains__(self, n: int) -> bool:
        for shift, nets in self.groups:
            if (n >> shift) in nets:
                return True
        return False

    def __len__(self) -> int:
        return sum(len(nets) for _, nets in self.groups)


def _split(cidrs) -> tuple[_Table, _Table]:
    v4, v6 = [], []
    for text in cidrs:
        net = ipaddress.ip_network(text.strip(), strict=False)
        if net.version == 4:
            v4.append(net)
            continue
        v6.append(net)
        if net.subnet_of(_MAPPED):
            # The IPv4-mapped part of IPv6, written the IPv6 way.
            v4.append(
                ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
            )
    return _Table(v4, 32), _Table(v6, 128)


class CidrMatcher:
    """
    An allow list and a deny list of CIDRs.

    :param allow: CIDR strings (C{"10.0.0.0/8"}, C{"2001:db8::/32"}, a bare
        address for a single host); empty means everyone.
    :param deny: CIDR strings refused even if C{allow} covers them.
    :raise ValueError: for a string that is not a CIDR (config validation
        catches these first).
    """

    __slots__ = ("_allow4", "_allow6", "_deny4", "_deny6", "_allow_all", "empty")

    def __init__(self, allow=(), deny=()):
        self._allow4, self._allow6 = _split(allow)
        self._deny4, self._deny6 = _split(deny)
        self._allow_all = not allow
        #: True when there is nothing to check (both lists empty): callers
        #: may then skip L{allowed} altogether.
        self.empty = not allow and not deny

    def allowed(self, ip: bytes | str) -> bool:
        """
        Whether a client at C{ip} may come in.

        :param ip: the peer address as text (bytes or str), as a transport
            reports it.
        """
        parsed = parse_ip(ip)
        if parsed is None:
            return self._allow_all
        version, n = parsed
        if version == 4:
            if n in self._deny4:
                return False
            return self._allow_all or n in self._allow4
        if n in self._deny6:
            return False
        return self._allow_all or n in self._allow6

    def __repr__(self) -> str:
        return "<CidrMatcher allow=%d deny=%d>" % (
            len(self._allow4) + len(self._allow6),
            len(self._deny4) + len(self._deny6),
        )
