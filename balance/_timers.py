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
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.logger import Logger

__all__ = ["TimerList", "TimerLists"]


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
