#!/usr/bin/env python3
"""Measurements behind bench/jobs.sh (which builds pubrun, starts the server
with bench's manifest and cleans up). Standard library only.

    python3 bench/jobs.py --addr 127.0.0.1:PORT --project bench --conc C \
        [--latency-n 200] [--tput-n 2000] [--docker-n 10] [--image IMG]

Prints one markdown table. Every phase is bounded in count and time; a phase
that cannot run (e.g. no Docker engine) prints "n/a" with the reason.
"""
import argparse
import base64
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

from benchhttp import Http

TERMINAL = {"succeeded", "failed", "timed_out", "cancelled"}


class Api(Http):
    def __init__(self, addr, project):
        super().__init__(addr, attempts=3, timeout=30, snippet=500)
        self.project = project

    def publish(self, topic, messages):
        """messages: list of (bytes, attributes). Returns message ids."""
        body = {"messages": [{"data": base64.b64encode(d).decode(), "attributes": a} for d, a in messages]}
        return self.req("POST", f"/v1/projects/{self.project}/topics/{topic}:publish", body)["messageIds"]

    def runs(self, job, status=None, limit=10000):
        q = f"/api/v1/runs?job={job}&limit={limit}" + (f"&status={status}" if status else "")
        return self.req("GET", q)["runs"]

    def log(self, run_id):
        return self.req("GET", f"/api/v1/runs/{run_id}/log", raw=True).decode("utf-8", "replace")


def pct(values, p):
    """Nearest-rank percentile."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100.0 * len(s)) - 1))
    return s[k]


def wait_terminal(api, job, n, deadline_s):
    """Waits until `n` runs of `job` are terminal; returns them."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        busy = any(api.runs(job, s, limit=1) for s in ("queued", "starting", "running"))
        if not busy:
            runs = api.runs(job)
            if len(runs) >= n and all(r["status"] in TERMINAL for r in runs):
                return runs
        time.sleep(0.25)
    runs = api.runs(job)
    done = sum(r["status"] in TERMINAL for r in runs)
    raise RuntimeError(f"timed out after {deadline_s}s: {done}/{n} runs of {job} terminal ({len(runs)} exist)")


def bench_latency(api, n, gap_s):
    """Client publish call -> `date +%s%N` inside the job's process."""
    rtts = []
    for i in range(n):
        t0 = time.time_ns()
        api.publish("bench-latency", [(b"x", {"t0": str(t0), "seq": str(i)})])
        rtts.append((time.time_ns() - t0) / 1e6)
        # Space messages out so each finds an idle slot: latency, not queueing.
        time.sleep(max(0.0, gap_s - (time.time_ns() - t0) / 1e9))
    runs = wait_terminal(api, "latency", n, 120)
    lat, server = [], []
    failed = 0
    for r in runs:
        if r["status"] != "succeeded":
            failed += 1
            continue
        started_ns = None
        for line in api.log(r["id"]).splitlines():
            if line.strip().isdigit():
                started_ns = int(line.strip())
        t0 = int(r["message"]["attributes"]["t0"])
        if started_ns is not None:
            lat.append((started_ns - t0) / 1e6)
        if r.get("started_at_ms") is not None:
            server.append(r["started_at_ms"] - t0 / 1e6)
    return {"lat": lat, "rtt": rtts, "server": server, "failed": failed}


def bench_tput(api, n, batch):
    t_first = time.time()
    for start in range(0, n, batch):
        k = min(batch, n - start)
        api.publish("bench-tput", [(b"x", {"i": str(start + j)}) for j in range(k)])
    t_published = time.time()
    runs = wait_terminal(api, "tput", n, 600)
    ok = [r for r in runs if r["status"] == "succeeded"]
    last_end_ms = max(r["ended_at_ms"] for r in runs if r.get("ended_at_ms"))
    span = last_end_ms / 1000.0 - t_first
    own = [r["ended_at_ms"] - r["started_at_ms"] for r in runs if r.get("started_at_ms") and r.get("ended_at_ms")]
    starts = sorted(r["started_at_ms"] for r in runs if r.get("started_at_ms"))
    q = max(2, len(starts) // 4)
    rate = lambda xs: (len(xs) - 1) / max(1e-3, (xs[-1] - xs[0]) / 1000.0)
    return {"n": len(runs), "ok": len(ok), "span": span, "rate": len(runs) / span,
            "publish_s": t_published - t_first, "own": own,
            "rate_first": rate(starts[:q]), "rate_last": rate(starts[-q:])}


def forkexec(total, parallel):
    """/bin/true spawned `total` times by `parallel` bash loops (fork+exec+wait)."""
    per = total // parallel
    script = f'for ((i=0; i<{per}; i++)); do /bin/true; done'
    t = time.perf_counter()
    procs = [subprocess.Popen(["bash", "-c", script]) for _ in range(parallel)]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError("bash loop failed")
    return per * parallel / (time.perf_counter() - t)


def fsync_ms(directory, n=50):
    """Write 4 KiB + fdatasync on the data directory's filesystem: what every
    durable step (publish, run state change) costs at least."""
    path = os.path.join(directory, "fsync-probe")
    out = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, b"x" * 4096)
            os.fdatasync(fd)
            out.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        os.unlink(path)
    return out


