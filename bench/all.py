#!/usr/bin/env python3
"""
Every benchmark in one command: Balance beside each peer, with ratios.

    python3 bench/all.py                       # every bench, 3 repeats, about 30 minutes
    python3 bench/all.py --benches http1,l4,memory --duration 5 --reps 3
    python3 bench/all.py --quick               # 2 s runs, 1 repeat: a smoke test

Runs bench/http1.py, l4.py, memory.py, tls.py and h2.py in turn (each pins
the proxy to --proxy-cpu and its load generator and backend to --load-cpu,
warms up before each measured run, and repeats it --reps times), then
prints one table: per benchmark and case, Balance's median (min-max) next to
each peer's, and Balance ÷ peer.  It writes each bench's JSON and a summary
to --results (bench/results/), and, when matplotlib is installed, one PNG
chart per benchmark beside them.

Balance is run from this checkout (it is put first on PYTHONPATH) with
--balance-python (this interpreter).  Linux, 2 CPUs; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import http1

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)

#: name -> what to read from its JSON summary: the metric compared (lower is
#: better for all of them), the column that splits cases, the unit, a title.
BENCHES = {
    "http1": {"metric": "proxy_cpu_us_per_req", "case": None, "unit": "us CPU/request",
              "title": "HTTP/1.1 keep-alive, c50, 100 B bodies", "timed": True},
    "l4": {"metric": "cpu_s_per_gb", "case": None, "unit": "CPU s/GB",
           "title": "L4 TCP tunnel (iperf3)", "timed": True},
    "memory": {"metric": "bytes_per_conn", "case": "section", "unit": "bytes/idle connection",
               "title": "Memory per idle connection (l7: 10k, l4: 9k pairs)", "timed": False},
    "tls": {"metric": "cpu_us", "case": "mode", "unit": "us CPU/handshake",
            "title": "TLS handshakes", "timed": True},
    "h2": {"metric": "proxy_cpu_us_per_req", "case": "mode", "unit": "us CPU/request",
           "title": "HTTP/2 (h2load)", "timed": True},
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_bench(name: str, a, out_json: str) -> int:
    spec = BENCHES[name]
    argv = [a.python, os.path.join(HERE, f"{name}.py"), "--reps", str(a.reps),
            "--json", out_json, "--proxy-cpu", str(a.proxy_cpu), "--load-cpu", str(a.load_cpu),
            "--balance-python", a.balance_python]
    if spec["timed"]:
        argv += ["--duration", str(a.duration)]
    if name == "memory" and a.quick:
        argv += ["--l7-conns", "2000", "--l4-conns", "2000"]
    argv += a.extra.get(name, [])
    env = dict(os.environ)
    env["PYTHONPATH"] = CHECKOUT + os.pathsep + env.get("PYTHONPATH", "")
    say(f"\n=== {name}: {' '.join(argv)}")
    t0 = time.monotonic()
    rc = subprocess.call(argv, env=env)
    say(f"=== {name}: exit {rc} after {time.monotonic() - t0:.0f} s")
    return rc


def rows_of(name: str, data: dict) -> list[dict]:
    """(case, peer, median, min, max, ratio) rows from one bench's JSON summary."""
    spec = BENCHES[name]
    k, case_key = spec["metric"], spec["case"]
    out = []
    for row in data.get("summary", []):
        if row.get(k) is None:
            continue
        case = row.get(case_key, "") if case_key else ""
        lo, hi = row.get(k + "_min"), row.get(k + "_max")
        if lo is None:
            # Benches that summarise medians only: the range from their runs.
            vals = [r[k] for r in data.get("runs", []) if r.get("peer") == row["peer"]
                    and (not case_key or r.get(case_key) == case) and r.get(k) is not None
                    and "discarded" not in r]
            lo, hi = (min(vals), max(vals)) if vals else (row[k], row[k])
        out.append({"bench": name, "case": case, "peer": row["peer"], "value": row[k],
                    "min": lo, "max": hi})
    for row in out:
        bal = next((r for r in out if r["case"] == row["case"] and r["peer"] == "balance"), None)
        if bal and row["value"]:
            row["balance_ratio"] = bal["value"] / row["value"]
    return out


def _num(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}"


