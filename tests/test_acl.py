"""
Access control by client address: allow and deny lists of CIDRs.
"""

from __future__ import annotations

import ipaddress
import random
import timeit

from twisted.trial.unittest import SynchronousTestCase

from balance.acl import CidrMatcher, parse_ip


class CidrMatcherTests(SynchronousTestCase):
    """Who may come in."""

    def test_empty_allows_all(self):
        """With both lists empty everyone may come in, and the matcher says it is empty."""
        m = CidrMatcher()
        self.assertTrue(m.empty)
        self.assertTrue(m.allowed(b"203.0.113.9"))
        self.assertTrue(m.allowed("2001:db8::1"))
        self.assertFalse(CidrMatcher(deny=("10.0.0.0/8",)).empty)

    def test_allow_list(self):
        """A non-empty allow list lets in only the addresses it covers."""
        m = CidrMatcher(allow=("10.0.0.0/8", "192.168.1.7", "2001:db8::/32"))
        self.assertTrue(m.allowed(b"10.255.0.1"))
        self.assertTrue(m.allowed(b"192.168.1.7"))
        self.assertFalse(m.allowed(b"192.168.1.8"))
        self.assertFalse(m.allowed(b"11.0.0.1"))
        self.assertTrue(m.allowed(b"2001:db8:ffff::1"))
        self.assertFalse(m.allowed(b"2001:db9::1"))

    def test_deny_wins(self):
        """An address both allowed and denied is refused."""
        m = CidrMatcher(allow=("10.0.0.0/8",), deny=("10.1.0.0/16", "2001:db8::/48"))
        self.assertTrue(m.allowed(b"10.2.0.1"))
        self.assertFalse(m.allowed(b"10.1.2.3"))
        # Deny only: everyone else may come in.
        m = CidrMatcher(deny=("10.1.0.0/16", "2001:db8::/48"))
        self.assertFalse(m.allowed(b"2001:db8::5"))
        self.assertTrue(m.allowed(b"2001:db8:1::5"))
        self.assertTrue(m.allowed(b"8.8.8.8"))

    def test_ipv4_mapped(self):
        """
        An IPv4 client on a dual-stack socket (::ffff:a.b.c.d) is matched
        as its IPv4 address, and mapped CIDRs cover plain IPv4 clients.
        """
        m = CidrMatcher(allow=("10.0.0.0/8",), deny=("::ffff:10.9.0.0/112",))
        self.assertTrue(m.allowed(b"::ffff:10.1.2.3"))
        self.assertTrue(m.allowed(b"::FFFF:10.1.2.3"))
        self.assertFalse(m.allowed(b"::ffff:11.1.2.3"))
        self.assertFalse(m.allowed(b"10.9.1.1"))
        self.assertFalse(m.allowed(b"::ffff:10.9.1.1"))

    def test_ipv6_wide_network_not_ipv4(self):
        """Denying ::/0 refuses IPv6 clients, not IPv4 ones on a dual-stack socket."""
        m = CidrMatcher(deny=("::/0",))
        self.assertFalse(m.allowed(b"2001:db8::1"))
        self.assertTrue(m.allowed(b"::ffff:192.0.2.1"))
        self.assertTrue(m.allowed(b"192.0.2.1"))

    def test_zero_prefix(self):
        """0.0.0.0/0 covers every IPv4 address."""
        m = CidrMatcher(deny=("0.0.0.0/0",))
        self.assertFalse(m.allowed(b"1.2.3.4"))
        self.assertTrue(m.allowed(b"::1"))

    def test_host_bits_ignored(self):
        """A CIDR with host bits set means its network, as config validation does."""
        m = CidrMatcher(allow=("10.1.2.3/8",))
        self.assertTrue(m.allowed(b"10.200.0.1"))

    def test_not_an_ip(self):
        """
        A peer without an IP address (a UNIX socket) matches no CIDR: it is
        refused by a non-empty allow list and let in otherwise.
        """
        self.assertFalse(CidrMatcher(allow=("0.0.0.0/0", "::/0")).allowed(b"unix"))
        self.assertTrue(CidrMatcher(deny=("0.0.0.0/0", "::/0")).allowed(b""))
        self.assertTrue(CidrMatcher(deny=("0.0.0.0/0",)).allowed(b"1.2.3"))

    def test_zone(self):
        """A link-local address with a zone matches without it."""
        m = CidrMatcher(allow=("fe80::/10",))
        self.assertTrue(m.allowed(b"fe80::1%eth0"))

    def test_invalid_cidr(self):
        """A string that is not a CIDR is refused when building."""
        self.assertRaises(ValueError, CidrMatcher, ("10.0.0.0/33",))
        self.assertRaises(ValueError, CidrMatcher, (), ("nope",))

    def test_against_ipaddress(self):
        """
        Many random CIDRs and addresses: the matcher agrees with the
        standard library's ipaddress on every address.
        """
        rng = random.Random(7)
        allow = [
            str(ipaddress.ip_network((rng.getrandbits(32), rng.randint(8, 32)), strict=False))
            for _ in range(500)
        ] + [
            str(ipaddress.ip_network((rng.getrandbits(128), rng.randint(16, 128)), strict=False))
            for _ in range(500)
        ]
        deny = allow[::7]
        m = CidrMatcher(allow, deny)
        nets_allow = [ipaddress.ip_network(c) for c in allow]
        nets_deny = [ipaddress.ip_network(c) for c in deny]
        candidates = [str(n.network_address + 1) for n in nets_allow[:300]]
        candidates += [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(200)]
        for text in candidates:
            ip = ipaddress.ip_address(text)
            expected = not any(ip in n for n in nets_deny) and any(ip in n for n in nets_allow)
            self.assertEqual(m.allowed(text.encode()), expected, text)

    def test_fast_with_many_cidrs(self):
        """
        A lookup among 10,000 CIDRs costs a few microseconds at most: one
        set lookup per prefix length, not one test per CIDR.
        """
        rng = random.Random(1)
        allow = [
            str(ipaddress.ip_network((rng.getrandbits(32), rng.choice((16, 24, 32))), strict=False))
            for _ in range(10_000)
        ]
        m = CidrMatcher(allow)
        n = 20_000
        best = min(timeit.repeat(lambda: m.allowed(b"203.0.113.77"), number=n, repeat=3)) / n
        self.assertLess(best, 20e-6)


class ParseTests(SynchronousTestCase):
    """Addresses as (version, integer)."""

    def test_parse(self):
        """IPv4, IPv6, mapped IPv6 and junk."""
        self.assertEqual(parse_ip(b"0.0.0.1"), (4, 1))
        self.assertEqual(parse_ip("::2"), (6, 2))
        self.assertEqual(parse_ip(b"::ffff:0.0.1.0"), (4, 256))
        self.assertIsNone(parse_ip(b"example.com"))
        self.assertIsNone(parse_ip(b"1.2.3.4\x00"))
