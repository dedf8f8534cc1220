# -*- test-case-name: tests.test_timers -*-
"""
Timeouts for many connections on one reactor timer.

A Twisted C{DelayedCall} per connection costs about 450 bytes (an object
with a dozen attributes, its bound methods and its heap slot), a quarter of
what an idle HTTP connection would otherwise hold.  Idle and handshake
timeouts have a property that makes them cheap to share: every deadline of
one kind is the same delay after the moment it is set, so the order in which
connections are (re)armed is the order in which they expire.  A
L{TimerList} keeps its owners in that order and one C{DelayedCall} for the
first of them, as haproxy's and nginx's timer lists do: arming, re-arming
and removing are O(1), expiry is exact (no coarse sweep), and each owner
costs one ordered-dict entry (about 100 bytes).

Idle timeouts of byte relays are pushed back by every chunk, and touching a
timer per chunk costs more than the bytes are worth.  A L{DeadlineWheel}
lets owners keep their own deadline (last activity + timeout, a timestamp
written per chunk) and asks them only when a coarse bucket comes due: an
owner whose deadline has moved on goes into a later bucket then.  Each owner
costs one set entry (about 40 bytes); a deadline passes at most one bucket
width late (1/16 of its timeout, at most L{DeadlineWheel.resolution}), never
early.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict

from twisted.logger import Logger

__all__ = ["DeadlineWheel", "TimerList", "TimerLists"]


class TimerList:
    """
    Owners whose deadlines are all C{delay} seconds after they were added.
    When an owner's deadline passes, the list forgets it and calls its
    C{deadline_passed()}.

    :ivar delay: the delay of every deadline in the list.
    """

    __slots__ = ("_clock", "delay", "_due", "_call")

    log = Logger()

    def __init__(self, clock, delay: float):
        self._clock = clock
        self.delay = delay
        # owner -> deadline, oldest first: deadlines never decrease.
        self._due: OrderedDict = OrderedDict()
        self._call = None

    def __len__(self) -> int:
        return len(self._due)

    def add(self, owner) -> float:
        """(Re)arm C{owner}: its deadline is now C{delay} from now; return it."""
        deadline = self._clock.seconds() + self.delay
        due = self._due
        if owner in due:
            due.move_to_end(owner)
        due[owner] = deadline
        if self._call is None:
            self._call = self._clock.callLater(self.delay, self._fire)
        return deadline

    def discard(self, owner) -> None:
        """Forget C{owner}, if it is here."""
        # The timer stays: it finds nothing due and stops when empty.
        self._due.pop(owner, None)

    def stop_if_empty(self) -> None:
        """Cancel the reactor timer if no owner is left."""
        call = self._call
        if not self._due and call is not None:
            self._call = None
            if call.active():
                call.cancel()

    def _fire(self) -> None:
        self._call = None
        due = self._due
        now = self._clock.seconds()
        while due:
            owner, deadline = next(iter(due.items()))
            if deadline > now:
                self._call = self._clock.callLater(deadline - now, self._fire)
                return
            del due[owner]
            try:
                owner.deadline_passed()
            except Exception:
                self.log.failure("timeout handler of {owner!r} failed", owner=owner)


class TimerLists:
    """One L{TimerList} per delay, made when first needed."""

    __slots__ = ("_clock", "_lists")

    def __init__(self, clock):
        self._clock = clock
        self._lists: dict[float, TimerList] = {}

    def __call__(self, delay: float) -> TimerList:
        """The list of deadlines C{delay} seconds away."""
        found = self._lists.get(delay)
        if found is None:
            found = self._lists[delay] = TimerList(self._clock, delay)
        return found

    def stop_if_empty(self) -> None:
        """
        Cancel the timers of the lists no owner is left in: a list keeps
        its timer when it empties (the timer then stops by itself), which
        would otherwise outlive the last connection.
        """
        for timers in self._lists.values():
            timers.stop_if_empty()


class _Bucket(set):
    """The owners due at C{when}."""

    __slots__ = ("when",)


class DeadlineWheel:
    """
    Owners whose deadlines are checked in coarse buckets, on one reactor
    timer.

    An owner is L{add}ed with a deadline and keeps the token L{add} returns
    (to L{discard} itself, e.g. when its connection closes).  When the
    bucket holding the owner comes due, the wheel forgets it and calls its
    C{deadline_passed()}, which decides: its deadline may have moved on
    (then it L{add}s itself again with the new one), or it has passed.

    :ivar resolution: the widest bucket, in seconds.
    """

    __slots__ = ("_clock", "resolution", "_buckets", "_whens", "_call")

    log = Logger()

    def __init__(self, clock, resolution: float = 1.0):
        self._clock = clock
        self.resolution = resolution
        self._buckets: dict[float, _Bucket] = {}
        # The times of the buckets, a heap; may hold times of buckets that
        # have emptied since (skipped when they come up).
        self._whens: list[float] = []
        self._call = None

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def add(self, owner, deadline: float, timeout: float) -> _Bucket:
        """
        Ask C{owner} when C{deadline} (reactor time) has passed: at most
        C{min(timeout / 16, resolution)} seconds after it.

        :param timeout: the timeout the deadline is made of, for the
            precision.
        :return: the token to L{discard} C{owner} with.
        """
        width = min(self.resolution, timeout / 16) or self.resolution
        when = math.ceil(deadline / width) * width
        if when < deadline:
            # Float rounding: a bucket must never come before its deadlines.
            when += width
        bucket = self._buckets.get(when)
        if bucket is None:
            bucket = self._buckets[when] = _Bucket()
            bucket.when = when
            heapq.heappush(self._whens, when)
            self._schedule(when)
        bucket.add(owner)
        return bucket

    def _schedule(self, when: float) -> None:
        call = self._call
        if call is None:
            self._call = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._fire)
        elif when < call.getTime():
            call.reset(max(0.0, when - self._clock.seconds()))

    def discard(self, owner, token: _Bucket) -> None:
        """
        Forget C{owner}, added with C{token}; the reactor timer stops once
        no owner is left.
        """
        token.discard(owner)
        if not token and self._buckets.get(token.when) is token:
            del self._buckets[token.when]
            if not self._buckets:
                self._whens.clear()
                call, self._call = self._call, None
                if call is not None and call.active():
                    call.cancel()

    def _fire(self) -> None:
        self._call = None
        now = self._clock.seconds()
        whens, buckets = self._whens, self._buckets
        while whens and whens[0] <= now:
            bucket = buckets.pop(heapq.heappop(whens), None)
            if not bucket:
                continue
            for owner in tuple(bucket):
                # An owner may have been discarded by another's handler.
                if owner in bucket:
                    bucket.discard(owner)
                    try:
                        owner.deadline_passed()
                    except Exception:
                        self.log.failure("timeout handler of {owner!r} failed", owner=owner)
        while whens and whens[0] not in buckets:
            heapq.heappop(whens)
        if whens:
            self._schedule(whens[0])