def table(rows: list[dict]) -> str:
    out = ["| bench | case | metric (lower is better) | balance | peer | peer's | balance ÷ peer |",
           "|" + " --- |" * 7]
    for r in rows:
        if r["peer"] == "balance":
            continue
        bal = next((b for b in rows if b["bench"] == r["bench"] and b["case"] == r["case"]
                    and b["peer"] == "balance"), None)
        if bal is None:
            continue
        out.append(
            f"| {r['bench']} | {r['case'] or '-'} | {BENCHES[r['bench']]['unit']} "
            f"| {_num(bal['value'])} ({_num(bal['min'])}-{_num(bal['max'])}) | {r['peer']} "
            f"| {_num(r['value'])} ({_num(r['min'])}-{_num(r['max'])}) "
            f"| {r.get('balance_ratio', 0):.2f}x |"
        )
    return "\n".join(out)


def chart(name: str, rows: list[dict], path: str) -> bool:
    """One bar chart: median per peer (grouped by case), min-max as error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = list(dict.fromkeys(r["case"] for r in rows))
    peers = list(dict.fromkeys(r["peer"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(cases) * len(peers) / 2 + 3), 3.6))
    width = 0.8 / max(1, len(peers))
    for i, peer in enumerate(peers):
        xs, ys, lo, hi = [], [], [], []
        for j, case in enumerate(cases):
            r = next((r for r in rows if r["case"] == case and r["peer"] == peer), None)
            if r is None:
                continue
            xs.append(j + i * width)
            ys.append(r["value"])
            lo.append(r["value"] - r["min"])
            hi.append(r["max"] - r["value"])
        color = "tab:red" if peer.startswith("balance") else None
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=peer, color=color,
               alpha=1.0 if peer == "balance" else 0.75)
    ax.set_xticks([j + width * (len(peers) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels([c or name for c in cases])
    ax.set_ylabel(BENCHES[name]["unit"] + " (lower is better)")
    ax.set_title(BENCHES[name]["title"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench/all.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--benches", default=",".join(BENCHES),
                    help="comma-separated, in run order (%(default)s)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--quick", action="store_true", help="2 s runs, 1 repeat, 2k idle connections")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--python", default=sys.executable, help="runs the bench scripts")
    ap.add_argument("--balance-python", default=sys.executable)
    ap.add_argument("--proxy-cpu", type=int, default=1)
    ap.add_argument("--load-cpu", type=int, default=0)
    ap.add_argument("--no-run", action="store_true",
                    help="only rebuild the table and charts from --results")
    ap.add_argument("--bench-args", action="append", default=[], metavar="NAME:ARGS",
                    help="extra arguments for one bench, e.g. 'l4:--streams 2' (repeatable)")
    a = ap.parse_args(argv)
    a.names = [b for b in a.benches.split(",") if b]
    bad = [b for b in a.names if b not in BENCHES]
    if bad:
        ap.error(f"unknown bench(es) {bad}; choose from {list(BENCHES)}")
    if a.quick:
        a.reps, a.duration = 1, 2
    a.extra = {}
    for item in a.bench_args:
        name, _, args = item.partition(":")
        a.extra.setdefault(name, []).extend(args.split())
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    os.makedirs(a.results, exist_ok=True)
    status = {}
    for name in a.names:
        if not a.no_run:
            status[name] = run_bench(name, a, os.path.join(a.results, f"{name}.json"))
    rows, charts = [], []
    for name in a.names:
        path = os.path.join(a.results, f"{name}.json")
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            say(f"no results for {name} ({path})")
            continue
        these = rows_of(name, data)
        rows += these
        png = os.path.join(a.results, f"{name}.png")
        if these and chart(name, these, png):
            charts.append(png)
    text = table(rows)
    print("\n## Balance benchmarks: Balance beside each peer\n")
    print(f"command: `python3 bench/all.py {' '.join(argv)}`\n")
    print(f"medians of {a.reps} runs (min-max); each proxy one worker on CPU {a.proxy_cpu}, "
          f"load generator and backend on CPU {a.load_cpu}.\n")
    print(text)
    if charts:
        print("\ncharts: " + ", ".join(os.path.relpath(c, CHECKOUT) for c in charts))
    with open(os.path.join(a.results, "summary.json"), "w") as f:
        http1.dump_json({"command": ["python3", "bench/all.py", *argv], "rows": rows,
                   "exit_status": status}, f, indent=2)
        f.write("\n")
    return 1 if any(status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
