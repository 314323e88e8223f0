#!/usr/bin/env python3
"""Helpers of bench/cluster.sh (standard library only).

    cluster.py jobs  --addr HOST:PORT --jobs-n N --slow-n M   # JSON lines on stdout
    cluster.py table --dir TMP ...                            # the markdown table

`jobs` publishes N messages to `bench-jobs` (job `tput`, a trivial `true`) and M to
`bench-slow` (job `slow`, `sleep 0.2` on the `workers` agents pool), waits until every
run ended, and reports runs/s from the first run's creation to the last run's end,
taken from the run records (so polling does not skew it).
"""
import argparse
import base64
import json
import os
import platform
import sys
import time

from benchhttp import Http

TERMINAL = {"succeeded", "failed", "timed_out", "cancelled"}


class Api(Http):
    def __init__(self, addr):
        super().__init__(addr, attempts=5, timeout=60, pause=0.5, snippet=300)


def run_batch(api, topic, job, n, timeout_s=900):
    for start in range(0, n, 100):
        msgs = [{"data": base64.b64encode(b"x").decode()} for _ in range(min(100, n - start))]
        api.req("POST", f"/v1/projects/bench/topics/{topic}:publish", {"messages": msgs})
    deadline = time.monotonic() + timeout_s
    while True:
        runs = api.req("GET", f"/api/v1/runs?job={job}&limit={n + 100}")["runs"]
        ended = [r for r in runs if r["status"] in TERMINAL]
        if len(ended) >= n:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{job}: only {len(ended)}/{n} runs ended in {timeout_s} s")
        time.sleep(1.0)
    first = min(r["created_at_ms"] for r in ended)
    last = max(r["ended_at_ms"] for r in ended)
    ok = sum(r["status"] == "succeeded" for r in ended)
    machines = sorted({r.get("machine") or "local" for r in ended})
    return n / max((last - first) / 1000.0, 1e-3), ok, machines


def jobs(a):
    api = Api(a.addr)
    for metric, topic, job, n in (("jobs_runs_per_s", "bench-jobs", "tput", a.jobs_n),
                                  ("slow_runs_per_s", "bench-slow", "slow", a.slow_n)):
        rate, ok, machines = run_batch(api, topic, job, n)
        note = f"{n} runs, {ok} succeeded, on {', '.join(machines)}"
        print(json.dumps({"target": "pubrun", "metric": metric, "value": rate, "unit": "runs/s", "note": note}))
        print(f"  {metric:<20} {rate:10.1f} runs/s  {note}", file=sys.stderr)


def load(path):
    out = {}
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    r = json.loads(line)
                    out[r["metric"]] = r
    except FileNotFoundError:
        pass
    return out


def table(a):
    cfgs = {name: load(os.path.join(a.dir, f"{name}.jsonl")) for name in ("embedded", "cluster1", "cluster3", "pg")}

    def v(cfg, metric):
        r = cfgs[cfg].get(metric)
        return None if r is None else r["value"]

    def fmt(x):
        return "n/a" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")

    def ratio(x, y):
        return "n/a" if x is None or y is None or y == 0 else f"{x / y:.2f}×"

    rows = (("publish, msg/s (100 B, 100/request)", "publish_batched"),
            ("consume + ack, msg/s (StreamingPull)", "consume_stream"),
            (f"trivial runs dispatched, runs/s ({a.jobs_n} `true` jobs)", "jobs_runs_per_s"),
            (f"executor-bound runs/s ({a.slow_n} × sleep 0.2 s, {a.agent_slots} slots per server)", "slow_runs_per_s"))
    nproc = os.cpu_count()
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = float("nan")
    print(f"pubrun cluster benchmark — {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"machine: nproc={nproc}, kernel {platform.release()}, load average at the end {load1:.2f}; "
          f"{a.pg_version} (fsync on, synchronous_commit on); pubrun release build; "
          f"{a.count} messages per publish/consume figure; 3-server calls go through a standby (forwarded)\n")
    print("| measurement | embedded | cluster, 1 server | cluster, 3 servers | PostgreSQL queue baseline | "
          "cluster 1 / embedded | cluster 3 / cluster 1 | cluster 1 / baseline |")
    print("|---|---|---|---|---|---|---|---|")
    for label, m in rows:
        e, c1, c3, pg = v("embedded", m), v("cluster1", m), v("cluster3", m), v("pg", m)
        print(f"| {label} | {fmt(e)} | {fmt(c1)} | {fmt(c3)} | {fmt(pg)} | {ratio(c1, e)} | {ratio(c3, c1)} | {ratio(c1, pg)} |")
    print()
    for cfg in ("embedded", "cluster1", "cluster3", "pg"):
        for m, r in cfgs[cfg].items():
            if m in {x for _, x in rows} and r.get("note"):
                print(f"- {cfg} {m}: {r['note']}")
    c1p, c1j = v("cluster1", "publish_batched"), v("cluster1", "jobs_runs_per_s")
    s1, s3 = v("cluster1", "slow_runs_per_s"), v("cluster3", "slow_runs_per_s")
    print("\nTargets (issue 12): cluster publish ≥ 10,000 msg/s: "
          f"{fmt(c1p)} ({'met' if c1p and c1p >= 10000 else 'not met'}); "
          f"cluster runs dispatched ≥ 2,000/s: {fmt(c1j)} ({'met' if c1j and c1j >= 2000 else 'not met'}); "
          f"3 servers ≥ 1.5× one server when the executor is the bottleneck: {ratio(s3, s1)} "
          f"({'met' if s1 and s3 and s3 / s1 >= 1.5 else 'not met'})")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("jobs")
    j.add_argument("--addr", required=True)
    j.add_argument("--jobs-n", type=int, default=2000)
    j.add_argument("--slow-n", type=int, default=90)
    t = sub.add_parser("table")
    t.add_argument("--dir", required=True)
    t.add_argument("--count", type=int, default=0)
    t.add_argument("--jobs-n", type=int, default=0)
    t.add_argument("--slow-n", type=int, default=0)
    t.add_argument("--agent-slots", type=int, default=0)
    t.add_argument("--pg-version", default="PostgreSQL")
    a = p.parse_args()
    jobs(a) if a.cmd == "jobs" else table(a)


if __name__ == "__main__":
    main()
