# -*- test-case-name: tests.http.test_h2_guard -*-
"""
The HTTP/2 frame guard (L{balance.http.h2_guard}): pure, fed bytes one at a
time and in one blob, with time passed in.
"""

from __future__ import annotations

from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from twisted.trial.unittest import SynchronousTestCase

from balance.http.h2_guard import PREFACE, Budget, FrameGuard


def feed(guard: FrameGuard, data: bytes, now: float = 0.0, byte_by_byte: bool = False):
    """Feed C{data}; return the first verdict, or None."""
    if not byte_by_byte:
        return guard.feed(data, now)
    for i in range(len(data)):
        why = guard.feed(data[i : i + 1], now)
        if why is not None:
            return why
    return None


class BudgetTests(SynchronousTestCase):
    def test_burst_then_rate(self):
        """A burst is allowed at once, then tokens come back at the rate."""
        budget = Budget(10, 5.0)
        self.assertTrue(all(budget.take(0.0) for _ in range(10)))
        self.assertFalse(budget.take(0.0))
        self.assertTrue(budget.take(0.2))
        self.assertFalse(budget.take(0.2))
        # A full second refills five.
        self.assertEqual(sum(budget.take(1.2) for _ in range(10)), 5)

    def test_refund(self):
        budget = Budget(2, 1.0)
        budget.take(0.0)
        budget.take(0.0)
        self.assertFalse(budget.take(0.0))
        budget.refund(0.0)
        self.assertTrue(budget.take(0.0))

    def test_refund_never_beyond_full(self):
        budget = Budget(2, 1.0)
        for _ in range(10):
            budget.refund(0.0)
        self.assertEqual(sum(budget.take(0.0) for _ in range(5)), 2)


class GuardTests(SynchronousTestCase):
    def both(self, make, data: bytes, now: float = 0.0):
        """The verdicts for C{data} fed whole and byte by byte, which must agree."""
        whole = feed(make(), data, now)
        bytewise = feed(make(), data, now, byte_by_byte=True)
        self.assertEqual(bool(whole), bool(bytewise))
        return whole

    def test_ordinary_traffic(self):
        """Requests, bodies, window updates and a few control frames pass."""
        data = PREFACE + SettingsFrame(0).serialize()
        for sid in range(1, 400, 2):
            data += HeadersFrame(sid, data=b"x" * 30, flags=["END_HEADERS"]).serialize()
            data += DataFrame(sid, data=b"y" * 1000, flags=["END_STREAM"]).serialize()
            data += WindowUpdateFrame(0, window_increment=1000).serialize()
        data += PingFrame(0, opaque_data=b"12345678").serialize()
        self.assertIsNone(self.both(lambda: FrameGuard(65536), data))

    def test_header_block_bound(self):
        """A header block across CONTINUATION frames beyond the limit is refused."""
        data = PREFACE + HeadersFrame(1, data=b"h" * 1000).serialize()
        data += ContinuationFrame(1, data=b"c" * 1000).serialize() * 3
        self.assertIsNone(self.both(lambda: FrameGuard(5000), data))
        data += ContinuationFrame(1, data=b"c" * 1001).serialize()
        self.assertIn("CONTINUATION flood", self.both(lambda: FrameGuard(5000), data))

    def test_header_block_ends(self):
        """END_HEADERS ends the count; the next block starts afresh."""
        guard = FrameGuard(5000)
        block = HeadersFrame(1, data=b"h" * 3000).serialize()
        block += ContinuationFrame(1, data=b"c" * 1000, flags=["END_HEADERS"]).serialize()
        self.assertIsNone(guard.feed(PREFACE + block, 0.0))
        self.assertFalse(guard.in_header_block)
        self.assertIsNone(guard.feed(block.replace(b"\x00\x00\x00\x01", b"\x00\x00\x00\x03"), 0.0))

    def test_block_started(self):
        """The guard tells when an unfinished block started (for its timeout)."""
        guard = FrameGuard(65536)
        guard.feed(PREFACE + HeadersFrame(1, data=b"h").serialize(), 5.0)
        self.assertEqual(guard.block_started, 5.0)
        guard.feed(ContinuationFrame(1, data=b"c", flags=["END_HEADERS"]).serialize(), 6.0)
        self.assertIsNone(guard.block_started)

    def test_control_flood(self):
        """More control frames than the burst within a second: refused."""
        ping = PingFrame(0, opaque_data=b"12345678").serialize()
        make = lambda: FrameGuard(65536, control_burst=50, control_rate=10)  # noqa: E731
        self.assertIsNone(self.both(make, PREFACE + ping * 50))
        self.assertIn("control frames", self.both(make, PREFACE + ping * 51))

    def test_settings_ack_free(self):
        """SETTINGS acknowledgements (of Balance's own) are not counted."""
        ack = SettingsFrame(0, flags=["ACK"]).serialize()
        guard = FrameGuard(65536, control_burst=5, control_rate=1)
        self.assertIsNone(guard.feed(PREFACE + ack * 100, 0.0))

    def test_empty_data(self):
        """Empty DATA frames count as control frames; an empty END_STREAM does not."""
        empty = DataFrame(1).serialize()
        last = DataFrame(1, flags=["END_STREAM"]).serialize()
        guard = FrameGuard(65536, control_burst=5, control_rate=1)
        self.assertIsNone(guard.feed(PREFACE + last * 100 + empty * 5, 0.0))
        self.assertIn("empty DATA", guard.feed(empty, 0.0))

    def test_reset_budget(self):
        """RST_STREAM beyond the reset budget: rapid reset."""
        rst = RstStreamFrame(1, error_code=8).serialize()
        guard = FrameGuard(65536, reset_burst=100, reset_rate=10)
        self.assertIsNone(guard.feed(PREFACE + rst * 100, 0.0))
        self.assertIn("rapid reset", guard.feed(rst, 0.0))
        # A second later ten more are allowed.
        self.assertIsNone(guard.feed(rst * 9, 1.0))

    def test_completed_requests_refund(self):
        guard = FrameGuard(65536, reset_burst=2, reset_rate=0.001)
        rst = RstStreamFrame(1, error_code=8).serialize()
        self.assertIsNone(guard.feed(PREFACE + rst * 2, 0.0))
        guard.request_completed(0.0)
        self.assertIsNone(guard.feed(rst, 0.0))
        self.assertIsNotNone(guard.feed(rst, 0.0))

    def test_refusals(self):
        guard = FrameGuard(65536, reset_burst=3, reset_rate=0.001)
        self.assertEqual([guard.stream_refused(0.0) for _ in range(4)], [True] * 3 + [False])

    def test_large_frames_skipped(self):
        """A large DATA frame's payload is skipped, whatever the reads."""
        data = PREFACE + DataFrame(1, data=b"\x00" * 100000).serialize()
        data += PingFrame(0, opaque_data=b"12345678").serialize() * 3
        make = lambda: FrameGuard(65536, control_burst=3, control_rate=1)  # noqa: E731
        self.assertIsNone(self.both(make, data))
        self.assertIsNotNone(self.both(make, data + PingFrame(0).serialize()))
