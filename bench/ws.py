#!/usr/bin/env python3
"""
WebSocket echo benchmark: messages per second through Balance's WebSocket
tunnel (plain and frame-aware), through haproxy, and with no proxy.

A WebSocket echo origin and a load generator, both written here with the
standard library (selectors, non-blocking sockets, precomputed frames), run
on one core; each proxy runs on another.  The load generator opens
--connections WebSockets, keeps --depth messages of --size bytes in flight
on each, and counts the echoes for --duration seconds, while the proxy's
CPU time (utime+stime from /proc) is read around the run:

    python3 bench/ws.py [--duration 5] [--reps 3] [--connections 50]
        [--depth 1] [--size 64] [--peers direct,balance,balance-frames,haproxy]

Peers: C{direct} (the generator talks to the origin), C{balance} (a route
with C{websocket: true}), C{balance-frames} (the same with
C{websocket_max_message_bytes}: Balance follows every frame header and
counts messages), C{haproxy} (C{mode http}, which passes WebSockets on as
tunnels).  See bench/README.md; the process helpers come from
bench/http1.py.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import http1  # bench/ is not a package: its directory is on sys.path
from http1 import (  # bench/ is not a package: its directory is on sys.path
    Fatal,
    Procs,
    Skip,
    _f,
    _nofile,
    check_cpus,
    cpu_model,
    free_port,
    in_workdir,
    say,
    tree_cpu_seconds,
    version_of,
    wait_listening,
)

PEERS = ("direct", "balance", "balance-frames", "haproxy")
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MASK = b"\x37\xfa\x21\x3d"


# ------------------------------------------------------------------ frames


def frame(payload: bytes, masked: bool) -> bytes:
    """One final binary frame; masked with a fixed key (as a client sends)."""
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", 0x82, bit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x82, bit | 126, n)
    else:
        head = struct.pack("!BBQ", 0x82, bit | 127, n)
    if not masked:
        return head + payload
    body = bytes(b ^ _MASK[i % 4] for i, b in enumerate(payload))
    return head + _MASK + body


class _Conn:
    """
    One socket of the pump: every C{unit} bytes received are one message,
    answered with C{reply} (the origin echoes, the generator sends the next).
    """

    __slots__ = ("sock", "unit", "reply", "got", "out", "head")

    def __init__(self, sock: socket.socket, unit: int, reply: bytes, head: bool):
        self.sock = sock
        self.unit = unit
        self.reply = reply
        self.got = 0
        self.out = b""
        # The origin reads a handshake first.
        self.head = b"" if head else None


def _pump(sel: selectors.BaseSelector, conns: dict, deadline: float | None, accepted) -> int:
    """
    Move messages until C{deadline}; return how many arrived.

    :param accepted: C{(unit, reply)} of the connections a listening socket
        (registered with no data) accepts.
    """
    count = 0
    while deadline is None or time.monotonic() < deadline:
        for key, events in sel.select(0.2):
            c = key.data
            if c is None:
                sock, _ = key.fileobj.accept()
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                c = conns[sock] = _Conn(sock, *accepted, head=True)
                sel.register(sock, selectors.EVENT_READ, c)
                continue
            if events & selectors.EVENT_READ:
                try:
                    data = c.sock.recv(1 << 18)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    sel.unregister(c.sock)
                    c.sock.close()
                    conns.pop(c.sock, None)
                    continue
                if data:
                    if c.head is not None:
                        c.head += data
                        if b"\r\n\r\n" not in c.head:
                            continue
                        head, _, rest = c.head.partition(b"\r\n\r\n")
                        c.head = None
                        c.out += _accept_response(head)
                        data = rest
                    c.got += len(data)
                    n, c.got = divmod(c.got, c.unit)
                    count += n
                    if n:
                        c.out += c.reply * n
            if c.out:
                try:
                    sent = c.sock.send(c.out)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    sent = len(c.out)
                c.out = c.out[sent:]
                sel.modify(
                    c.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0), c
                )
    return count


def _accept_response(head: bytes) -> bytes:
    key = b""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


def serve_origin(port: int, size: int) -> None:
    """The echo origin: answer handshakes, echo each client frame as a server frame."""
    payload = b"m" * size
    unit = len(frame(payload, True))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    _pump(sel, {}, None, (unit, frame(payload, False)))


def drive(port: int, connections: int, depth: int, size: int, seconds: float) -> dict:
    """The load generator: C{connections} WebSockets, C{depth} messages in flight on each."""
    payload = b"m" * size
    message = frame(payload, True)
    echo = len(frame(payload, False))
    sel = selectors.DefaultSelector()
    conns = {}
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = base64.b64encode(os.urandom(16))
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise SystemExit(f"connection closed during the handshake: {head!r}")
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        if not head.startswith(b"HTTP/1.1 101") or accept not in head:
            raise SystemExit(f"handshake refused: {head!r}")
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = conns[sock] = _Conn(sock, echo, message, head=False)
        c.got = len(rest)
        c.out = message * depth
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
    start = time.monotonic()
    count = _pump(sel, conns, start + seconds, (echo, message))
    elapsed = time.monotonic() - start
    for sock in list(conns):
        sock.close()
    return {"messages": count, "seconds": elapsed}


# ------------------------------------------------------------------ peers


def balance_conf(port: int, origin: int, frames: bool) -> str:
    """One listener whose route passes WebSockets to the origin; C{frames}: frame-aware."""
    limit = "\n        websocket_max_message_bytes: 1MiB" if frames else ""
    return f"""# generated by bench/ws.py
