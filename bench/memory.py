#!/usr/bin/env python3
"""
Memory per idle connection: Balance against haproxy and nginx.

For each proxy (one worker, pinned to one core) it opens many idle client
connections and reads how much the proxy's resident memory (VmRSS of the
process and its children) grew, divided by the connections that are still
open at the end:

  - C{l7}: 10,000 client connections to an HTTP listener (an nginx origin
    behind it); with C{--request} each first sends one GET and reads the
    answer, then stays open as an idle keep-alive connection;
  - C{l4}: 9,000 connections through a TCP forward to the same origin: each
    is a pair (client side and backend side) in the proxy.

    python3 bench/memory.py [--sections l7,l4] [--reps 3] [--l7-conns 10000]
        [--l4-conns 9000] [--request] [--peers balance,haproxy,nginx] [--json out.json]

Each rep starts every proxy afresh and warms it up (a few hundred
connections opened, used and closed) before the baseline is read.  Needs
RLIMIT_NOFILE above twice the connections: it raises its own limit (and, as
root, the hard limit), which the proxies inherit.  Linux only; imports the
helpers of bench/http1.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import http1
from http1 import Fatal, Skip, free_port, in_workdir, say

PEERS = ("balance", "haproxy", "nginx")
SECTIONS = ("l7", "l4")
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def raise_nofile(want: int) -> int:
    """Raise RLIMIT_NOFILE (hard too when allowed) to at least C{want}; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def tree_rss_kb(pid: int) -> int:
    total = 0
    for p in [pid, *http1.descendants(pid)]:
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def tree_fds(pid: int) -> int:
    n = 0
    for p in [pid, *http1.descendants(pid)]:
        with contextlib.suppress(OSError):
            n += len(os.listdir(f"/proc/{p}/fd"))
    return n


# ------------------------------------------------------------------ configs


def haproxy_maxconn(conns: int) -> int:
    return min(conns + 100, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 300) // 2)


def haproxy_conf(section: str, port: int, origin: int, conns: int) -> str:
    mode = "http" if section == "l7" else "tcp"
    extra = "    http-reuse always\n" if section == "l7" else ""
    # ulimit-n set explicitly: haproxy then warns, instead of refusing to
    # start, when the hard limit is below the 2 x maxconn it would reserve
    # (idle client connections of the l7 section need one each).
    return f"""global
    nbthread 1
    maxconn {haproxy_maxconn(conns)}
    ulimit-n {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}

defaults
    mode {mode}
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s

frontend fe
    bind 127.0.0.1:{port} backlog 4096
    default_backend be

backend be
{extra}    server origin 127.0.0.1:{origin}
"""


def _patient(conf: str) -> str:
    # nginx closes a connection that sends no request within 60 s by
    # default; idle connections must stay for the whole measurement.
    return conf.replace("access_log off;", "access_log off;\n    client_header_timeout 300s;")


def nginx_conf(section: str, d: str, port: int, origin: int, conns: int) -> str:
    if section == "l7":
        return _patient(http1.nginx_proxy_conf(d, port, origin, conns + 100))
    common = http1._nginx_common(d, "nginx", 2 * conns + 100)
    module = "/usr/lib/nginx/modules/ngx_stream_module.so"
    load = f"load_module {module};\n" if os.path.exists(module) else ""
    return load + common + f"""stream {{
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_pass 127.0.0.1:{origin};
        proxy_timeout 300s;
    }}
}}
"""


def balance_conf(section: str, port: int, origin: int) -> str:
    # backlog=4096 as for haproxy and nginx: Twisted's default of 50
    # overflows when 10k clients connect at once (SYN retries of 1 s+).
    if section == "l7":
        how = 'protocol: http\n    routes: [{match: {path_prefix: "/"}, cluster: origin}]'
    else:
        how = "protocol: tcp\n    cluster: origin"
    return f"""# generated by bench/memory.py
drain_timeout: 1s
listeners:
  - name: bench
    listen: "tcp:{port}:interface=127.0.0.1:backlog=4096"
    {how}
    timeouts: {{handshake: 300s, idle: 300s}}
clusters:
  - name: origin
    backends: [{{address: "127.0.0.1:{origin}"}}]
    circuit_breaker: {{max_connections: 100000, max_pending: 100000, max_requests: 100000}}
"""


