"""Issue #17, item 4: how `--workers N` scales, N = 1, 2, 4, 8 in one run, for a lent machine.

    .venv/bin/python bench/workers_scaling.py                 # 16 cores: about 4 minutes
    .venv/bin/python bench/workers_scaling.py --workers 1,2 --seconds 2 --reps 1   # a smoke run

For each N, one gateway `--workers N` (access log and metrics on, as deployed) is started
with its processes pinned to N cores of their own; the load runs on the other cores:
wrk (`--wrk-threads`) for requests/s of non-stream requests, and `--clients` processes of
paced streams (bench/proxy_bench.py's client: events `--interval` apart, stamped by the
backend) for tokens/s. The paced load offers more than N cores can relay (`--streams-per-worker`
streams per worker), so that the tokens/s measured is the gateway's capacity. `--backends`
fake backends share one port (SO_REUSEPORT). The N are alternated (1 2 4 8, 8 4 2 1, ...)
for `--reps`. It prints, per N, requests/s and tokens/s, the gateway's busy cores and CPU
per request and per event, and the scaling: rate(N) / rate(1) / N (the target is >= 0.85).

Layout on 16 cores: gateway on cores 0..N-1 (8 at most), backends on the last
`--backends` cores, wrk and the clients on the cores between. With fewer cores than
8 + backends + 2 nothing is pinned, and the report says so: the figures then measure the
machine, not the gateway.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import HOST, free_port, median, percentile, run_async, serve_backend
from gateway_bench import PUBLIC_MODEL, _raise_exit, wait_listening
from proxy_bench import (
    CLIENT_KEY,
    WRK_SCRIPT,
    Processes,
    Proxy,
    ensure_tools,
    paced_streams,
    start_gateway,
    tree_cpu,
)

SCRIPT = Path(__file__).resolve()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4,8", help="the N to measure (1,2,4,8)")
    parser.add_argument("--reps", type=int, default=2, help="repetitions, N alternated (2)")
    parser.add_argument("--seconds", type=float, default=8.0, help="s per measured run (8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="s of load before it (2)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections per N (64)")
    parser.add_argument("--wrk-threads", type=int, default=5, help="wrk threads (5)")
    parser.add_argument("--clients", type=int, default=5, help="paced client processes (5)")
    parser.add_argument(
        "--streams-per-worker", type=int, default=600, help="paced streams per worker (600)"
    )
    parser.add_argument("--events", type=int, default=200, help="events per paced stream (200)")
    parser.add_argument("--interval", type=float, default=0.02, help="s between events (0.02)")
    parser.add_argument("--backends", type=int, default=3, help="fake backend processes (3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--serve-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-paced", metavar="PORT,STREAMS,S,W", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.workers = [int(n) for n in args.workers.split(",") if n.strip()]
    if not args.workers or min(args.workers) < 1 or args.reps < 1 or args.clients < 1:
        parser.error("--workers, --reps and --clients must be at least 1")
    return args


def serve_paced(spec: str, events: int, interval: float) -> None:
    """One client process: paced streams through the gateway; its counts as JSON."""
    port, streams, seconds, warmup = spec.split(",")
    proxy = Proxy("gateway", int(port), None, PUBLIC_MODEL, CLIENT_KEY, Path(tempfile.gettempdir()))
    run = run_async(
        paced_streams(proxy, os.getpid(), int(streams), events, interval, float(seconds),
                      float(warmup), 15.0)
    )  # fmt: skip
    latencies = sorted(run.latency_ns)
    print(json.dumps({
        "events": run.events, "seconds": run.seconds, "completed": run.completed,
        "errors": dict(run.errors),
        "latency_p50_ms": percentile(latencies, 50) / 1e6 if latencies else math.nan,
        "latency_p99_ms": percentile(latencies, 99) / 1e6 if latencies else math.nan,
    }), flush=True)  # fmt: skip


class Layout:
    """Which cores run what, or nothing pinned when the machine is too small."""

    def __init__(self, most_workers: int, backends: int) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.pinned = len(cpus) >= most_workers + backends + 2
        self.cpus = cpus
        self.backend: set[int] | None = set(cpus[-backends:]) if self.pinned else None
        self.load: set[int] | None = (
            set(cpus[most_workers : len(cpus) - backends]) if self.pinned else None
        )

    def gateway(self, workers: int) -> set[int] | None:
        return set(self.cpus[:workers]) if self.pinned else None

    def describe(self) -> str:
        if not self.pinned:
            return (
                f"unpinned ({len(self.cpus)} cores: too few to give the gateway cores of its own)"
            )
        return (
            f"pinned: gateway on cores 0..N-1, wrk and clients on {sorted(self.load or [])}, "
            f"backends on {sorted(self.backend or [])}"
        )


def run_requests(
    procs: Processes, wrk: str, proxy: Proxy, args: argparse.Namespace, layout: Layout
) -> dict[str, float]:
    body = proxy.workdir / "body.json"
    body.write_bytes(proxy.request_body(False))
    env = {
        **os.environ,
        "BENCH_BODY": str(body),
        "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in proxy.headers().items()),
    }
    seconds = max(1, round(args.seconds))
    argv = [wrk, f"-t{args.wrk_threads}", f"-c{args.connections * proxy_workers(proxy)}",
            f"-d{seconds}s", "--timeout", "10s", "-s", str(WRK_SCRIPT),
            f"http://{HOST}:{proxy.port}/v1/chat/completions"]  # fmt: skip
    pids = proxy.pids()
    before = tree_cpu(pids)
    proc = procs.start(argv, env=env, stdout=subprocess.PIPE, cpus=layout.load)
    assert proc.stdout is not None
    output = proc.stdout.read().decode(errors="replace")
    proc.wait()
    procs.procs.remove(proc)
    cpu = tree_cpu(pids) - before
    line = next((ln for ln in output.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {output[-500:]}")
    summary = json.loads(line.removeprefix("BENCH_JSON "))
    done = summary["requests"] - summary["status_errors"]
    wall = summary["duration_us"] / 1e6
    return {
        "rps": done / wall,
        "busy_requests": cpu / wall,
        "cpu_us_request": 1e6 * cpu / max(done, 1),
        "request_errors": float(summary["status_errors"] + summary["timeouts"]),
    }


def run_tokens(
    procs: Processes, proxy: Proxy, args: argparse.Namespace, layout: Layout
) -> dict[str, float]:
    streams = args.streams_per_worker * proxy_workers(proxy)
    each = max(1, streams // args.clients)
    spec = f"{proxy.port},{each},{args.seconds},{args.warmup}"
    argv = [sys.executable, str(SCRIPT), "--serve-paced", spec, "--events", str(args.events),
            "--interval", str(args.interval)]  # fmt: skip
    pids = proxy.pids()
    clients = [
        procs.start(argv, stdout=subprocess.PIPE, cpus=layout.load) for _ in range(args.clients)
    ]
    # The clients connect and warm up first: the gateway's CPU is read over their window.
    time.sleep(args.warmup + args.interval + 0.5)
    before, started = tree_cpu(pids), time.monotonic()
    results = []
    for client in clients:
        assert client.stdout is not None
        results.append(json.loads(client.stdout.read().decode() or "{}"))
        client.wait()
        procs.procs.remove(client)
    cpu, wall = tree_cpu(pids) - before, time.monotonic() - started
    events = sum(r.get("events", 0) for r in results)
    seconds = median([r["seconds"] for r in results if r.get("seconds")])
    busy = cpu / wall if wall else math.nan
    return {
        "tokens_per_s": events / seconds if seconds else math.nan,
        "busy_tokens": busy,
        "cpu_us_event": 1e6 * busy * seconds / events if events else math.nan,
        "latency_p50_ms": median([r.get("latency_p50_ms", math.nan) for r in results]),
        "stream_errors": float(sum(sum(r.get("errors", {}).values()) for r in results)),
    }


def proxy_workers(proxy: Proxy) -> int:
    return int(proxy.name.removeprefix("gateway-w"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_backend is not None:
        run_async(serve_backend(args.serve_backend, reuse_port=True))
        return 0
    if args.serve_paced is not None:
        serve_paced(args.serve_paced, args.events, args.interval)
        return 0
    wrk, _ = ensure_tools()
    signal.signal(signal.SIGTERM, _raise_exit)
    layout = Layout(max(args.workers), args.backends)
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="workers-scaling-"))
    started = time.monotonic()
    figures: dict[int, list[dict[str, float]]] = {n: [] for n in args.workers}
    try:
        backend_port = free_port()
        for _ in range(args.backends):
            backend = procs.start(
                [sys.executable, str(SCRIPT), "--serve-backend", str(backend_port)],
                cpus=layout.backend,
            )
            wait_listening(backend, backend_port, "backend", 20)
        for rep in range(args.reps):
            order = args.workers if rep % 2 == 0 else list(reversed(args.workers))
            for n in order:
                name = f"gateway-w{n}"
                print(f"[{time.monotonic() - started:6.1f} s] rep {rep + 1}: --workers {n}",
                      file=sys.stderr, flush=True)  # fmt: skip
                pid, port = start_gateway(
                    procs, workdir, backend_port, workdir / f"{name}-{rep}.log",
                    layout.gateway(n), workers=n, name=f"{name}-{rep}",
                )  # fmt: skip
                proxy = Proxy(name, port, pid, PUBLIC_MODEL, CLIENT_KEY, workdir)
                try:
                    run = run_requests(procs, wrk, proxy, args, layout)
                    run.update(run_tokens(procs, proxy, args, layout))
                finally:
                    procs.stop_tree(pid)
                figures[n].append(run)
        report = summarize(figures, args)
        report["layout"] = layout.describe()
        report["seconds"] = round(time.monotonic() - started, 1)
        if args.json:
            print(json.dumps(report, indent=2, default=str))
        else:
            print_report(report, args)
        return 0
    finally:
        procs.stop_all()


def summarize(
    figures: dict[int, list[dict[str, float]]], args: argparse.Namespace
) -> dict[str, Any]:
    table = {n: {k: median([r[k] for r in runs]) for k in runs[0]} for n, runs in figures.items()}
    base = table.get(1) or table[min(table)]
    base_n = 1 if 1 in table else min(table)
    for n, row in table.items():
        for key in ("rps", "tokens_per_s"):
            row[f"{key}_scaling"] = row[key] / base[key] / (n / base_n) if base[key] else math.nan
    return {"table": table, "raw": figures}


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    table = report["table"]
    print()
    print(f"gateway --workers N scaling  ({report['layout']}); {args.reps} reps, medians")
    print(f"  requests: wrk -t{args.wrk_threads}, {args.connections} connections per worker; "
          f"tokens: {args.streams_per_worker} paced streams per worker over {args.clients} "
          f"clients, {args.events} events {1e3 * args.interval:g} ms apart")  # fmt: skip
    head = f"  {'N':>3}{'req/s':>10}{'x/N':>7}{'busy':>7}{'µs/req':>8}"
    print(head + f"{'tokens/s':>11}{'x/N':>7}{'busy':>7}{'µs/ev':>7}{'p50 ms':>8}{'errors':>8}")
    for n in sorted(table):
        r = table[n]
        errors = r["request_errors"] + r["stream_errors"]
        print(f"  {n:>3}{r['rps']:>10,.0f}{r['rps_scaling']:>7.2f}{r['busy_requests']:>7.2f}"
              f"{r['cpu_us_request']:>8.0f}{r['tokens_per_s']:>11,.0f}"
              f"{r['tokens_per_s_scaling']:>7.2f}{r['busy_tokens']:>7.2f}"
              f"{r['cpu_us_event']:>7.1f}{r['latency_p50_ms']:>8.1f}{errors:>8.0f}")  # fmt: skip
    print("  x/N: rate(N) / rate(1) / N; the target is >= 0.85")
    print(f"  run time {report['seconds']:.0f} s")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