listeners:
  - name: bench
    listen: "tcp:{port}:interface=127.0.0.1"
    protocol: http
    limits: {{max_connections: 100000}}
    routes:
      - match: {{path_prefix: "/"}}
        cluster: origin
        websocket: true{limit}
clusters:
  - name: origin
    backends: [{{address: "127.0.0.1:{origin}"}}]
"""


def haproxy_conf(port: int, origin: int) -> str:
    """haproxy in http mode, one thread: upgraded connections become tunnels."""
    return f"""global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout tunnel 300s

frontend fe
    bind 127.0.0.1:{port} backlog 4096
    default_backend be

backend be
    server origin 127.0.0.1:{origin}
"""


def start_peer(name: str, a, procs: Procs, d: str, origin: int):
    """Start a proxy; return (its Proc, its port)."""
    port = free_port()
    if name == "haproxy":
        exe = shutil.which("haproxy")
        if not exe:
            raise Skip("haproxy is not installed (apt-get install haproxy)")
        cfg = os.path.join(d, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(haproxy_conf(port, origin))
        argv = [exe, "-db", "-f", cfg]
    else:
        cfg = os.path.join(d, f"{name}.yaml")
        with open(cfg, "w") as f:
            f.write(balance_conf(port, origin, name == "balance-frames"))
        base = [a.balance_python, "-m", "twisted", "--log-format=text", "balance", "--config", cfg]
        p = subprocess.run([*base, "--check"], capture_output=True, text=True, cwd=d)
        if p.returncode != 0:
            raise Skip(f"Balance refused {cfg}: {(p.stdout + p.stderr).strip()[-400:]}")
        argv = base
    proc = procs.start(name, argv, a.proxy_cpu, d)
    try:
        wait_listening(proc, port)
    except Skip:
        procs.stop(proc)
        raise
    return proc, port


def run_driver(a, port: int, seconds: float) -> dict:
    """Run the load generator pinned to the load CPU; its JSON result."""
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        "--role",
        "drive",
        "--port",
        str(port),
        "--connections",
        str(a.connections),
        "--depth",
        str(a.depth),
        "--size",
        str(a.size),
        "--duration",
        str(seconds),
    ]
    p = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        preexec_fn=lambda: os.sched_setaffinity(0, {a.load_cpu}),
    )
    if p.returncode != 0:
        raise Skip(f"the load generator failed: {(p.stdout + p.stderr).strip()[-400:]}")
    return json.loads(p.stdout)


def measure(a, peer: str, port: int, proxy) -> dict:
    """A warm-up, then one measured run, with the proxy's CPU time around it."""
    if a.warmup > 0:
        run_driver(a, port, a.warmup)
    c0 = tree_cpu_seconds(proxy.pid) if proxy else 0.0
    r = run_driver(a, port, a.duration)
    time.sleep(0.2)
    c1 = tree_cpu_seconds(proxy.pid) if proxy else 0.0
    out = {"peer": peer, "msgs": r["messages"] / r["seconds"], "messages": r["messages"]}
    if proxy:
        out["cpu_us"] = (c1 - c0) * 1e6 / max(r["messages"], 1)
        out["busy"] = (c1 - c0) / r["seconds"]
    return out


def summarize(runs: list[dict], peers: list[str]) -> list[dict]:
    """Per peer: medians over its runs, and Balance's CPU per echo divided by its."""
    rows = []
    for peer in peers:
        mine = [r for r in runs if r["peer"] == peer]
        if not mine:
            continue
        row = {"peer": peer, "runs": len(mine), "msgs": statistics.median(r["msgs"] for r in mine)}
        row["msgs_min"] = min(r["msgs"] for r in mine)
        row["msgs_max"] = max(r["msgs"] for r in mine)
        if "cpu_us" in mine[0]:
            row["cpu_us"] = statistics.median(r["cpu_us"] for r in mine)
            row["busy"] = statistics.median(r["busy"] for r in mine)
        rows.append(row)
    base = next((r for r in rows if r["peer"] == "balance"), None)
    for row in rows:
        if base and row.get("cpu_us") and base.get("cpu_us"):
            row["ratio"] = base["cpu_us"] / row["cpu_us"]
    return rows