def start_peer(peer: str, section: str, a, procs, d: str, origin: int, conns: int):
    port = free_port()
    name = f"{peer}-{section}"
    if peer == "haproxy":
        exe = shutil.which("haproxy")
        if not exe:
            raise Skip("haproxy is not installed")
        cfg = os.path.join(d, f"{name}.cfg")
        with open(cfg, "w") as f:
            f.write(haproxy_conf(section, port, origin, conns))
        argv = [exe, "-db", "-f", cfg]
        env = None
    elif peer == "nginx":
        exe = shutil.which("nginx")
        if not exe:
            raise Skip("nginx is not installed")
        cfg = os.path.join(d, f"{name}.conf")
        with open(cfg, "w") as f:
            f.write(nginx_conf(section, d, port, origin, conns))
        argv = [exe, "-p", d, "-e", os.path.join(d, "nginx.error.log"), "-c", cfg,
                "-g", "daemon off;"]
        env = None
    elif peer == "balance":
        cfg = os.path.join(d, f"{name}.yaml")
        with open(cfg, "w") as f:
            f.write(balance_conf(section, port, origin))
        argv = [a.balance_python, "-m", "twisted", "--log-format=text", "balance",
                "--config", cfg]
        env = dict(os.environ)
        if a.balance_path:
            env["PYTHONPATH"] = a.balance_path + os.pathsep + env.get("PYTHONPATH", "")
    else:
        raise Fatal(f"unknown peer {peer!r}")
    proc = procs.start(name, argv, a.proxy_cpu, d, env=env)
    try:
        http1.wait_listening(proc, port)
        http1.check_http(port, "/", 100)
    except Skip:
        procs.stop(proc)
        raise
    return proc, port


# ------------------------------------------------------------------ measure


def open_conns(port: int, n: int, request: bool) -> tuple[list[socket.socket], int]:
    socks, failed = [], 0
    for _ in range(n):
        s = socket.socket()
        s.settimeout(10)
        try:
            s.connect(("127.0.0.1", port))
            if request:
                s.sendall(REQUEST)
            socks.append(s)
        except OSError:
            failed += 1
            s.close()
    if request:
        for s in socks:
            with contextlib.suppress(OSError):
                s.recv(65536)
    return socks, failed


