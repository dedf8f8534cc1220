"""
Fuzz Balance's HTTP/2 frame layer and HPACK decoder
(L{balance.http.h2_conn.ServerConnection}, L{balance.http.hpack}).

See README.md for the invariants.
"""

import os
import random
import sys
import zlib

import atheris

# The balance package of this checkout, not an installed one.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports(include=["balance"]):
    from balance.http.h2_conn import PREFACE, H2ConnectionError, ServerConnection, frame
    from balance.http.hpack import Decoder, HeaderListTooLarge, HPACKError

SETTINGS = frame(4, 0, 0)


class Recorder:
    """A handler that writes down what the frame layer calls."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name,) + args)


def split_points(data: bytes, most: int) -> list[int]:
    """Segment sizes derived from the input itself, so seeds stay plain bytes."""
    rng = random.Random(zlib.crc32(data))
    return [rng.randint(1, most) for _ in range(rng.randint(0, 8))]


def run(data: bytes, cuts) -> tuple:
    handler = Recorder()
    conn = ServerConnection(handler, {3: 100}, connection_window=100 * 65535)
    chunks, pos = [], 0
    for cut in cuts:
        chunks.append(data[pos : pos + cut])
        pos += cut
    chunks.append(data[pos:])
    error = None
    try:
        for chunk in chunks:
            conn.receive(chunk)
    except H2ConnectionError as e:
        error = e.code
    return handler.calls, error, conn.data_to_send()


def test_one_input(data: bytes) -> None:
    try:
        Decoder(max_header_list_size=1 << 16).decode(data)
    except (HPACKError, HeaderListTooLarge):
        pass
    stream = PREFACE + SETTINGS + data
    whole = run(stream, [])
    split = run(stream, split_points(data, 64))
    assert whole == split, (whole, split)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
