"""
Fuzz the HTTP/1.1 downstream parser path of Balance, in memory.

The input is split into segments at fuzzer-chosen points and sent by one
client; a fake backend answers each complete request with an empty 200.
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
    import httptools

    from balance.testing import InMemoryProxy, parse_requests, parse_responses

CONFIG = """
listeners:
  - name: web
    listen: "tcp:8080"
    cluster: app
    limits: {max_header_bytes: 2KiB, max_body_bytes: 16KiB}
clusters:
  - {name: app, backends: ["10.0.0.1:80"]}
"""
ANSWER = b"HTTP/1.1 200 OK\r\nX-From: backend\r\nContent-Length: 0\r\n\r\n"
# Statuses Balance itself may answer with on this config.
LOCAL = {400, 404, 405, 408, 413, 417, 431, 501, 502, 503, 504, 505}


def check_request(request) -> None:
    hosts = request.header_values(b"host")
    assert len(hosts) == 1, request.headers
    te = request.header_values(b"transfer-encoding")
    cl = request.header_values(b"content-length")
    assert len(te) + len(cl) <= 1, request.headers
    if te:
        assert te[0].rpartition(b",")[2].strip() == b"chunked", te
        assert te[0].lower().count(b"chunked") == 1, te
    for _name, value in request.headers:
        assert b"\r" not in value and b"\n" not in value and b"\x00" not in value


def test_one_input(data: bytes) -> None:
    rng = random.Random(zlib.crc32(data))
    cuts = [rng.randint(1, 512) for _ in range(rng.randint(0, 6))]
    payload = data
    proxy = InMemoryProxy(CONFIG)
    client = proxy.client()
    pos = 0
    for cut in cuts:
        client.send(payload[pos : pos + cut])
        pos += cut
        proxy.run()
    client.send(payload[pos:])
    answered = {}
    responded = 0
    for _ in range(50):
        proxy.run(1)
        progress = False
        for conn in proxy.backend().connections:
            try:
                requests = parse_requests(conn.received())
            except httptools.HttpParserError as e:
                raise AssertionError(f"a backend got bytes it cannot parse: {e}") from None
            complete = [r for r in requests if r.complete]
            for request in complete[answered.get(conn, 0) :]:
                check_request(request)
                if not conn.transport.disconnecting and not conn.transport.lost:
                    conn.respond(ANSWER)
                    responded += 1
                progress = True
            answered[conn] = len(complete)
        if not progress:
            break
    proxy.run(120)
    try:
        responses = parse_responses(client.received())
    except ValueError as e:
        raise AssertionError(f"the client got something that is not responses: {e}") from None
    from_backend = [r for r in responses if r.header(b"x-from") == b"backend"]
    for r in responses:
        assert r.status in LOCAL or r.header(b"x-from") == b"backend" or r.status < 200, r.status
    # Each answer the backend gave reaches the client: one more answered
    # request than the client sees is one Balance forwarded without knowing
    # it (a request split in two, the second smuggled).
    assert len(from_backend) == responded, (len(from_backend), responded)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
