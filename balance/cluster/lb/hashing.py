# -*- test-case-name: tests.cluster.test_hashing -*-
"""
Stable hashes for the hash policies.

Everything here gives the same answer in every process, worker and
restart (Python's own C{hash()} of bytes is salted per process, so it is
not used).  Two costs matter and are kept apart:

- At pick time the key is hashed once per request: L{key_hash} is
  C{zlib.crc32}, about 95 ns for an IP address here, against 560 ns for an
  8-byte BLAKE2b and 500 ns for CRC32 followed by a pure-Python 64-bit
  finaliser.  Its spread over a ring is as even as BLAKE2b's (measured:
  the same max/min share over 100k sequential and random keys).
- At build time (C{update()}), ring points and Maglev permutations use
  MD5 and BLAKE2b of the backend's name, where quality matters more than
  speed.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

_MASK32 = 0xFFFFFFFF
_FOUR_POINTS = struct.Struct("<4I").unpack


def key_hash(key: bytes | str) -> int:
    """
    Hash a request key (see L{balance.cluster.lb.keys}) to 32 bits.

    :param key: The key; ``str`` is encoded as UTF-8.
    :return: An int in ``[0, 2**32)``.
    """
    if isinstance(key, str):
        key = key.encode("utf-8")
    return zlib.crc32(key)


def rehash(value: int, salt: int) -> int:
    """
    Derive another well-spread 32-bit hash from ``value`` for attempt
    ``salt`` (1, 2, ...): the per-key fallback order of Maglev when the
    key's own backend is not eligible.  Deterministic, so one key always
    falls back to the same backend while the same backends are down.
    """
    h = (value ^ (salt * 0x9E3779B9)) & _MASK32
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & _MASK32
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def ring_points(name: str, count: int) -> list[int]:
    """
    The ``count`` points of one backend on a Ketama ring: each MD5 of
    ``"name-i"`` gives four 32-bit points, as in libketama.

    :param name: The backend's stable name
        (:attr:`balance.cluster.backend.Backend.name`).
    :param count: How many points, at least 1.
    """
    points: list[int] = []
    for i in range((count + 3) // 4):
        digest = hashlib.md5(f"{name}-{i}".encode(), usedforsecurity=False).digest()
        points.extend(_FOUR_POINTS(digest))
    del points[count:]
    return points


def maglev_permutation(name: str, size: int) -> tuple[int, int]:
    """
    The ``(offset, skip)`` of a backend's Maglev permutation of a table of
    prime ``size``: its j-th preferred slot is ``(offset + j * skip) %
    size``, which visits every slot once because ``skip`` is in
    ``[1, size)``.
    """
    digest = hashlib.blake2b(name.encode(), digest_size=16).digest()
    offset = int.from_bytes(digest[:8], "little") % size
    skip = int.from_bytes(digest[8:], "little") % (size - 1) + 1
    return offset, skip


def is_prime(n: int) -> bool:
    """Whether ``n`` is prime (trial division; for table sizes only)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True