def table(rows: list[dict]) -> str:
    """The summary as a Markdown table."""
    out = [
        "| peer | runs | echoes/s | proxy CPU us/echo | proxy core busy | balance CPU ÷ peer |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        out.append(
            f"| {row['peer']} | {row['runs']} | {row['msgs']:,.0f} "
            f"({row['msgs_min']:,.0f}-{row['msgs_max']:,.0f}) | {_f(row.get('cpu_us'), '.1f')} "
            f"| {_f(row.get('busy'), '.0%')} | {_f(row.get('ratio'), '.2f', 'x')} |"
        )
    return "\n".join(out)


def run(a, procs: Procs, d: str):
    """Start the origin and the peers, measure each peer --reps times, in turn."""
    origin_port = free_port()
    origin = procs.start(
        "origin",
        [
            sys.executable,
            os.path.abspath(__file__),
            "--role",
            "origin",
            "--port",
            str(origin_port),
            "--size",
            str(a.size),
        ],
        a.load_cpu,
        d,
    )
    wait_listening(origin, origin_port)
    started, skipped = {}, {}
    for peer in a.peer_list:
        if peer == "direct":
            started[peer] = (None, origin_port)
            continue
        try:
            started[peer] = start_peer(peer, a, procs, d, origin_port)
        except Skip as e:
            skipped[peer] = str(e)
            say(f"{peer}: skipped: {e}")
    runs = []
    for rep in range(a.reps):
        for peer, (proc, port) in started.items():
            if peer in skipped:
                continue
            try:
                r = measure(a, peer, port, proc)
            except Skip as e:
                skipped[peer] = str(e)
                say(f"{peer}: {e}")
                continue
            r["rep"] = rep
            runs.append(r)
            extra = f", {r['cpu_us']:.1f} us/echo, core {r['busy']:.0%}" if proc else ""
            say(f"rep {rep + 1} {peer}: {r['msgs']:,.0f} echoes/s{extra}")
    return runs, skipped


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench/ws.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5, help="seconds per measured run (5)")
    ap.add_argument("--reps", type=int, default=3, help="runs per peer (3)")
    ap.add_argument(
        "--warmup", type=float, default=1, help="unmeasured seconds before each run (1)"
    )
    ap.add_argument("--connections", type=int, default=50, help="WebSocket connections (50)")
    ap.add_argument("--depth", type=int, default=1, help="messages in flight per connection (1)")
    ap.add_argument("--size", type=int, default=64, help="message payload bytes (64)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated, in run order")
    ap.add_argument(
        "--balance-python",
        default=sys.executable,
        help="interpreter with Balance installed (this one)",
    )
    ap.add_argument("--proxy-cpu", type=int, default=1, help="CPU the proxies run on (1)")
    ap.add_argument(
        "--load-cpu", type=int, default=0, help="CPU for the load generator and the origin (0)"
    )
    ap.add_argument("--json", metavar="FILE", help="write every run and the summary as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument(
        "--role", choices=("bench", "origin", "drive"), default="bench", help=argparse.SUPPRESS
    )
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.peer_list = [p.strip() for p in a.peers.split(",") if p.strip()]
    unknown = [p for p in a.peer_list if p not in PEERS]
    if unknown:
        ap.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.role == "origin":
        serve_origin(a.port, a.size)
        return 0
    if a.role == "drive":
        print(json.dumps(drive(a.port, a.connections, a.depth, a.size, a.duration)))
        return 0
    if not sys.platform.startswith("linux"):
        say("bench/ws.py needs Linux (/proc, CPU affinity)")
        return 2
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    _nofile()
    try:
        check_cpus(a)
        runs, skipped = in_workdir("balance-ws-bench-", a.keep, lambda p, d: run(a, p, d))
    except Fatal as e:
        say(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    rows = summarize(runs, a.peer_list)
    cmd = ["python3", "bench/ws.py", *argv]
    print(f"\n## Balance WebSocket echo benchmark\n\ncommand: `{' '.join(cmd)}`\n")
    print(
        f"{a.connections} WebSockets x {a.depth} message(s) of {a.size} bytes in flight, "
        f"echoed by the origin; medians of {a.reps} runs of {a.duration:g} s (range in "
        f"parentheses); each proxy one process on CPU {a.proxy_cpu}, origin and load "
        f"generator on CPU {a.load_cpu}.\n"
    )
    print(table(rows))
    print(
        "\nproxy CPU us/echo = utime+stime of the proxy during the run / echoes "
        "(each echo is one message each way through the proxy)."
    )
    for peer, why in skipped.items():
        print(f"\n{peer} skipped: {why}")
    haproxy = version_of(["haproxy", "-v"]) if shutil.which("haproxy") else "-"
    print(
        f"\nmachine: {os.cpu_count()} CPUs, {cpu_model()}; haproxy {haproxy}; "
        f"python {sys.version.split()[0]}"
    )
    if a.json:
        with open(a.json, "w") as f:
            http1.dump_json(
                {"command": cmd, "summary": rows, "runs": runs, "skipped": skipped}, f, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