def bench_docker(api, image, n):
    cmd = ["docker", "run", "--rm", image, "sh", "-c", "echo hi"]

    def docker_once():
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        dt = (time.perf_counter() - t) * 1000
        if out.returncode != 0 or out.stdout.strip() != "hi":
            raise RuntimeError(f"docker run failed ({out.returncode}): {out.stderr.strip()}")
        return dt

    def pubrun_once(seq):
        t0_ms = time.time_ns() / 1e6
        mid = api.publish("bench-docker", [(b"x", {"seq": str(seq)})])[0]
        end = time.monotonic() + 120
        while time.monotonic() < end:
            for r in api.runs("ctr", limit=5):
                if r["message"]["id"] == mid and r["status"] in TERMINAL:
                    if r["status"] != "succeeded":
                        raise RuntimeError(f"container run {r['id']} {r['status']}: {r.get('exit')}")
                    return r["ended_at_ms"] - t0_ms, r["ended_at_ms"] - r["started_at_ms"]
            time.sleep(0.01)
        raise RuntimeError(f"container run for message {mid} did not end within 120 s")

    docker_once()  # warm-up: page cache, image layers, engine
    pubrun_once(-1)
    d, p, p_exec = [], [], []
    for i in range(n):  # interleaved so drift hits both sides alike
        d.append(docker_once())
        wall, ex = pubrun_once(i)
        p.append(wall)
        p_exec.append(ex)
    return {"docker": d, "pubrun": p, "pubrun_exec": p_exec}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--project", default="bench")
    ap.add_argument("--conc", type=int, required=True)
    ap.add_argument("--latency-n", type=int, default=200)
    ap.add_argument("--latency-gap-ms", type=float, default=20)
    ap.add_argument("--tput-n", type=int, default=2000)
    ap.add_argument("--tput-batch", type=int, default=100)
    ap.add_argument("--forkexec-n", type=int, default=4000)
    ap.add_argument("--docker-n", type=int, default=10)
    ap.add_argument("--image", default="pubrun-test/busybox:latest")
    ap.add_argument("--no-docker", default="", help="reason to skip the container phase")
    ap.add_argument("--profile", default="release")
    ap.add_argument("--fsync-dir", default="", help="directory on the data dir's filesystem")
    a = ap.parse_args()
    api = Api(a.addr, a.project)
    log = lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True)

    log(f"(a) latency: {a.latency_n} messages, {a.latency_gap_ms:g} ms apart")
    lat = bench_latency(api, a.latency_n, a.latency_gap_ms / 1000)
    log(f"(b) throughput: {a.tput_n} messages in batches of {a.tput_batch}, concurrency {a.conc}")
    tp = bench_tput(api, a.tput_n, a.tput_batch)
    log(f"(b) fork+exec baseline: {a.forkexec_n} x /bin/true from bash loops")
    fe_seq = forkexec(a.forkexec_n // 2, 1)
    fe_par = forkexec(a.forkexec_n, a.conc)
    dk = None
    if a.docker_n <= 0:
        a.no_docker = "DOCKER_N=0"
    if a.no_docker:
        log(f"(c) skipped: {a.no_docker}")
    else:
        log(f"(c) container: {a.docker_n} x pubrun vs docker run --rm, interleaved")
        try:
            dk = bench_docker(api, a.image, a.docker_n)
        except Exception as e:  # report, don't hide
            a.no_docker = f"failed: {e}"
            log(f"(c) {a.no_docker}")

    fs = fsync_ms(a.fsync_dir) if a.fsync_dir else []

    nproc = os.cpu_count()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    ms = lambda v: f"{v:.1f} ms"
    rows = []
    if lat["lat"]:
        rows.append((f"(a) message → process start, p50 (client publish call → `date +%s%N` in the job; n={len(lat['lat'])}, {a.latency_gap_ms:g} ms apart)",
                     ms(pct(lat["lat"], 50)), "", ""))
        rows.append(("(a) message → process start, p99", ms(pct(lat["lat"], 99)), "", ""))
    else:
        rows.append(("(a) message → process start", "n/a (no run printed a timestamp)", "", ""))
    rows.append(("(a) … of which the publish call (HTTP round trip, durable), p50 / p99",
                 f"{pct(lat['rtt'], 50):.1f} / {pct(lat['rtt'], 99):.1f} ms", "", ""))
    if lat["server"]:
        rows.append(("(a) client publish call → run `started_at_ms` (server clock), p50 / p99",
                     f"{pct(lat['server'], 50):.0f} / {pct(lat['server'], 99):.0f} ms", "", ""))
    if lat["failed"]:
        rows.append(("(a) runs not succeeded", str(lat["failed"]), "", ""))
    rows.append((f"(b) trivial process jobs/s (`true`, {tp['n']} messages in batches of {a.tput_batch}, concurrency {a.conc}; first publish → last run ended)",
                 f"{tp['rate']:.0f} /s", f"{fe_par:.0f} /s fork+exec of /bin/true ({a.conc} parallel bash loops)",
                 f"{tp['rate'] / fe_par:.3f}"))
    rows.append(("(b) same, against one sequential bash loop", f"{tp['rate']:.0f} /s", f"{fe_seq:.0f} /s", f"{tp['rate'] / fe_seq:.3f}"))
    if tp["own"]:
        rows.append(("(b) … one `true` run's own time (`started_at_ms` → `ended_at_ms`), p50 / p90",
                     f"{pct(tp['own'], 50):.0f} / {pct(tp['own'], 90):.0f} ms", "", ""))
    rows.append(("(b) … start rate, first vs last quarter of the runs (deep vs shallow queue)",
                 f"{tp['rate_first']:.0f} /s vs {tp['rate_last']:.0f} /s", "", ""))
    if tp["ok"] != tp["n"]:
        rows.append(("(b) runs not succeeded", str(tp["n"] - tp["ok"]), "", ""))
    if dk:
        pm, dm = statistics.median(dk["pubrun"]), statistics.median(dk["docker"])
        rows.append((f"(c) container job wall time, median of {a.docker_n} (`sh -c 'echo hi'` in {a.image}; pubrun: client publish call → run `ended_at_ms`)",
                     ms(pm), f"{ms(dm)} `docker run --rm` (CLI, wall)", f"{pm / dm:.2f}× (target ≤ 1.1×)"))
        rows.append(("(c) … pubrun container start → end only (`started_at_ms` → `ended_at_ms`), median",
                     ms(statistics.median(dk["pubrun_exec"])), "", ""))
        rows.append(("(c) min / max wall", f"{min(dk['pubrun']):.0f} / {max(dk['pubrun']):.0f} ms",
                     f"{min(dk['docker']):.0f} / {max(dk['docker']):.0f} ms", ""))
    else:
        rows.append(("(c) container job wall time vs `docker run --rm`", f"n/a ({a.no_docker})", "", ""))

    if fs:
        rows.append(("(context) 4 KiB write + fdatasync on the data directory's filesystem, p50 / p99",
                     "", f"{pct(fs, 50):.2f} / {pct(fs, 99):.2f} ms", ""))

    docker_v = ""
    try:
        docker_v = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                                  capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        pass
    print(f"pubrun job benchmark — {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"machine: nproc={nproc}, {cpu}, kernel {platform.release()}, Docker Engine {docker_v or 'n/a'}, "
          f"Python {platform.python_version()}; pubrun {a.profile} build, embedded store\n")
    print("| measurement | pubrun | baseline | ratio pubrun/baseline |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(c if c else "" for c in r) + " |")


if __name__ == "__main__":
    main()