def settle(pid: int, timeout: float = 30.0) -> None:
    """Wait until the proxy's fd count has not changed for 1.5 s."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = tree_fds(pid)
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > 1.5:
            return
        time.sleep(0.25)


def alive(socks: list[socket.socket]) -> int:
    n = 0
    for s in socks:
        try:
            s.setblocking(False)
            if s.recv(1) != b"":
                n += 1
        except BlockingIOError:
            n += 1
        except OSError:
            pass
    return n


def measure(peer: str, section: str, a, procs, d: str, origin: int) -> dict:
    conns = a.l7_conns if section == "l7" else a.l4_conns
    if peer == "haproxy":
        # haproxy refuses to start when 2 x maxconn exceeds the fd limit.
        conns = min(conns, haproxy_maxconn(conns) - 50)
    request = a.request and section == "l7"
    proc, port = start_peer(peer, section, a, procs, d, origin, conns)
    try:
        # Warm-up: lazy imports, first allocations, pools.
        warm, _ = open_conns(port, 200, True)
        for s in warm:
            s.close()
        settle(proc.pid)
        rss0, fds0 = tree_rss_kb(proc.pid), tree_fds(proc.pid)
        t0 = time.monotonic()
        socks, failed = open_conns(port, conns, request)
        t_open = time.monotonic() - t0
        settle(proc.pid)
        t_settle = time.monotonic() - t0
        rss1, fds1 = tree_rss_kb(proc.pid), tree_fds(proc.pid)
        ok = alive(socks)
        for s in socks:
            s.close()
    finally:
        procs.stop(proc)
    r = {"peer": peer, "section": section, "conns": conns, "request": request,
         "failed": failed, "alive": ok, "rss_before_kb": rss0, "rss_after_kb": rss1,
         "fds_before": fds0, "fds_after": fds1,
         "open_s": t_open, "settled_s": t_settle,
         "bytes_per_conn": (rss1 - rss0) * 1024 / max(1, ok)}
    say(f"{section} {peer}: rss {rss0} -> {rss1} kB, fds {fds0} -> {fds1}, alive {ok}/{conns}, "
        f"opened in {t_open:.1f} s, settled in {t_settle:.1f} s, "
        f"{r['bytes_per_conn']:.0f} B/conn")
    return r


def summarize(runs: list[dict], a) -> list[dict]:
    rows = []
    for section in a.section_list:
        for peer in a.peer_list:
            rr = [r for r in runs if r["peer"] == peer and r["section"] == section]
            if not rr:
                continue
            vals = [r["bytes_per_conn"] for r in rr]
            rows.append({"section": section, "peer": peer, "runs": len(rr),
                         "conns": rr[0]["conns"], "alive": min(r["alive"] for r in rr),
                         "bytes_per_conn": statistics.median(vals),
                         "bytes_per_conn_min": min(vals), "bytes_per_conn_max": max(vals)})
    for row in rows:
        bal = next((r for r in rows if r["section"] == row["section"] and r["peer"] == "balance"),
                   None)
        if bal and row["bytes_per_conn"] > 0:
            row["balance_ratio"] = bal["bytes_per_conn"] / row["bytes_per_conn"]
    return rows


def markdown_table(rows: list[dict]) -> str:
    out = ["| section | peer | runs | conns alive | bytes per idle conn | balance ÷ peer |",
           "|" + " --- |" * 6]
    for r in rows:
        rng = f"{r['bytes_per_conn_min']:,.0f}-{r['bytes_per_conn_max']:,.0f}"
        ratio = f"{r['balance_ratio']:.2f}x" if r.get("balance_ratio") else "-"
        out.append(f"| {r['section']} | {r['peer']} | {r['runs']} | {r['alive']:,}/{r['conns']:,} "
                   f"| {r['bytes_per_conn']:,.0f} ({rng}) | {ratio} |")
    return "\n".join(out)


def run(a, procs, d: str):
    # l7: one socket per connection in the proxy; l4: two.
    need = max(a.l7_conns, 2 * a.l4_conns) + 1000
    have = raise_nofile(need)
    if have < need:
        say(f"warning: RLIMIT_NOFILE is {have}, below the {need} needed; connections will fail")
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {a.load_cpu})
    origin_port = free_port()
    with open(os.path.join(d, "origin.conf"), "w") as f:
        f.write(_patient(http1.origin_conf(d, origin_port, 100, max(a.l7_conns, a.l4_conns) + 500)))
    os.makedirs(os.path.join(d, "www"), exist_ok=True)
    origin = procs.start("origin", [shutil.which("nginx") or "nginx", "-p", d, "-e",
                                    os.path.join(d, "origin.error.log"), "-c",
                                    os.path.join(d, "origin.conf"), "-g", "daemon off;"],
                         a.load_cpu, d)
    http1.wait_listening(origin, origin_port)
    runs, skipped = [], {}
    for rep in range(a.reps):
        for section in a.section_list:
            for peer in a.peer_list:
                if (peer, section) in skipped:
                    continue
                try:
                    r = measure(peer, section, a, procs, d, origin_port)
                except Skip as e:
                    skipped[(peer, section)] = str(e)
                    say(f"skip {peer} {section}: {e}")
                    continue
                r["rep"] = rep
                runs.append(r)
    return runs, {f"{p} {s}": why for (p, s), why in skipped.items()}


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench/memory.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--l7-conns", type=int, default=10000)
    ap.add_argument("--l4-conns", type=int, default=9000)
    ap.add_argument("--request", action="store_true",
                    help="l7: send one GET on each connection before it idles")
    ap.add_argument("--balance-python", default=sys.executable)
    ap.add_argument("--balance-path", default=CHECKOUT,
                    help="put this checkout first on Balance's PYTHONPATH ('' for none)")
    ap.add_argument("--proxy-cpu", type=int, default=1)
    ap.add_argument("--load-cpu", type=int, default=0)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    a.peer_list = [p for p in a.peers.split(",") if p]
    a.section_list = [s for s in a.sections.split(",") if s]
    if set(a.peer_list) - set(PEERS) or set(a.section_list) - set(SECTIONS):
        ap.error(f"peers from {PEERS}, sections from {SECTIONS}")
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))
    try:
        runs, skipped = in_workdir("balance-mem-", a.keep, lambda p, d: run(a, p, d))
    except Fatal as e:
        say(f"error: {e}")
        return 2
    rows = summarize(runs, a)
    cmd = ["python3", "bench/memory.py", *argv]
    how = "one GET each, then idle keep-alive" if a.request else "connected, nothing sent"
    print(f"\n## Balance memory per idle connection\n\ncommand: `{' '.join(cmd)}`\n\n"
          f"RSS growth of the proxy (process tree) / connections alive; l7: {a.l7_conns:,} "
          f"client connections ({how}); l4: {a.l4_conns:,} connections forwarded (a client and "
          f"a backend socket each); medians of {a.reps} (min-max).\n")
    print(markdown_table(rows))
    for what, why in skipped.items():
        print(f"\nskipped {what}: {why}")
    if a.json:
        with open(a.json, "w") as f:
            http1.dump_json({"bench": "memory", "command": cmd, "options": vars(a), "summary": rows,
                       "runs": runs, "skipped": skipped}, f, indent=2, default=str)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
