"""
A gRPC server and client (grpcio) for the gRPC tests, each run in a process
of its own: no generated code, generic handlers with bytes in and out.

    python grpc_peer.py server          # prints its port, serves until killed
    python grpc_peer.py client TARGET   # runs the calls, prints JSON results
    python grpc_peer.py drain TARGET    # a call in flight across a drain
    python grpc_peer.py status TARGET   # one unary call: its code and details

Methods of the service C{test.Echo}:

  - C{Unary}: the request back, reversed; a request C{b"missing"} fails
    with NOT_FOUND and details C{"no such thing"};
  - C{Stream}: server streaming, C{N} messages C{b"item-I"} for a request
    C{b"N"}.

and C{grpc.health.v1.Health/Check} (serialized protobuf, written by hand):
the server (service C{""}) and C{test.Echo} are C{SERVING}, C{broken} is
C{NOT_SERVING}, any other service fails with NOT_FOUND, as grpcio's own
health servicer answers.
"""

from __future__ import annotations

import json
import sys
import threading
import time


def _identity(data: bytes) -> bytes:
    return data


def serve() -> None:
    from concurrent import futures

    import grpc

    def unary(request: bytes, context) -> bytes:
        if request == b"missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return request[::-1]

    def stream(request: bytes, context):
        slow = request.startswith(b"slow")
        for i in range(int(request[4:] if slow else request)):
            if slow and i:
                # Keeps the call in flight while the test drains Balance.
                time.sleep(0.3)
            yield b"item-%d" % i

    def check(request: bytes, context) -> bytes:
        # HealthCheckRequest: field 1 (service), a short string, or nothing.
        service = request[2:].decode() if request[:1] == b"\x0a" else ""
        if service in ("", "test.Echo"):
            return b"\x08\x01"  # SERVING
        if service == "broken":
            return b"\x08\x02"  # NOT_SERVING
        context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")

    health = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {"Check": grpc.unary_unary_rpc_method_handler(check, _identity, _identity)},
    )
    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, _identity, _identity),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, _identity, _identity),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler, health))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    # Until the test stops this process (SIGTERM) or closes its stdin.
    threading.Thread(target=lambda: (sys.stdin.read(), server.stop(0)), daemon=True).start()
    server.wait_for_termination()


def client(target: str) -> None:
    import grpc

    results = {}
    with grpc.insecure_channel(target) as channel:
        unary = channel.unary_unary("/test.Echo/Unary", _identity, _identity)
        stream = channel.unary_stream("/test.Echo/Stream", _identity, _identity)
        response, call = unary.with_call(b"hello", timeout=20)
        results["unary"] = response.decode()
        results["unary_code"] = call.code().name
        results["stream"] = [m.decode() for m in stream(b"5", timeout=20)]
        big = unary(b"y" * 1_000_000, timeout=20)
        results["big"] = len(big)
        try:
            unary(b"missing", timeout=20)
        except grpc.RpcError as e:
            results["error_code"] = e.code().name
            results["error_details"] = e.details()
    print(json.dumps(results), flush=True)


def drain_client(target: str) -> None:
    """
    A slow server-streaming call: "first" once its first message came,
    then the rest after a line on stdin (the test drained Balance
    meanwhile), then a unary call on the same channel.
    """
    import grpc

    results = {}
    with grpc.insecure_channel(target) as channel:
        unary = channel.unary_unary("/test.Echo/Unary", _identity, _identity)
        stream = channel.unary_stream("/test.Echo/Stream", _identity, _identity)
        messages = stream(b"slow5", timeout=30)
        results["stream"] = [next(messages).decode()]
        print("first", flush=True)
        sys.stdin.readline()
        results["stream"] += [m.decode() for m in messages]
        results["after"] = unary(b"again", timeout=20).decode()
    print(json.dumps(results), flush=True)


def status(target: str) -> None:
    """One unary call (no deadline of the client's own): its status as JSON."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        unary = channel.unary_unary("/test.Echo/Unary", _identity, _identity)
        try:
            unary(b"hello")
        except grpc.RpcError as e:
            print(json.dumps({"code": e.code().name, "details": e.details()}), flush=True)
        else:
            print(json.dumps({"code": "OK", "details": ""}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve()
    elif sys.argv[1] == "status":
        status(sys.argv[2])
    elif sys.argv[1] == "drain":
        drain_client(sys.argv[2])
    else:
        client(sys.argv[2])
