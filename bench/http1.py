#!/usr/bin/env python3
"""
Side-by-side HTTP/1.1 benchmark: Balance against haproxy and nginx.

Starts an origin (nginx serving a fixed body), then Balance, haproxy and nginx
as reverse proxies to it, each with one worker pinned to one core, and drives
each in turn with wrk (keep-alive, 50 connections by default) in the same run.
It prints requests/s, p50 and p99 latency and the proxy's CPU time per request
(utime+stime from /proc), and how Balance compares to each peer.

    python3 bench/http1.py [--duration 5] [--reps 3] [--connections 50]
        [--body 100] [--peers direct,balance,haproxy,nginx] [--json out.json]

See bench/README.md. Python 3.11+ standard library only; Linux only (/proc,
CPU affinity). Every process it starts is stopped by its PID on exit, Ctrl-C
included; configs and logs go to a temporary directory (--keep keeps it).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import grp
import http.client
import json
import os
import platform
import pwd
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

PEERS = ("direct", "balance", "haproxy", "nginx", "balance-observed")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


class Skip(Exception):
    """A peer cannot be measured; the message says why (shown to the user)."""


class Fatal(Exception):
    """The benchmark as a whole cannot run; the message says why."""


def say(msg: str) -> None:
    """Progress and notes go to stderr, so that stdout is only the report."""
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------- processes


def _tail(path: str, n: int = 12) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in lines[-n:])


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    # The command name may contain spaces and parentheses: split after the last ")".
    return s[s.rfind(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """The live descendants of C{pid} (from each process's ppid in /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(d))[1]), []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, i = [pid], 0
    while i < len(out):
        out.extend(children.get(out[i], []))
        i += 1
    return out[1:]


def tree_cpu_seconds(pid: int) -> float:
    """
    utime+stime of C{pid} and its live descendants, plus cutime+cstime
    (children that already exited and were reaped), in seconds.
    """
    ticks = 0
    for p in [pid, *descendants(pid)]:
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        # fields 14..17 of stat(5): utime stime cutime cstime (f[0] is field 3)
        ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def cpu_busy_seconds() -> dict[int, float]:
    """Busy (non-idle, non-iowait) seconds of each CPU since boot, from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+) ", line)
            if m:
                v = [int(x) for x in line.split()[1:]]
                user, nice, system, _idle, _iowait, irq, softirq = v[:7]
                out[int(m.group(1))] = (user + nice + system + irq + softirq) / CLK_TCK
    return out


def _alive(pid: int) -> bool:
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass
class Proc:
    """A server process this benchmark started, and where its output goes."""

    name: str
    popen: subprocess.Popen
    log: str

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Procs:
    """The processes started so far; L{stop_all} stops them, newest first."""

    started: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], cpu: int, workdir: str, env=None) -> Proc:
        """
        Start C{argv} pinned to C{cpu}, output to C{workdir}/C{name}.log.

        The child asks the kernel for SIGTERM when this process dies, so that
        even a SIGKILLed benchmark leaves no server behind.
        """
        log = os.path.join(workdir, f"{name}.log")

        def pin_and_tie():
            os.sched_setaffinity(0, {cpu})
            with contextlib.suppress(Exception):
                ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

        with open(log, "ab") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env=env,
                preexec_fn=pin_and_tie,
            )
        with open(log, "a") as f:
            f.write(f"# pid {popen.pid}, cpu {cpu}: {shlex.join(argv)}\n")
        proc = Proc(name, popen, log)
        self.started.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 10.0) -> None:
        """SIGTERM C{proc} (then SIGKILL after C{grace}), then any descendant left."""
        if proc not in self.started:
            return
        self.started.remove(proc)
        kids = descendants(proc.pid) if proc.popen.poll() is None else []
        if proc.popen.poll() is None:
            proc.popen.terminate()
            try:
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = [k for k in kids if _alive(k)]
            for k in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(k, sig)
            deadline = time.monotonic() + 2
            while left and time.monotonic() < deadline:
                time.sleep(0.05)
                left = [k for k in left if _alive(k)]
            if not left:
                break

    def stop_all(self) -> None:
        for proc in reversed(list(self.started)):
            self.stop(proc)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, close)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc: Proc, port: int, timeout: float = 15.0) -> None:
    """Poll until C{port} accepts a connection; L{Skip} if C{proc} exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise Skip(
                f"{proc.name} exited with status {proc.popen.returncode} before listening; "
                f"its output ({proc.log}):\n{_tail(proc.log)}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise Skip(f"{proc.name} did not listen on port {port} within {timeout:.0f}s:\n{_tail(proc.log)}")


def check_http(port: int, path: str, body_len: int | None) -> int:
    """GET C{path} once; return the body length, or L{Skip} if it is not a 200 as expected."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
    except (OSError, http.client.HTTPException) as e:
        raise Skip(f"GET http://127.0.0.1:{port}{path} failed: {e!r}") from None
    finally:
        conn.close()
    if r.status != 200 or (body_len is not None and len(body) != body_len):
        raise Skip(
            f"GET http://127.0.0.1:{port}{path} answered {r.status} with {len(body)} bytes, "
            f"expected 200 with {body_len} bytes"
        )
    return len(body)


def version_of(argv: list[str], pattern: str = r"(\d+\.\d+[\w.+~-]*)") -> str:
    """First version-looking token in the output of C{argv}, or "-"."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "-"
    m = re.search(pattern, p.stdout + p.stderr)
    return m.group(1) if m else "-"


# ----------------------------------------------------------------- configs


def _nofile() -> int:
    """Raise our soft RLIMIT_NOFILE to the hard limit (children inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft if soft != resource.RLIM_INFINITY else hard


def _nginx_common(d: str, name: str, conns: int) -> str:
    # As root, nginx's worker would switch to "nobody", which cannot write
    # into our private temp dir; keep it as the user running the benchmark.
    user = ""
    if os.geteuid() == 0:
        user = f"user {pwd.getpwuid(0).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"
    return f"""{user}worker_processes 1;
pid {d}/{name}.pid;
error_log {d}/{name}.error.log warn;
worker_rlimit_nofile {2 * conns + 64};
events {{
    worker_connections {conns};
    use epoll;
}}
"""


def _nginx_http_common(d: str, name: str) -> str:
    # Debian's compiled-in temp paths are under /var/lib/nginx: unusable
    # without root, so every one of them goes to the temp dir.
    return f"""    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {d}/{name}-tmp/body;
    proxy_temp_path {d}/{name}-tmp/proxy;
    fastcgi_temp_path {d}/{name}-tmp/fastcgi;
    uwsgi_temp_path {d}/{name}-tmp/uwsgi;
    scgi_temp_path {d}/{name}-tmp/scgi;
"""


def origin_conf(d: str, port: int, body_len: int, conns: int) -> str:
    """nginx as the origin: one process, a body of exactly C{body_len} bytes at /."""
    body = ("0123456789" * (body_len // 10 + 1))[:body_len]
    if body_len <= 2048:
        location = f'default_type text/plain;\n            return 200 "{body}";'
    else:
        with open(os.path.join(d, "www", "body"), "w") as f:
            f.write(body)
        # "/" ends in a slash, so it would go to the index module: name the file.
        location = (f"default_type text/plain;\n            root {d}/www;\n"
                    "            try_files /body =404;")
    os.makedirs(os.path.join(d, "origin-tmp"), exist_ok=True)
    return (
        "master_process off;\n"
        + _nginx_common(d, "origin", conns)
        + "http {\n"
        + _nginx_http_common(d, "origin")
        + f"""    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = / {{
            {location}
        }}
    }}
}}
"""
    )


def nginx_proxy_conf(d: str, port: int, origin: int, conns: int) -> str:
    """nginx as a reverse proxy: one worker, HTTP/1.1 keep-alive to the origin."""
    os.makedirs(os.path.join(d, "nginx-tmp"), exist_ok=True)
    return (
        _nginx_common(d, "nginx", conns)
        + "http {\n"
        + _nginx_http_common(d, "nginx")
        + f"""    upstream origin {{
        server 127.0.0.1:{origin};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    )


def haproxy_conf(port: int, origin: int, maxconn: int) -> str:
    """haproxy in http mode: one thread, keep-alive to the server, reuse always."""
    return f"""global
    nbthread 1
    maxconn {maxconn}

defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s

frontend fe
    bind 127.0.0.1:{port} backlog 4096
    default_backend be

backend be
    http-reuse always
    server origin 127.0.0.1:{origin} maxconn {maxconn}
"""


def balance_conf(port: int, origin: int, protocol: str, observe: dict | None = None) -> str:
    """
    Balance in the CONFIG.md format: one listener, one cluster with the origin.

    :param observe: for the C{balance-observed} peer: C{{"access_log": PATH,
        "format": ..., "admin": PORT, "tracing": RATIO or None}}.
    """
    if protocol == "http":
        how = 'routes: [{match: {path_prefix: "/"}, cluster: origin}]'
    else:
        how = "cluster: origin"
    extra = top = ""
    if observe is not None:
        extra = f"\n    access_log: {{path: {observe['access_log']}, format: {observe['format']}}}"
        top = f'admin: {{listen: "tcp:{observe["admin"]}:interface=127.0.0.1"}}\n'
        if observe.get("tracing") is not None:
            top += f"tracing: {{sample_ratio: {observe['tracing']}}}\n"
    return f"""# generated by bench/http1.py
drain_timeout: 2s
{top}listeners:
  - name: bench
    listen: "tcp:{port}:interface=127.0.0.1"
    protocol: {protocol}
    {how}{extra}
clusters:
  - name: origin
    backends: [{{address: "127.0.0.1:{origin}"}}]
"""


# ------------------------------------------------------------------- peers


@dataclass
class Env:
    """What every peer needs: options, the temp dir, the origin."""

    args: argparse.Namespace
    workdir: str
    procs: Procs
    origin_port: int
    body_len: int | None
    conns: int


def start_peer(name: str, env: Env) -> tuple[Proc, int]:
    """Start proxy C{name} on a free port and check it answers; L{Skip} if it cannot."""
    a, d = env.args, env.workdir
    port = free_port()
    if name == "haproxy":
        exe = shutil.which("haproxy")
        if not exe:
            raise Skip("haproxy is not installed (apt-get install haproxy)")
        cfg = os.path.join(d, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(haproxy_conf(port, env.origin_port, env.conns))
        argv = [exe, "-db", "-f", cfg]
    elif name == "nginx":
        exe = shutil.which("nginx")
        if not exe:
            raise Skip("nginx is not installed (apt-get install nginx)")
        cfg = os.path.join(d, "nginx.conf")
        with open(cfg, "w") as f:
            f.write(nginx_proxy_conf(d, port, env.origin_port, env.conns))
        argv = [exe, "-p", d, "-e", os.path.join(d, "nginx.error.log"), "-c", cfg,
                "-g", "daemon off;"]
    elif name in ("balance", "balance-observed"):
        py = a.balance_python
        if not (os.path.isfile(py) and os.access(py, os.X_OK)):
            raise Skip(f"--balance-python {py} is not an executable file")
        cfg = os.path.join(d, f"{name}.yaml")
        observe = None
        if name == "balance-observed":
            # The same Balance with its access log written to a file and the
            # admin API (/metrics) listening: what observing it costs.
            observe = {
                "access_log": os.path.join(d, "access.log"),
                "format": a.access_log_format,
                "admin": free_port(),
                "tracing": a.tracing,
            }
        with open(cfg, "w") as f:
            f.write(balance_conf(port, env.origin_port, a.balance_protocol, observe))
        reactor = [f"--reactor={a.balance_reactor}"] if a.balance_reactor else []
        base = [py, "-m", "twisted", "--log-format=text", *reactor, "balance", "--config", cfg]
        # --check validates without binding: the quickest way to learn that
        # Balance is missing or refuses the config (e.g. "protocol http is
        # not implemented in this version of Balance").
        p = subprocess.run([*base, "--check"], capture_output=True, text=True, cwd=d)
        if p.returncode != 0:
            out = (p.stdout + p.stderr).strip()
            if "Unknown command: balance" in out or "No module named" in out:
                raise Skip(f"Balance is not installed for {py} (pip install . in the "
                           "Balance checkout, or --balance-python PATH)")
            hint = ""
            if "not implemented" in out and a.balance_protocol == "http":
                hint = "\n  (this Balance has no HTTP listener yet; --balance-protocol tcp "
                hint += "measures its L4 relay instead)"
            lines = "\n".join("    " + s for s in out.splitlines()[-6:])
            raise Skip(f"Balance refused the generated config {cfg}:\n{lines}{hint}")
        argv = base
    else:
        raise Fatal(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    proc = env.procs.start(name, argv, a.proxy_cpu, d)
    try:
        wait_listening(proc, port)
        check_http(port, "/", env.body_len)
    except Skip:
        env.procs.stop(proc)
        raise
    return proc, port


# ---------------------------------------------------------------- measure

_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(token: str) -> float | None:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", token)
    return float(m.group(1)) * _TIME_UNITS[m.group(2)] if m else None


def parse_wrk(text: str) -> dict:
    """requests, rps, p50_ms, p99_ms, socket_errors, non_2xx from wrk --latency output."""
    r: dict = {"socket_errors": 0, "non_2xx": 0}
    m = re.search(r"(\d+) requests in ", text)
    if m:
        r["requests"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        r["rps"] = float(m.group(1))
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.0+)?%\s+(\S+)", text, re.M)
        if m:
            r[f"p{pct}_ms"] = _ms(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        r["socket_errors"] = sum(int(x) for x in m.groups())
        r["socket_error_detail"] = dict(zip(("connect", "read", "write", "timeout"),
                                            (int(x) for x in m.groups()), strict=True))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        r["non_2xx"] = int(m.group(1))
    return r


def wrk_argv(a: argparse.Namespace, port: int, seconds: float, latency: bool) -> list[str]:
    argv = [a.wrk, "-t1", f"-c{a.connections}", f"-d{seconds:g}s"]
    if latency:
        argv.append("--latency")
    return [*argv, f"http://127.0.0.1:{port}/"]


def measure(env: Env, peer: str, port: int, proxy: Proc | None, origin: Proc | None,
            rep: int) -> dict:
    """One wrk run against C{port}, with the CPU of the proxy and the origin around it."""
    a = env.args
    argv = wrk_argv(a, port, a.duration, latency=True)
    p0 = tree_cpu_seconds(proxy.pid) if proxy else 0.0
    o0 = tree_cpu_seconds(origin.pid) if origin else 0.0
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    c0, t0 = cpu_busy_seconds(), time.monotonic()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=a.duration + 60)
        text, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = (e.stdout or b"").decode(errors="replace"), -1
    wrk_wall = time.monotonic() - t0
    # Let the proxy finish closing wrk's connections: that is part of its work too.
    time.sleep(0.2)
    p1 = tree_cpu_seconds(proxy.pid) if proxy else 0.0
    o1 = tree_cpu_seconds(origin.pid) if origin else 0.0
    c1, wall = cpu_busy_seconds(), time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.path.join(env.workdir, "wrk.log"), "a") as f:
        f.write(f"### {peer} rep {rep} rc={rc}\n$ {shlex.join(argv)}\n{text}\n")
    r = {"peer": peer, "rep": rep, "rc": rc, "wall_s": round(wrk_wall, 3), **parse_wrk(text)}
    wrk_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    origin_cpu = o1 - o0
    r["loadgen_cpu_s"] = round(wrk_cpu, 3)
    if origin:
        r["origin_cpu_s"] = round(origin_cpu, 3)
    requests = r.get("requests") or 0
    if proxy:
        r["proxy_cpu_s"] = round(p1 - p0, 3)
        r["proxy_core_util"] = round((p1 - p0) / wrk_wall, 3)
        if requests:
            r["proxy_cpu_us_per_req"] = (p1 - p0) * 1e6 / requests
    # Busy time on each core that our own processes do not account for, i.e.
    # other programs competing for the cores (the machine may be shared).
    # (An origin given with --origin is not ours: its CPU is not known, so
    # the load core cannot be judged.)
    if a.proxy_cpu != a.load_cpu:
        if origin:
            load_other = (c1[a.load_cpu] - c0[a.load_cpu]) - wrk_cpu - origin_cpu
            r["load_core_foreign"] = round(load_other / wall, 3)
        r["proxy_core_foreign"] = round(
            ((c1[a.proxy_cpu] - c0[a.proxy_cpu]) - (p1 - p0)) / wall, 3)
    problems = []
    if rc != 0 or "rps" not in r:
        problems.append(f"wrk failed (status {rc})")
    if r["socket_errors"]:
        problems.append(f"socket errors {r['socket_error_detail']}")
    if r["non_2xx"]:
        problems.append(f"{r['non_2xx']} non-2xx responses")
    if proxy and proxy.popen.poll() is not None:
        problems.append(f"{peer} exited with status {proxy.popen.returncode}")
    if problems:
        r["problems"] = problems
    return r


def noisy(r: dict, threshold: float) -> list[str]:
    out = []
    for k in ("load_core_foreign", "proxy_core_foreign"):
        if r.get(k, 0) > threshold and (k == "load_core_foreign" or "proxy_cpu_s" in r):
            out.append(f"{k}={r[k]:.2f}")
    return out


def brief(r: dict) -> str:
    parts = [f"{r.get('rps', 0):,.0f} req/s"]
    for k, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        if r.get(k) is not None:
            parts.append(f"{label} {r[k]:.2f} ms")
    if "proxy_cpu_us_per_req" in r:
        parts.append(f"{r['proxy_cpu_us_per_req']:.1f} us/req "
                     f"(proxy core {r['proxy_core_util']:.0%} busy)")
    for k in ("problems", "noisy", "discarded"):
        if k in r:
            parts.append(f"{k.upper()}: {r[k]}")
    return ", ".join(parts)


# ----------------------------------------------------------------- report


def summarize(runs: list[dict], peers: list[str]) -> list[dict]:
    """Per peer: medians over the kept runs, and Balance's ratios to it."""
    rows = []
    for peer in peers:
        kept = [r for r in runs if r["peer"] == peer and "discarded" not in r]
        if not kept:
            continue
        # A run that stayed noisy after its retries only counts when the
        # peer has no clean run at all.
        clean = [r for r in kept if "noisy" not in r]
        rr = clean or kept
        row = {"peer": peer, "runs": len(rr), "noisy_runs": len(kept) - len(clean),
               "noisy_only": not clean}
        for k in ("rps", "p50_ms", "p99_ms", "proxy_cpu_us_per_req", "proxy_core_util"):
            vals = [r[k] for r in rr if r.get(k) is not None]
            if vals:
                row[k] = statistics.median(vals)
                row[k + "_min"], row[k + "_max"] = min(vals), max(vals)
        row["errors"] = sum(r["socket_errors"] + r["non_2xx"] for r in rr)
        row["problems"] = sorted({p for r in rr for p in r.get("problems", [])})
        rows.append(row)
    bal = next((row for row in rows if row["peer"] == "balance"), None)
    for row in rows:
        if bal and bal.get("proxy_cpu_us_per_req") and row.get("proxy_cpu_us_per_req"):
            row["balance_cpu_ratio"] = bal["proxy_cpu_us_per_req"] / row["proxy_cpu_us_per_req"]
        if bal and bal.get("rps") and row.get("rps"):
            row["balance_rps_ratio"] = bal["rps"] / row["rps"]
    return rows


def _f(v, fmt: str, unit: str = "") -> str:
    return "-" if v is None else format(v, fmt) + unit


def markdown_table(rows: list[dict], balance_label: str) -> str:
    head = ("| peer | runs | req/s | p50 | p99 | proxy CPU us/req | proxy core busy "
            f"| {balance_label} CPU/req ÷ peer | {balance_label} req/s ÷ peer | errors |")
    out = [head, "|" + " --- |" * 10]
    for row in rows:
        label = row["peer"] if row["peer"] != "balance" else balance_label
        runs = str(row["runs"]) + (" noisy" if row["noisy_only"] else "")
        if row["runs"] > 1 and row.get("rps_min") != row.get("rps_max"):
            rps = f"{row['rps']:,.0f} ({row['rps_min']:,.0f}-{row['rps_max']:,.0f})"
        else:
            rps = _f(row.get("rps"), ",.0f")
        out.append("| " + " | ".join([
            label,
            runs,
            rps,
            _f(row.get("p50_ms"), ".2f", " ms"),
            _f(row.get("p99_ms"), ".2f", " ms"),
            _f(row.get("proxy_cpu_us_per_req"), ".1f"),
            _f(row.get("proxy_core_util"), ".0%"),
            _f(row.get("balance_cpu_ratio"), ".2f", "x"),
            _f(row.get("balance_rps_ratio"), ".2f", "x"),
            str(row["errors"]) + (" (!)" if row["errors"] or row["problems"] else ""),
        ]) + " |")
    return "\n".join(out)


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "-"


def machine_info(a: argparse.Namespace) -> dict:
    bal = subprocess.run(
        [a.balance_python, "-c",
         "import importlib.metadata as m, sys, os\n"
         "out = [sys.version.split()[0]]\n"
         "for p in ('balance', 'twisted'):\n"
         "    try: out.append(m.version(p))\n"
         "    except Exception: out.append('-')\n"
         "try:\n"
         "    import balance; out.append(os.path.dirname(balance.__file__))\n"
         "except Exception: out.append('-')\n"
         "print(' '.join(out))"],
        capture_output=True, text=True, cwd=tempfile.gettempdir(),
    ) if os.access(a.balance_python, os.X_OK) else None
    bparts = (bal.stdout.split() if bal and bal.returncode == 0 else []) + ["-"] * 4
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "proxy_cpu": a.proxy_cpu,
        "load_cpu": a.load_cpu,
        "python_bench": platform.python_version(),
        "python_balance": bparts[0],
        "balance": bparts[1],
        "balance_path": bparts[3],
        "twisted": bparts[2],
        "haproxy": version_of(["haproxy", "-v"]) if shutil.which("haproxy") else "-",
        "nginx": version_of(["nginx", "-v"]) if shutil.which("nginx") else "-",
        "wrk": version_of([a.wrk, "-v"]),
    }


def report(a, info: dict, rows: list[dict], skipped: dict[str, str], argv: list[str]) -> str:
    label = "balance" if a.balance_protocol == "http" else "balance(tcp)"
    lines = [
        "## Balance HTTP/1.1 side-by-side benchmark",
        "",
        f"command: `{shlex.join(argv)}`",
        "",
        f"wrk -t1 -c{a.connections} -d{a.duration:g}s --latency, keep-alive, "
        f"GET / with a {a.body}-byte body; medians over the runs of each peer "
        f"(req/s range in parentheses); each proxy one worker on CPU {a.proxy_cpu}, "
        + (f"wrk on CPU {a.load_cpu}, origin: your server on 127.0.0.1:{a.origin}."
           if a.origin else f"origin nginx and wrk on CPU {a.load_cpu}."),
        "",
        markdown_table(rows, label) if rows else "(no peer was measured)",
        "",
        "proxy CPU us/req = (utime+stime of the proxy's processes during the run) / requests. "
        "Ratios are Balance's value divided by the peer's: CPU/req above 1 means Balance "
        "spends more CPU per request; req/s below 1 means it serves fewer. A proxy core near "
        "100% busy is saturated; below that, the load core (wrk + origin) was the limit.",
    ]
    if a.balance_protocol == "tcp" and any(r["peer"] == "balance" for r in rows):
        lines += ["", "note: balance ran as an L4 (tcp) relay, not an HTTP proxy: it does "
                  "not parse requests, so its figures are not comparable with the L7 peers."]
    for peer, why in skipped.items():
        lines += ["", f"skipped {peer}: {why}"]
    for row in rows:
        for p in row["problems"]:
            lines += ["", f"(!) {row['peer']}: {p}"]
        if row["noisy_only"]:
            lines += ["", f"(!) {row['peer']}: every run was disturbed by other programs "
                      "busy on the benchmark's cores: its figures are unreliable (see --json)"]
        elif row["noisy_runs"]:
            lines += ["", f"note: {row['peer']}: {row['noisy_runs']} run(s) disturbed by other "
                      "programs busy on the benchmark's cores left out of the medians"]
    lines += [
        "",
        f"machine: {info['nproc']} CPUs, {info['cpu']}, Linux {info['kernel']}",
        f"versions: haproxy {info['haproxy']}, nginx {info['nginx']}, wrk {info['wrk']}, "
        f"python {info['python_balance']} (Balance {info['balance']}, Twisted "
        f"{info['twisted']}, from {info['balance_path']})",
    ]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/http1.py",
        description="HTTP/1.1 reverse-proxy benchmark: Balance side by side with haproxy "
        "and nginx, each on one pinned core, driven by wrk.",
    )
    ap.add_argument("--duration", type=float, default=5, help="seconds per measured run (5)")
    ap.add_argument("--reps", type=int, default=3, help="runs per peer; medians are shown (3)")
    ap.add_argument("--warmup", type=float, default=2,
                    help="seconds of unmeasured load before each run (2)")
    ap.add_argument("--connections", type=int, default=50, help="wrk keep-alive connections (50)")
    ap.add_argument("--body", type=int, default=100, help="response body bytes (100)")
    ap.add_argument("--peers", default=",".join(PEERS[:4]),
                    help="comma-separated, in run order (direct,balance,haproxy,nginx); "
                    "also balance-observed: Balance with access log and admin API")
    ap.add_argument("--balance-protocol", choices=("http", "tcp"), default="http",
                    help="Balance listener protocol (http); tcp measures the L4 relay")
    ap.add_argument("--access-log-format", choices=("json", "combined"), default="json",
                    help="balance-observed: the access log's format (json)")
    ap.add_argument("--tracing", type=float, default=None, metavar="RATIO",
                    help="balance-observed: also trace, with this sample_ratio (off)")
    ap.add_argument("--balance-python", default=sys.executable,
                    help="interpreter with Balance installed (this one)")
    ap.add_argument("--balance-reactor", default="",
                    help="Twisted reactor for Balance (its default: epoll on Linux); "
                    "e.g. asyncio, or uvloop (Balance's plugin, needs uvloop installed)")
    ap.add_argument("--origin", metavar="PORT", type=int,
                    help="use an HTTP server already listening on 127.0.0.1:PORT as the "
                    "origin instead of starting nginx (its CPU is then not accounted)")
    ap.add_argument("--proxy-cpu", type=int, default=1, help="CPU the proxies run on (1)")
    ap.add_argument("--load-cpu", type=int, default=0, help="CPU for wrk and the origin (0)")
    ap.add_argument("--wrk", default="wrk", help="wrk executable (wrk)")
    ap.add_argument("--noise-threshold", type=float, default=0.10,
                    help="re-run a measurement when other programs kept a benchmark core "
                    "busy more than this fraction of the time (0.10)")
    ap.add_argument("--retries", type=int, default=2, help="re-runs of a noisy measurement (2)")
    ap.add_argument("--json", metavar="FILE", help="write every run and the summary as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    a = ap.parse_args(argv)
    a.peer_list = [p.strip() for p in a.peers.split(",") if p.strip()]
    unknown = [p for p in a.peer_list if p not in PEERS]
    if unknown:
        ap.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    if a.duration <= 0 or a.reps < 1 or a.connections < 1 or a.body < 0:
        ap.error("--duration, --reps and --connections must be positive, --body >= 0")
    return a


def check_cpus(a: argparse.Namespace) -> None:
    allowed = os.sched_getaffinity(0)
    if a.proxy_cpu not in allowed or a.load_cpu not in allowed:
        if len(allowed) >= 2:
            raise Fatal(f"CPUs {a.proxy_cpu}/{a.load_cpu} are not available to this process "
                        f"(allowed: {sorted(allowed)}); pick others with --proxy-cpu/--load-cpu")
        only = next(iter(allowed))
        say(f"warning: only CPU {only} is available: proxy, origin and wrk share it, so "
            "req/s is not meaningful; CPU us/req still is")
        a.proxy_cpu = a.load_cpu = only
    elif a.proxy_cpu == a.load_cpu:
        say("warning: proxy and load generator share a CPU; req/s is not meaningful")


def run(a: argparse.Namespace, procs: Procs, workdir: str) -> tuple[list[dict], dict, dict]:
    """Start the origin and the peers, measure, return (runs, skipped, info)."""
    if not shutil.which(a.wrk):
        raise Fatal(f"{a.wrk} is not installed (apt-get install wrk); it drives the load")
    check_cpus(a)
    os.sched_setaffinity(0, {a.load_cpu})  # wrk and the origin inherit it
    nofile = _nofile()
    conns = max(1024, min(4 * a.connections + 256, nofile // 2 - 64))
    os.makedirs(os.path.join(workdir, "www"), exist_ok=True)

    origin = None
    if a.origin:
        origin_port = a.origin
        try:
            a.body = check_http(origin_port, "/", None)
        except Skip as e:
            raise Fatal(f"--origin {a.origin}: {e}") from None
    else:
        exe = shutil.which("nginx")
        if not exe:
            raise Fatal("nginx is not installed (apt-get install nginx): it serves as the "
                        "origin; or pass --origin PORT of an HTTP server you run yourself")
        origin_port = free_port()
        cfg = os.path.join(workdir, "origin.conf")
        with open(cfg, "w") as f:
            f.write(origin_conf(workdir, origin_port, a.body, conns))
        origin = procs.start("origin", [exe, "-p", workdir, "-e",
                                        os.path.join(workdir, "origin.error.log"), "-c", cfg,
                                        "-g", "daemon off;"], a.load_cpu, workdir)
        try:
            wait_listening(origin, origin_port)
            check_http(origin_port, "/", a.body)
        except Skip as e:
            raise Fatal(f"the origin nginx did not start: {e}") from None
    say(f"origin: 127.0.0.1:{origin_port} (workdir {workdir})")

    env = Env(a, workdir, procs, origin_port, a.body, conns)
    started: dict[str, tuple[Proc | None, int]] = {}
    skipped: dict[str, str] = {}
    for peer in a.peer_list:
        if peer == "direct":
            started[peer] = (None, origin_port)
            continue
        try:
            started[peer] = start_peer(peer, env)
            say(f"{peer}: listening on 127.0.0.1:{started[peer][1]}, pid {started[peer][0].pid}")
        except Skip as e:
            skipped[peer] = str(e)
            say(f"skipping {peer}: {e}")

    info = machine_info(a)
    runs: list[dict] = []
    dead: set[str] = set()
    # Peers take turns within each repetition, so that slow drift of the
    # machine (thermal, neighbours) spreads over all of them alike.
    for rep in range(1, a.reps + 1):
        for peer, (proc, port) in started.items():
            if peer in dead:
                continue
            if a.warmup > 0:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    subprocess.run(wrk_argv(a, port, a.warmup, latency=False),
                                   capture_output=True, timeout=a.warmup + 60)
            for attempt in range(a.retries + 1):
                r = measure(env, peer, port, proc, origin, rep)
                r["attempt"] = attempt
                bad = noisy(r, a.noise_threshold)
                if bad and attempt < a.retries:
                    r["discarded"] = "other programs were busy on the cores: " + ", ".join(bad)
                elif bad:
                    r["noisy"] = ", ".join(bad)
                runs.append(r)
                say(f"  rep {rep} {peer:8} {brief(r)}")
                if "discarded" not in r:
                    break
                time.sleep(2)
            if proc and proc.popen.poll() is not None:
                dead.add(peer)
                skipped[peer] = (f"exited with status {proc.popen.returncode} during the run; "
                                 f"its output ({proc.log}):\n{_tail(proc.log)}")
                say(f"{peer} died: {skipped[peer]}")
    return runs, skipped, info


def portable(value):
    """
    C{value} (JSON-able) with this machine's paths made shareable: paths in
    the repository relative to it, other absolute paths (interpreters,
    temporary files) by their last component, so results can be committed.
    """
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, str) and " " in value:
        return " ".join(portable(part) for part in value.split(" "))
    if isinstance(value, str) and value.startswith("/"):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if value == root or value.startswith(root + os.sep):
            return os.path.relpath(value, root)
        return os.path.basename(value.rstrip("/")) or value
    return value


def dump_json(value, f, **kw) -> None:
    """C{json.dump} of L{portable}(C{value})."""
    json.dump(portable(value), f, **kw)


def in_workdir(prefix: str, keep: bool, body):
    """
    Run C{body(procs, workdir)} in a fresh temporary directory and stop
    every process it started afterwards, whatever happens; the directory
    is removed unless C{keep}.
    """
    workdir = tempfile.mkdtemp(prefix=prefix)
    procs = Procs()
    try:
        return body(procs, workdir)
    finally:
        procs.stop_all()
        if keep:
            say(f"configs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if not sys.platform.startswith("linux"):
        say("bench/http1.py needs Linux (/proc, CPU affinity)")
        return 2

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        runs, skipped, info = in_workdir("balance-bench-", a.keep, lambda p, d: run(a, p, d))
    except Fatal as e:
        say(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    rows = summarize(runs, a.peer_list)
    cmd = ["python3", "bench/http1.py", *argv]
    text = report(a, info, rows, skipped, cmd)
    print("\n" + text, end="")
    if a.json:
        with open(a.json, "w") as f:
            dump_json({"command": cmd, "options": vars(a),
                       "machine": info, "summary": rows, "runs": runs, "skipped": skipped},
                      f, indent=2, default=str)
            f.write("\n")
        say(f"raw results written to {a.json}")
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
