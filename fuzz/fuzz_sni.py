"""
Fuzz the TLS ClientHello / SNI sniffer (L{balance.l4.sni.ClientHelloParser}).

See README.md for the invariants.
"""

import os
import random
import re
import sys
import zlib

import atheris

# The balance package of this checkout, not an installed one.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports(include=["balance"]):
    from balance.l4.sni import ClientHello, ClientHelloParser, NotTLS

LIMIT = 4096
HOSTNAME = re.compile(r"^[a-z0-9_*]([a-z0-9_.*-]*[a-z0-9_*])?$")


def split_points(data: bytes, most: int) -> list[int]:
    """Segment sizes derived from the input itself, so seeds stay plain bytes."""
    rng = random.Random(zlib.crc32(data))
    return [rng.randint(1, most) for _ in range(rng.randint(0, 8))]


def decide(chunks):
    parser = ClientHelloParser(LIMIT)
    fed = b""
    for chunk in chunks:
        fed += chunk
        decision = parser.feed(chunk)
        assert bytes(parser.buffered) == fed
        if decision is not None:
            return decision, fed
    return None, fed


def test_one_input(data: bytes) -> None:
    payload = data
    cuts = split_points(data, 300)
    whole, _ = decide([payload])
    chunks, pos = [], 0
    for cut in cuts:
        chunks.append(payload[pos : pos + cut])
        pos += cut
    chunks.append(payload[pos:])
    split, fed = decide(chunks)
    assert whole == split, (whole, split)
    if whole is None:
        assert len(payload) < LIMIT, len(payload)
        return
    assert isinstance(whole, (ClientHello, NotTLS))
    if isinstance(whole, ClientHello) and whole.server_name is not None:
        name = whole.server_name
        assert HOSTNAME.match(name), name
        assert not name.endswith("."), name


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
