"""
Fuzz the HTTP/1.1 / HTTP/2 sniffer of cleartext listeners
(L{balance.http.sniff.ProtocolSniffer}), with segmentation.

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
    from balance.http.h1 import DownstreamConnection
    from balance.http.h2 import H2DownstreamConnection
    from balance.http.h2_guard import PREFACE
    from balance.http.sniff import ProtocolSniffer
    from balance.testing import InMemoryProxy

CONFIG = """
listeners:
  - {name: web, listen: "tcp:8080", cluster: app}
clusters:
  - {name: app, backends: ["10.0.0.1:80"]}
"""
PROXY = InMemoryProxy(CONFIG)


def test_one_input(data: bytes) -> None:
    rng = random.Random(zlib.crc32(data))
    cuts = [rng.randint(1, 30) for _ in range(rng.randint(0, 8))]
    # Often start with some of the preface, so that both sides get explored.
    payload = PREFACE[: rng.choice([0, 0, 1, 3, 23, 24])] + data
    client = PROXY.client()
    sniffer = client.protocol
    assert isinstance(sniffer, ProtocolSniffer)
    pos = 0
    for cut in cuts:
        client.send(payload[pos : pos + cut])
        pos += cut
        PROXY.run()
    client.send(payload[pos:])
    PROXY.run()
    chosen = sniffer.chosen
    if payload.startswith(PREFACE):
        assert isinstance(chosen, H2DownstreamConnection), chosen
    elif PREFACE.startswith(payload):
        # Nothing that refutes the preface yet: undecided.
        assert chosen is None, (payload, chosen)
    else:
        assert isinstance(chosen, DownstreamConnection), (payload[:24], chosen)
    client.transport.abortConnection()
    PROXY.run()


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
