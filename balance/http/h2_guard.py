# -*- test-case-name: tests.http.test_h2_guard -*-
"""
The HTTP/2 abuse guard: every frame a client sends is looked at here, from
its 9-byte header alone, before the frame layer (L{balance.http.h2_conn})
parses it.

It enforces the limits whose violation costs Balance work without giving a
client anything (RFC 9113 10.5, and the "HTTP/2 implementation issues" of
2019 and 2023):

  - a header block (HEADERS and its CONTINUATION frames) larger than the
    listener's C{max_header_bytes} before it is complete, counted as the
    frame headers arrive, before their payloads are buffered
    (CONTINUATION flood);
  - control frames that make no progress (SETTINGS, PING, PRIORITY, empty
    DATA or CONTINUATION, frame types Balance does not know) beyond a
    budget (SETTINGS, PING and empty frame floods, CVE-2019-9512/9515/9518);
  - streams the client cancels (RST_STREAM), or opens beyond the advertised
    concurrency so that Balance must refuse them, beyond a budget (Rapid
    Reset, CVE-2023-44487).

Budgets are token buckets: a burst, a refill rate, and a refund for each
request that completes, so that a busy, well-behaved client never runs dry
while a flood does within a second.  Everything here is pure: time comes in
as C{now}, and the verdict is a sentence for the log and the GOAWAY's debug
data; the caller sends GOAWAY ENHANCE_YOUR_CALM and closes.
"""

from __future__ import annotations

# Frame types (RFC 9113 6) and the flags that matter here.
DATA = 0
HEADERS = 1
PRIORITY = 2
RST_STREAM = 3
SETTINGS = 4
PUSH_PROMISE = 5
PING = 6
GOAWAY = 7
WINDOW_UPDATE = 8
CONTINUATION = 9

_END_STREAM = 0x1
_ACK = 0x1
_END_HEADERS = 0x4

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: Control frames a client may send at once, then per second.  Browsers send
#: a handful per connection; gRPC keepalives one PING every few seconds.
CONTROL_BURST = 1000
CONTROL_RATE = 100.0

#: Streams a client may cancel (or have refused) at once, then per second,
#: on top of one per request that completed.  The Rapid Reset attack is
#: thousands per second and per connection.
RESET_BURST = 100
RESET_RATE = 10.0


class Budget:
    """
    A token bucket of C{burst} tokens refilled at C{rate} per second, kept
    as the time it is full again (as in L{balance.ratelimit.bucket}).
    """

    __slots__ = ("_interval", "_span", "_full_at")

    def __init__(self, burst: int, rate: float):
        self._interval = 1.0 / rate
        self._span = burst * self._interval
        self._full_at = 0.0

    def take(self, now: float) -> bool:
        """Spend one token; L{False} when none is left (it is not spent)."""
        full_at = self._full_at
        if full_at < now:
            full_at = now
        full_at += self._interval
        # The epsilon: float noise must not refuse an exact fit.
        if full_at - now > self._span + 1e-9:
            return False
        self._full_at = full_at
        return True

    def refund(self, now: float) -> None:
        """Give one token back (a request completed)."""
        if self._full_at > now:
            self._full_at = max(now, self._full_at - self._interval)


class FrameGuard:
    """
    Follows a client's frames from their headers and keeps the budgets.

    :param max_header_block: the largest header block, in encoded bytes,
        accepted across HEADERS and CONTINUATION frames.
    :param preface: bytes of connection preface still to come before the
        first frame (24, or 0 if the caller strips it).
    """

    __slots__ = ("_max_block", "_skip", "_partial", "_block", "block_started", "control", "resets")

    def __init__(
        self,
        max_header_block: int,
        preface: int = len(PREFACE),
        control_burst: int = CONTROL_BURST,
        control_rate: float = CONTROL_RATE,
        reset_burst: int = RESET_BURST,
        reset_rate: float = RESET_RATE,
    ):
        self._max_block = max_header_block
        self._skip = preface
        self._partial = b""
        # Encoded bytes of the header block in progress, or -1 outside one.
        self._block = -1
        #: When the header block in progress started (for a slow-header
        #: timeout), or L{None}.
        self.block_started = None
        self.control = Budget(control_burst, control_rate)
        self.resets = Budget(reset_burst, reset_rate)

    @property
    def in_header_block(self) -> bool:
        """Whether a header block was started and not finished."""
        return self._block >= 0

    def feed(self, data: bytes, now: float) -> str | None:
        """
        Look at the frames in C{data}, the next bytes from the client.

        :return: L{None}, or why the client must be sent away (a sentence).
        """
        pos = self._skip
        size = len(data)
        if pos >= size:
            self._skip = pos - size
            return None
        if self._partial:
            data = self._partial + data[pos:]
            self._partial = b""
            pos = 0
            size = len(data)
        while pos + 9 <= size:
            length = int.from_bytes(data[pos : pos + 3], "big")
            kind = data[pos + 3]
            flags = data[pos + 4]
            pos += 9 + length
            if kind == DATA:
                if not length and not flags & _END_STREAM and not self.control.take(now):
                    return "flood of empty DATA frames"
            elif kind == HEADERS or kind == CONTINUATION:
                why = self._header_block(kind, length, flags, now)
                if why is not None:
                    return why
            elif kind == RST_STREAM:
                if not self.resets.take(now):
                    return "streams reset faster than the reset budget (rapid reset)"
            elif kind == WINDOW_UPDATE or kind == GOAWAY:
                # WINDOW_UPDATE follows the data Balance sends; GOAWAY ends it.
                pass
            elif kind == SETTINGS and flags & _ACK:
                # Acknowledges Balance's own SETTINGS.
                pass
            elif not self.control.take(now):
                return "flood of control frames (SETTINGS, PING, PRIORITY or unknown)"
        if pos > size:
            self._skip = pos - size
        elif pos < size:
            self._partial = data[pos:]
            self._skip = 0
        else:
            self._skip = 0
        return None

    def _header_block(self, kind: int, length: int, flags: int, now: float) -> str | None:
        if kind == HEADERS:
            block = length
            self.block_started = now
        elif self._block < 0:
            # A CONTINUATION out of place: the frame layer refuses it as a
            # protocol error.
            return None
        else:
            block = self._block + length
            if not length and not flags & _END_HEADERS and not self.control.take(now):
                return "flood of empty CONTINUATION frames"
        if flags & _END_HEADERS:
            self._block = -1
            self.block_started = None
            return None
        if block > self._max_block:
            return "header block larger than max_header_bytes (CONTINUATION flood)"
        self._block = block
        return None

    def stream_refused(self, now: float) -> bool:
        """
        Balance refused a stream the client opened beyond the concurrency
        limit it was told: that costs a header decode, like a reset.

        :return: L{False} when the reset budget is exhausted.
        """
        return self.resets.take(now)

    def request_completed(self, now: float) -> None:
        """A request was answered in full: the client earns some slack."""
        self.resets.refund(now)
        self.control.refund(now)
