# -*- test-case-name: tests.ratelimit.test_shared -*-
"""
The rate-limit store of the workers of one group (C{workers: N}): the
token buckets of every worker in one shared memory table, so that a local
C{rate_limit} of 100/s lets 100/s through the group, as nginx's
C{limit_req} zones do for its worker processes.

The table is an anonymous shared memory file (C{memfd_create}) that the
parent makes and every worker inherits as a file descriptor, and maps:
nothing on the file system, nothing left behind when the group exits, and
a worker restarted (or a new generation, after a reload that changed the
listeners) finds the buckets as they were.

Layout: the mutexes, then C{slots} entries of 16 bytes, C{(key hash, tat)}, in groups of
L{WAYS} (a cache line).  A key's 64-bit hash picks its group; the bucket
is the entry holding that hash, else a free one (hash 0, or a bucket full
again: its C{tat} has passed), else the group's entry closest to full,
which is evicted (counted in C{evicted}).  So the table's memory is fixed
(2 MiB for the default 131,072 entries, and 16 KiB of mutexes) and, as in the in-process store,
a bucket that is full again is the same as no bucket.

A decision locks its group's stripe (one of L{STRIPES} process-shared,
robust pthread mutexes at the head of the table), reads, decides with the
same GCRA arithmetic as the other stores
(L{balance.ratelimit.bucket.gcra}), writes and unlocks: two workers
deciding for the same key at once cannot both spend its last token.  The
mutexes are robust: a worker killed while it holds one (C{kill -9}) does
not block the others; the next one to lock it takes it over.  A lock and
unlock cost about 0.6 us through ctypes (a POSIX record lock costs 3-4 us,
two system calls).  The clock is the reactor's, wall time, which all the
workers share.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import struct

from zope.interface import implementer

from balance.ratelimit import IRateLimitStore
from balance.ratelimit.bucket import gcra

#: Entries per group: 4 x 16 bytes, one cache line.
WAYS = 4
_ENTRY = struct.Struct("=Qd")
_GROUP = struct.Struct("=" + "Qd" * WAYS)
_GROUP_BYTES = _GROUP.size

#: Entries of the table made by L{create_table} unless told otherwise.
DEFAULT_SLOTS = 131_072

#: Mutexes guarding the groups (group I{g} by mutex I{g % STRIPES}).
STRIPES = 256
#: Room for one C{pthread_mutex_t} (40 bytes on x86-64, 48 on arm64).
_MUTEX_BYTES = 64
_HEAD = STRIPES * _MUTEX_BYTES

_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1

_libc = ctypes.CDLL(None, use_errno=True)
_lock = _libc.pthread_mutex_lock
_unlock = _libc.pthread_mutex_unlock
_consistent = _libc.pthread_mutex_consistent
for _f in (_lock, _unlock, _consistent):
    _f.argtypes = [ctypes.c_void_p]
    _f.restype = ctypes.c_int


def create_table(slots: int = DEFAULT_SLOTS) -> int:
    """
    Make an empty shared table, its mutexes ready; its file descriptor
    (close-on-exec: hand it to workers explicitly, and close it when the
    group ends).

    :param slots: entries, rounded up to a multiple of L{WAYS}.
    """
    groups = max(1, -(-slots // WAYS))
    fd = os.memfd_create("balance-rate-limits")
    os.ftruncate(fd, _HEAD + groups * _GROUP_BYTES)
    table = mmap.mmap(fd, _HEAD)
    base = ctypes.c_char.from_buffer(table)
    attr = ctypes.create_string_buffer(64)
    try:
        for call in (
            _libc.pthread_mutexattr_init(attr),
            _libc.pthread_mutexattr_setpshared(attr, _PTHREAD_PROCESS_SHARED),
            _libc.pthread_mutexattr_setrobust(attr, _PTHREAD_MUTEX_ROBUST),
        ):
            if call:
                raise OSError(call, os.strerror(call))
        for i in range(STRIPES):
            result = _libc.pthread_mutex_init(
                ctypes.c_void_p(ctypes.addressof(base) + i * _MUTEX_BYTES), attr
            )
            if result:
                raise OSError(result, os.strerror(result))
    except BaseException:
        os.close(fd)
        raise
    finally:
        _libc.pthread_mutexattr_destroy(attr)
        del base
        table.close()
    return fd


def _hash(key: bytes) -> int:
    # Never 0, the mark of a free entry.
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") or 1


@implementer(IRateLimitStore)
class SharedRateLimitStore:
    """
    Token buckets shared by the processes that map one table.

    :param clock: an L{twisted.internet.interfaces.IReactorTime}.
    :param fd: the table, from L{create_table} (this store maps it; the fd
        stays open while the store lives).
    :ivar evicted: buckets this process evicted before they were full,
        because their group of entries was taken by other keys.
    """

    synchronous = True

    def __init__(self, clock, fd: int):
        size = os.fstat(fd).st_size - _HEAD
        if size < _GROUP_BYTES or size % _GROUP_BYTES:
            raise ValueError(f"not a rate-limit table: {size + _HEAD} bytes")
        self._clock = clock
        self._map = mmap.mmap(fd, _HEAD + size)
        # Held for the life of the map: the mutexes' addresses.
        self._base = ctypes.c_char.from_buffer(self._map)
        self._mutexes = ctypes.addressof(self._base)
        self._groups = size // _GROUP_BYTES
        self.evicted = 0

    @property
    def slots(self) -> int:
        """The number of entries of the table."""
        return self._groups * WAYS

    def take(self, key: bytes, rate: float, capacity: int):
        """
        Take one token from the bucket of C{key}; see
        L{IRateLimitStore.take}.  Always answers at once.
        """
        h = _hash(key)
        group_index = h % self._groups
        offset = _HEAD + group_index * _GROUP_BYTES
        mutex = self._mutexes + (group_index % STRIPES) * _MUTEX_BYTES
        now = self._clock.seconds()
        result = _lock(mutex)
        if result:
            self._locked_anyway(mutex, result)
        try:
            group = _GROUP.unpack_from(self._map, offset)
            way = -1
            tat = now
            free = -1
            coldest = 0
            for i in range(WAYS):
                entry_hash, entry_tat = group[2 * i], group[2 * i + 1]
                if entry_hash == h:
                    way, tat = i, entry_tat
                    break
                if free < 0 and (entry_hash == 0 or entry_tat <= now):
                    free = i
                if entry_tat < group[2 * coldest + 1]:
                    coldest = i
            if way < 0:
                if free >= 0:
                    way = free
                else:
                    way = coldest
                    self.evicted += 1
            new_tat, allowed, remaining, reset_after, retry_after = gcra(
                tat, now, 1.0 / rate, capacity
            )
            _ENTRY.pack_into(self._map, offset + way * _ENTRY.size, h, new_tat)
        finally:
            _unlock(mutex)
        return allowed, remaining, reset_after, retry_after

    @staticmethod
    def _locked_anyway(mutex: int, result: int) -> None:
        if result != errno.EOWNERDEAD:
            raise OSError(result, f"locking a rate-limit stripe: {os.strerror(result)}")
        # Its holder died mid-decision: at worst one bucket entry is stale,
        # which a rate limiter can live with.  Take the mutex over.
        _consistent(mutex)

    def __len__(self) -> int:
        """The buckets held now (not full), scanning the whole table."""
        now = self._clock.seconds()
        held = 0
        for offset in range(_HEAD, _HEAD + self._groups * _GROUP_BYTES, _ENTRY.size):
            entry_hash, tat = _ENTRY.unpack_from(self._map, offset)
            if entry_hash and tat > now:
                held += 1
        return held


__all__ = ["DEFAULT_SLOTS", "STRIPES", "SharedRateLimitStore", "WAYS", "create_table"]
