# -*- test-case-name: tests.http.test_h2,tests.http.test_h2_upstream -*-
"""
What the two kinds of HTTP/2 stream share: a queue of body bytes that the
connection frames as the peer's flow-control windows allow, and the
producer (the other side of the Exchange) paused beyond L{HIGH_WATER}
queued bytes and resumed below L{LOW_WATER}.

L{balance.http.h2_stream.H2Stream} queues a response for a client,
L{balance.http.h2_upstream.H2UpstreamStream} a request for a backend.
"""

from __future__ import annotations

__all__ = ["HIGH_WATER", "LOW_WATER", "QueuedStream"]

#: Body bytes queued for one stream beyond which its producer is paused,
#: and below which it is resumed.
HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024


class QueuedStream:
    """
    A stream's outgoing body queue and its producer.

    Subclasses have the slots C{_out} (a deque of chunks), C{_out_bytes},
    C{_end} (the body is complete), C{_trailers} (fields or L{None}),
    C{_producer} and C{_producer_paused}.
    """

    __slots__ = ()

    @property
    def transport(self):
        """The stream stands for the transport the body it queues goes to."""
        return self

    def registerProducer(self, producer, streaming: bool) -> None:
        """The other side of the Exchange streams the body to this stream."""
        self._producer = producer
        self._producer_paused = False
        if self._out_bytes > HIGH_WATER:
            self._pause_producer()

    def unregisterProducer(self) -> None:
        """The body ended; the Exchange resumes the producer if we paused it."""
        self._producer = None
        self._producer_paused = False

    def _pause_producer(self) -> None:
        producer = self._producer
        if producer is not None and not self._producer_paused:
            self._producer_paused = True
            producer.pauseProducing()

    def _sent_chunk(self, chunk: bytes) -> None:
        """A DATA chunk went into the connection (a hook; nothing here)."""

    def _send_queued(self, h2conn, sid: int) -> bool:
        """
        Frame what the windows allow of the queue into C{h2conn}, and
        resume the producer once the queue is short again.

        :return: whether END_STREAM went with the last DATA frame.
        """
        out = self._out
        window = h2conn.local_flow_control_window(sid)
        max_frame = h2conn.max_outbound_frame_size
        ended = False
        while out and window > 0:
            chunk = out[0]
            size = len(chunk)
            if size > window or size > max_frame:
                size = window if window < max_frame else max_frame
                out[0] = chunk[size:]
                chunk = chunk[:size]
            else:
                out.popleft()
            window -= size
            self._out_bytes -= size
            self._sent_chunk(chunk)
            ended = self._end and not out and self._trailers is None
            h2conn.send_data(sid, chunk, end_stream=ended)
        if self._producer_paused and self._out_bytes < LOW_WATER:
            self._producer_paused = False
            self._producer.resumeProducing()
        return ended
