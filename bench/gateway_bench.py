"""What the gateway costs: the same load sent straight to a backend and through the gateway.

Run from the repository root:

    .venv/bin/python bench/gateway_bench.py [--reps 3] [--seconds 5] [--concurrency 32]
                                           [--hold 500] [--pin] [--json] [--profile 10]

One run starts the fast fake OpenAI backend (bench/common.py, `--serve-backend PORT`) and the real
gateway (`python -m gateway`, JSON access logs on, as deployed) as separate processes on
loopback, then measures both targets alternately, `--reps` times, and prints medians and the
ratios gateway/direct. Only ratios from one run mean anything: client, gateway and backend
share the machine's cores, and a neighbour's load moves every absolute figure.

The load generator is a minimal keep-alive HTTP/1.1 client on asyncio streams (less than half
the CPU per request of aiohttp's client, so that less of the shared CPU goes to the client). It
is a benchmark, not a test: nothing is asserted; wrong answers are counted and printed as errors.
bench/README.md explains each figure and records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    DONE,
    EVENTS_HEADER,
    HOST,
    INTERVAL_HEADER,
    STREAM_EVENTS,
    HoldResult,
    chat_request_body,
    completion_body,
    free_port,
    median,
    percentile,
    run_async,
    serve_backend,
    stream_events,
)

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODEL = "bench"
UPSTREAM_MODEL = "real-model"
BACKEND_KEY = "sk-bench-key-000000"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_LINE_NUMBER = re.compile(r":\d+\)$")


# --------------------------------------------------------------------------------------------
# The gateway's environment (the fake backend is bench/common.py's, run in its own process:
# `gateway_bench.py --serve-backend PORT`)
# --------------------------------------------------------------------------------------------


def gateway_environment() -> dict[str, str]:
    """The environment a benchmarked gateway runs in: none of the caller's gateway settings,
    JSON access logs at INFO, as deployed."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GATEWAY_") and k not in ("ALLOW_ORIGINS", "LOG_LEVEL")
    }
    env.update(LOG_FORMAT="json", LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
    return env


# --------------------------------------------------------------------------------------------
# Child processes and /proc
# --------------------------------------------------------------------------------------------


def _child_setup(cpus: set[int] | None) -> Callable[[], None]:
    """Runs in the child before exec: die with the bench (PR_SET_PDEATHSIG), optional pinning
    (set before exec so that every thread the child starts inherits it)."""

    def setup() -> None:
        with contextlib.suppress(Exception):
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


class Children:
    """Every process the bench starts; all are stopped in `stop_all` (finally and atexit)."""

    # Subclasses that stop whole process groups start each child in a group of its own.
    own_groups = False

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        atexit.register(self.stop_all)

    def start(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        stdout: Any = subprocess.DEVNULL,
        stderr: Any = subprocess.DEVNULL,
        cpus: set[int] | None = None,
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            preexec_fn=_child_setup(cpus),
            start_new_session=self.own_groups,
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        self.procs.clear()


def wait_listening(proc: subprocess.Popen[bytes], port: int, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not listening on {HOST}:{port} after {timeout:g} s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) from /proc/<pid>/status, in KiB."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                found[line.split(":")[0]] = int(line.split()[1])
    return found


# --------------------------------------------------------------------------------------------
# The load generator: a minimal keep-alive HTTP/1.1 client
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str  # "direct" or "gateway"
    port: int
    model: str  # what the client sends
    expect: bytes  # what a correct answer must carry: the model the client asked for

    def request(self, stream: bool, extra_headers: dict[str, str] | None = None) -> bytes:
        body = chat_request_body(self.model, stream)
        key = BACKEND_KEY if self.name == "direct" else "sk-client-key-000000"
        headers = {
            "Host": f"{HOST}:{self.port}",
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if stream else "application/json",
            "User-Agent": "gateway-bench/1",
            **(extra_headers or {}),
            "Content-Length": str(len(body)),
        }
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return f"POST /v1/chat/completions HTTP/1.1\r\n{head}\r\n".encode() + body


class BadResponse(Exception):
    pass


@dataclass(slots=True)
class Timing:
    first_byte: float  # seconds from sending to the first body byte (streams: the first event)
    total: float


class Connection:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def ensure_open(self, io_timeout: float) -> None:
        if self.writer is None:
            async with asyncio.timeout(io_timeout):
                self.reader, self.writer = await asyncio.open_connection(HOST, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def exchange(
        self, request: bytes, expect: bytes, stream: bool, io_timeout: float
    ) -> tuple[Timing, bytes]:
        """Send one request and read its whole response; BadResponse if it is not right."""
        await self.ensure_open(io_timeout)
        assert self.reader is not None and self.writer is not None
        reader = self.reader
        async with asyncio.timeout(io_timeout):
            sent = time.perf_counter()
            self.writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip().lower()
            first: float | None = None
            if headers.get(b"transfer-encoding") == b"chunked":
                parts = []
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")  # no trailers from aiohttp
                        break
                    data = await reader.readexactly(size + 2)
                    if first is None:
                        first = time.perf_counter()
                    parts.append(data[:-2])
                body = b"".join(parts)
            elif b"content-length" in headers:
                body = await reader.readexactly(int(headers[b"content-length"]))
                first = time.perf_counter()
            else:
                raise BadResponse(f"HTTP {status} without a length")
            done = time.perf_counter()
        if headers.get(b"connection") == b"close":
            self.close()
        if status != 200:
            raise BadResponse(f"HTTP {status}: {body[:200]!r}")
        if expect not in body:
            raise BadResponse(f"answer does not name the requested model: {body[:200]!r}")
        if stream and (not body.endswith(DONE) or body.count(b"data: ") != STREAM_EVENTS + 1):
            raise BadResponse(f"stream not {STREAM_EVENTS} events + [DONE]: {body[-200:]!r}")
        return Timing((first or done) - sent, done - sent), body


@dataclass
class LoadResult:
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0
    first_byte: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds used

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0


async def run_load(
    target: Target,
    *,
    stream: bool,
    concurrency: int,
    seconds: float,
    io_timeout: float,
    pids: dict[str, int],
) -> LoadResult:
    """`concurrency` connections, each sending requests back to back for `seconds`."""
    request = target.request(stream)
    expect = b'"model":"' + target.expect + b'"'
    result = LoadResult()
    conns = [Connection(target.port) for _ in range(concurrency)]
    await asyncio.gather(*(c.ensure_open(io_timeout) for c in conns))

    async def worker(conn: Connection, deadline: float) -> None:
        while time.perf_counter() < deadline:
            try:
                timing, _ = await conn.exchange(request, expect, stream, io_timeout)
            except (BadResponse, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                result.errors[f"{type(exc).__name__}: {str(exc)[:160]}"] += 1
                conn.close()
                await asyncio.sleep(0.01)
                continue
            result.ok += 1
            result.first_byte.append(timing.first_byte)
            result.total.append(timing.total)

    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c, started + seconds) for c in conns))
    finally:
        result.elapsed = time.perf_counter() - started
        result.cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        for conn in conns:
            conn.close()
    return result


async def hold_streams(
    target: Target, n: int, events: int, interval: float, io_timeout: float, gateway_pid: int
) -> HoldResult:
    """`n` slow streams (one event per `interval`) open at once; the gateway's RSS meanwhile."""
    request = target.request(True, {EVENTS_HEADER: str(events), INTERVAL_HEADER: str(interval)})
    result = HoldResult(streams=n)
    open_now = 0
    started = 0
    all_open = asyncio.Event()
    stream_time = events * interval + io_timeout

    async def one() -> None:
        nonlocal open_now, started
        counted = False
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(io_timeout):
                reader, writer = await asyncio.open_connection(HOST, target.port)
            async with asyncio.timeout(stream_time):
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if int(head[9:12]) != 200 or b"chunked" not in head.lower():
                    raise BadResponse(f"bad head: {head[:80]!r}")
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                    if size == 0:
                        break
                    await reader.readexactly(size + 2)
                    if not counted:
                        counted = True
                        open_now += 1
                        started += 1
                        result.peak_open = max(result.peak_open, open_now)
                        if started == n:
                            all_open.set()
            result.completed += 1
        except (BadResponse, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            result.errors[f"{type(exc).__name__}: {str(exc)[:160]}"] += 1
        finally:
            if counted:
                open_now -= 1
            if writer is not None:
                writer.close()

    cpu_before = cpu_seconds(gateway_pid)
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(one()) for _ in range(n)]
    gathered = asyncio.gather(*tasks)
    while not gathered.done():
        result.rss_peak_kib = max(result.rss_peak_kib, memory_kib(gateway_pid)["VmRSS"])
        if all_open.is_set() and math.isnan(result.all_open_after_s):
            result.all_open_after_s = time.perf_counter() - t0
            result.rss_all_open_kib = memory_kib(gateway_pid)["VmRSS"]
        await asyncio.wait([gathered], timeout=0.1)
    await gathered
    result.seconds = time.perf_counter() - t0
    result.proxy_cpu_s = cpu_seconds(gateway_pid) - cpu_before
    return result


# --------------------------------------------------------------------------------------------
# Statistics and the report
# --------------------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


# Per rep, per target, the figures the table is made of.
METRICS = {
    "latency_p50_ms": "non-stream latency p50, c=1 (ms)",
    "latency_p99_ms": "non-stream latency p99, c=1 (ms)",
    "stream_ttfb_p50_ms": "stream first event p50, c=1 (ms)",
    "stream_total_p50_ms": "stream complete p50, c=1 (ms)",
    "rps": "non-stream throughput, c=N (req/s)",
    "streams_per_s": "stream throughput, c=N (streams/s)",
    "total_cpu_us_per_req": "all-process CPU per request (µs)",
    "total_cpu_us_per_stream": "all-process CPU per stream (µs)",
}


def summarize(per_rep: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Medians per target, and the median of the per-rep ratios gateway/direct (each rep's two
    figures were measured back to back, so their ratio is steadier than either figure)."""
    out: dict[str, Any] = {}
    for metric in per_rep[0]["direct"]:
        direct = [rep["direct"][metric] for rep in per_rep]
        gateway = [rep["gateway"][metric] for rep in per_rep]
        out[metric] = {
            "direct": median(direct),
            "gateway": median(gateway),
            "ratio": median([ratio(g, d) for g, d in zip(gateway, direct, strict=True)]),
        }
    added = [rep["gateway"]["latency_p50_ms"] - rep["direct"]["latency_p50_ms"] for rep in per_rep]
    out["added_latency_p50_ms"] = median(added)
    added_ttfb = [
        rep["gateway"]["stream_ttfb_p50_ms"] - rep["direct"]["stream_ttfb_p50_ms"]
        for rep in per_rep
    ]
    out["added_stream_ttfb_p50_ms"] = median(added_ttfb)
    return out


def print_report(results: dict[str, Any]) -> None:
    meta, summary, cpu, mem = results["meta"], results["summary"], results["cpu"], results["memory"]
    conc = meta["concurrency"]
    print()
    print(
        f"gateway bench {meta['date']}  {meta['cpus']} CPU(s), loopback, "
        f"{meta['reps']} reps x {meta['seconds']:g} s, medians"
    )
    placement = (
        "pinned: gateway on core 0, backend + client on core 1" if meta["pinned"] else ("unpinned")
    )
    print(f"  client, gateway and backend share the {meta['cpus']} cores ({placement});")
    print("  absolute figures move with any other load on the machine: compare the ratios")
    print()
    print(f"  {'':40} {'direct':>11} {'gateway':>11} {'gw/direct':>10}")
    for metric, label in METRICS.items():
        row = summary[metric]
        label = label.replace("c=N", f"c={conc}")
        print(
            f"  {label:40} {fmt(row['direct']):>11} {fmt(row['gateway']):>11} "
            f"{fmt(row['ratio']):>9}x"
        )
    print(
        f"  {'added latency p50, c=1 (ms)':40} {'':>11} {fmt(summary['added_latency_p50_ms']):>11}"
    )
    print(
        f"  {'added first-event p50, c=1 (ms)':40} {'':>11} "
        f"{fmt(summary['added_stream_ttfb_p50_ms']):>11}"
    )
    print()
    print(f"  CPU per request/stream, c={conc} (µs; /proc utime+stime; median of reps)")
    print(f"  {'':40} {'client':>11} {'backend':>11} {'gateway':>11}")
    for kind in ("request", "stream"):
        for target in ("direct", "gateway"):
            row = cpu[kind][target]
            print(
                f"  {f'{target}, per {kind}':40} {fmt(row['client'], 0):>11} "
                f"{fmt(row['backend'], 0):>11} {fmt(row['gateway'], 0):>11}"
            )
        print(
            f"  {f'  gateway / backend CPU per {kind}':40} {'':>11} {'':>11} "
            f"{fmt(cpu[kind]['gateway_over_backend']):>10}x"
        )
    print("  busy cores while loading the gateway (1.0 = one core fully busy)")
    for kind in ("request", "stream"):
        busy = cpu[kind]["busy_cores_gateway_target"]
        print(
            f"  {f'  {kind}s':40} {fmt(busy['client']):>11} {fmt(busy['backend']):>11} "
            f"{fmt(busy['gateway']):>11}"
        )
    print()
    hold = mem["hold"]
    mib = 1024
    print("  gateway RSS (MiB)")
    print(f"  {'  at start, before any traffic':40} {fmt(mem['start_kib'] / mib, 1):>11}")
    print(f"  {'  after the throughput phases':40} {fmt(mem['before_hold_kib'] / mib, 1):>11}")
    all_open = hold["rss_all_open_kib"]
    label = f"  holding {hold['streams']} slow streams"
    print(
        f"  {label:40} "
        f"{fmt(all_open / mib if all_open else None, 1):>11}   "
        f"(peak {fmt(hold['rss_peak_kib'] / mib, 1)}, {hold['peak_open']} open at once)"
    )
    if hold["streams"]:
        print(
            f"  {'    all open after (s)':40} {fmt(hold['all_open_after_s']):>11}   "
            f"({hold['completed']}/{hold['streams']} completed)"
        )
    print(f"  {'  2 s after they ended':40} {fmt(mem['after_hold_kib'] / mib, 1):>11}")
    print(f"  {'  VmHWM (peak over the run)':40} {fmt(mem['hwm_kib'] / mib, 1):>11}")
    if hold["streams"]:
        per_stream = (hold["rss_peak_kib"] - mem["before_hold_kib"]) / hold["streams"]
        print(f"  {'  ≈ per held stream (KiB)':40} {fmt(per_stream, 1):>11}")
        print(
            f"  {'  gateway CPU while holding (% core)':40} "
            f"{fmt(100 * hold['gateway_cpu_s'] / hold['seconds'], 1):>11}"
        )
    print()
    errors = results["errors"]
    print(f"  client-side errors: {sum(errors.values()) or 'none'}")
    for text, count in list(errors.items())[:5]:
        print(f"    {count} x {text}")
    logs = results["gateway_log"]
    print(
        f"  gateway access log: {logs['lines']} lines, {logs['bytes'] / 1e6:.1f} MB, "
        f"statuses {logs['statuses']}, warnings/errors {logs['problems'] or 'none'}"
    )
    unexpected = {
        k: v for k, v in logs["other_lines"].items() if not k.startswith("gateway.server")
    }
    if unexpected:
        print(f"  other gateway log lines: {unexpected}")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def summarize_log(path: Path) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    others: Counter[str] = Counter()
    lines = 0
    with path.open("rb") as f:
        for raw in f:
            lines += 1
            try:
                entry = json.loads(raw)
            except ValueError:
                problems["non-JSON line"] += 1
                continue
            if entry.get("event") == "request":
                statuses[str(entry.get("status"))] += 1
            else:
                others[f"{entry.get('logger')}: {str(entry.get('event'))[:60]}"] += 1
            if entry.get("level") in ("warning", "error", "critical"):
                problems[f"{entry.get('level')}: {str(entry.get('event'))[:100]}"] += 1
    return {
        "lines": lines,
        "bytes": path.stat().st_size,
        "statuses": dict(statuses),
        "problems": dict(problems),
        "other_lines": dict(others),
    }


def cpu_table(runs: list[dict[str, Any]], kind: str, counts_key: str) -> dict[str, Any]:
    """µs of CPU per completed request (or stream) for each process, median over reps."""
    out: dict[str, Any] = {}
    for target in ("direct", "gateway"):
        out[target] = {
            proc: median(
                [
                    1e6 * run[kind][target]["cpu"][proc] / max(run[kind][target][counts_key], 1)
                    for run in runs
                ]
            )
            for proc in ("client", "backend", "gateway")
        }
    out["gateway_over_backend"] = median(
        [
            ratio(run[kind]["gateway"]["cpu"]["gateway"], run[kind]["direct"]["cpu"]["backend"])
            * ratio(run[kind]["direct"][counts_key], run[kind]["gateway"][counts_key])
            for run in runs
        ]
    )
    out["busy_cores_gateway_target"] = {
        proc: median(
            [run[kind]["gateway"]["cpu"][proc] / run[kind]["gateway"]["elapsed"] for run in runs]
        )
        for proc in ("client", "backend", "gateway")
    }
    return out


def _load_record(result: LoadResult) -> dict[str, Any]:
    return {"ok": result.ok, "elapsed": result.elapsed, "cpu": result.cpu}


async def measure(
    args: argparse.Namespace, pids: dict[str, int], targets: list[Target]
) -> dict[str, Any]:
    progress = print_progress(args)
    errors: Counter[str] = Counter()
    gateway_pid = pids["gateway"]
    memory: dict[str, Any] = {"start_kib": memory_kib(gateway_pid)["VmRSS"]}

    def note(result: LoadResult) -> LoadResult:
        errors.update(result.errors)
        return result

    # Sanity: one answer of each kind from each target, and the model rewritten both ways.
    for target in targets:
        for stream in (False, True):
            conn = Connection(target.port)
            try:
                await conn.exchange(
                    target.request(stream),
                    b'"model":"' + target.expect + b'"',
                    stream,
                    args.timeout,
                )
            except BadResponse as exc:
                raise SystemExit(f"{target.name}: wrong answer, nothing measured: {exc}") from None
            finally:
                conn.close()
    progress("warming up")
    for target in targets:
        for stream in (False, True):
            note(
                await run_load(
                    target,
                    stream=stream,
                    concurrency=args.concurrency,
                    seconds=args.warmup,
                    io_timeout=args.timeout,
                    pids=pids,
                )
            )

    per_rep: list[dict[str, dict[str, float]]] = []
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        order = targets if rep % 2 == 0 else targets[::-1]  # ABBA: cancel slow drifts
        figures: dict[str, dict[str, float]] = {t.name: {} for t in targets}
        run: dict[str, Any] = {"request": {}, "stream": {}}
        for target in order:
            progress(f"rep {rep + 1}/{args.reps}: {target.name}, latency at c=1")
            lat = note(
                await run_load(
                    target,
                    stream=False,
                    concurrency=1,
                    seconds=args.latency_seconds,
                    io_timeout=args.timeout,
                    pids=pids,
                )
            )
            figures[target.name]["latency_p50_ms"] = 1e3 * percentile(lat.total, 50)
            figures[target.name]["latency_p99_ms"] = 1e3 * percentile(lat.total, 99)
        for target in order[::-1]:
            progress(f"rep {rep + 1}/{args.reps}: {target.name}, stream first event at c=1")
            ttfb = note(
                await run_load(
                    target,
                    stream=True,
                    concurrency=1,
                    seconds=args.latency_seconds,
                    io_timeout=args.timeout,
                    pids=pids,
                )
            )
            figures[target.name]["stream_ttfb_p50_ms"] = 1e3 * percentile(ttfb.first_byte, 50)
            figures[target.name]["stream_total_p50_ms"] = 1e3 * percentile(ttfb.total, 50)
        for target in order:
            progress(f"rep {rep + 1}/{args.reps}: {target.name}, requests at c={args.concurrency}")
            tput = note(
                await run_load(
                    target,
                    stream=False,
                    concurrency=args.concurrency,
                    seconds=args.seconds,
                    io_timeout=args.timeout,
                    pids=pids,
                )
            )
            figures[target.name]["rps"] = tput.rate
            figures[target.name]["total_cpu_us_per_req"] = (
                1e6 * sum(tput.cpu.values()) / max(tput.ok, 1)
            )
            run["request"][target.name] = _load_record(tput)
        for target in order[::-1]:
            progress(f"rep {rep + 1}/{args.reps}: {target.name}, streams at c={args.concurrency}")
            tput = note(
                await run_load(
                    target,
                    stream=True,
                    concurrency=args.concurrency,
                    seconds=args.seconds,
                    io_timeout=args.timeout,
                    pids=pids,
                )
            )
            figures[target.name]["streams_per_s"] = tput.rate
            figures[target.name]["total_cpu_us_per_stream"] = (
                1e6 * sum(tput.cpu.values()) / max(tput.ok, 1)
            )
            run["stream"][target.name] = _load_record(tput)
        per_rep.append(figures)
        runs.append(run)

    memory["before_hold_kib"] = memory_kib(gateway_pid)["VmRSS"]
    hold = HoldResult(streams=0)
    if args.hold:
        progress(f"holding {args.hold} slow streams through the gateway")
        hold = await hold_streams(
            targets[1],
            args.hold,
            events=args.hold_seconds + 1,
            interval=1.0,
            io_timeout=args.timeout,
            gateway_pid=gateway_pid,
        )
        errors.update(hold.errors)
        await asyncio.sleep(2)
    memory["after_hold_kib"] = memory_kib(gateway_pid)["VmRSS"]
    memory["hwm_kib"] = memory_kib(gateway_pid)["VmHWM"]
    memory["hold"] = {
        "streams": hold.streams,
        "completed": hold.completed,
        "peak_open": hold.peak_open,
        "all_open_after_s": hold.all_open_after_s,
        "rss_all_open_kib": hold.rss_all_open_kib,
        "rss_peak_kib": hold.rss_peak_kib,
        "gateway_cpu_s": hold.proxy_cpu_s,
        "seconds": hold.seconds,
    }
    return {
        "summary": summarize(per_rep),
        "per_rep": per_rep,
        "cpu": {
            "request": cpu_table(runs, "request", "ok"),
            "stream": cpu_table(runs, "stream", "ok"),
        },
        "runs": runs,
        "memory": memory,
        "errors": dict(errors.most_common()),
    }


async def _profile_load(args: argparse.Namespace, target: Target, pids: dict[str, int]) -> None:
    for stream in (False, True):
        await run_load(
            target,
            stream=stream,
            concurrency=args.concurrency,
            seconds=args.profile / 2,
            io_timeout=args.timeout,
            pids=pids,
        )


def profile_gateway(
    args: argparse.Namespace, target: Target, pids: dict[str, int], children: Children
) -> dict[str, Any] | None:
    """Load the gateway for `--profile` seconds (half requests, half streams) under py-spy;
    the share of samples in each function, on its own and with what it calls."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("--profile: py-spy not found (.venv/bin/pip install py-spy)", file=sys.stderr)
        return None
    out = Path(tempfile.mkdtemp(prefix="gateway-bench-prof-")) / "stacks.txt"
    spy = children.start(
        [py_spy, "record", "--pid", str(pids["gateway"]), "--duration", str(int(args.profile)),
         "--rate", "200", "--format", "raw", "--output", str(out)],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(0.5)  # let py-spy attach
    run_async(_profile_load(args, target, pids))
    try:
        _, err = spy.communicate(timeout=args.profile + 30)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if not out.exists():
        print(f"--profile: py-spy failed: {err.decode()[-500:]}", file=sys.stderr)
        return None
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = stack.split(";")
        if not stack or not count_text.isdigit():
            continue
        # `func (file:line)` -> `func (file)`: a function's samples together, whatever line.
        frames = [_LINE_NUMBER.sub(")", frame) for frame in frames]
        count = int(count_text)
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if args.profile_raw:
        shutil.copy(out, args.profile_raw)
    shutil.rmtree(out.parent, ignore_errors=True)
    share = max(total, 1) / 100
    return {
        "seconds": args.profile,
        "samples": total,
        "own_percent": {k: round(v / share, 2) for k, v in own.most_common(25)},
        "inclusive_percent": {k: round(v / share, 2) for k, v in inclusive.most_common(40)},
    }


def print_profile(profile: dict[str, Any]) -> None:
    print(
        f"\n  py-spy, gateway under load for {profile['seconds']:g} s "
        f"(half requests, half streams), {profile['samples']} samples; own time:"
    )
    for frame, percent in profile["own_percent"].items():
        print(f"    {percent:5.1f}%  {frame}")
    print("  inclusive time (the function and what it calls):")
    for frame, percent in profile["inclusive_percent"].items():
        print(f"    {percent:5.1f}%  {frame}")


def print_progress(args: argparse.Namespace) -> Callable[[str], None]:
    started = time.monotonic()

    def progress(text: str) -> None:
        if not args.quiet:
            print(f"[{time.monotonic() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    return progress


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions, A/B alternated (3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput phase (5)")
    parser.add_argument("--latency-seconds", type=float, default=2.0, help="per c=1 phase (2)")
    parser.add_argument("--concurrency", type=int, default=32, help="for throughput (32)")
    parser.add_argument("--hold", type=int, default=500, help="slow streams held (500; 0: skip)")
    parser.add_argument("--hold-seconds", type=int, default=8, help="length of a held stream (8)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds per warm-up phase (1)")
    parser.add_argument(
        "--timeout", type=float, default=15.0, help="per request or connect, s (15)"
    )
    parser.add_argument("--pin", action="store_true", help="gateway on core 0, rest on core 1")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--gateway-log", help="keep the gateway's JSON log at this path")
    parser.add_argument(
        "--profile", type=float, default=0, help="then py-spy the gateway for N s under load"
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra gateway environment, for experiments (LOG_LEVEL=WARNING: no access log)",
    )
    parser.add_argument("--profile-raw", help="keep py-spy's collapsed stacks at this path")
    parser.add_argument("--serve-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("reps", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if any("=" not in item for item in args.gateway_env):
        parser.error("--gateway-env takes NAME=VALUE")
    if args.seconds <= 0 or args.latency_seconds <= 0 or args.hold < 0 or args.hold_seconds < 1:
        parser.error("durations must be positive")
    return args


def _raise_exit(signum: int, _: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_backend is not None:
        run_async(serve_backend(args.serve_backend))
        return 0

    signal.signal(signal.SIGTERM, _raise_exit)
    # A backstop far above the expected run time: the finally below still stops the children.
    budget = 120 + 4 * (
        args.reps * 2 * (2 * args.latency_seconds + 2 * args.seconds)
        + 4 * args.warmup
        + args.hold_seconds
        + args.profile
    )
    signal.signal(signal.SIGALRM, _raise_exit)
    signal.alarm(int(budget))

    cpus = sorted(os.sched_getaffinity(0))
    pin = args.pin and len(cpus) >= 2
    if args.pin and not pin:
        print("--pin needs 2 CPUs; running unpinned", file=sys.stderr)
    gateway_cpus = {cpus[0]} if pin else None
    rest_cpus = {cpus[1]} if pin else None
    if rest_cpus:
        os.sched_setaffinity(0, rest_cpus)

    children = Children()
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    log_path = Path(args.gateway_log) if args.gateway_log else workdir / "gateway.log"
    try:
        backend_port, gateway_port = free_port(), free_port()
        backend = children.start(
            [sys.executable, str(Path(__file__).resolve()), "--serve-backend", str(backend_port)],
            cpus=rest_cpus,
        )
        # A folder of its own: the gateway watches its config's folder, and a log file written
        # there would wake the watcher on every line.
        (workdir / "config").mkdir()
        config = workdir / "config" / "gateway.json"
        endpoint = {
            "url": f"http://{HOST}:{backend_port}/v1",
            "apiKey": BACKEND_KEY,
            "actualModelName": UPSTREAM_MODEL,
        }
        config.write_text(json.dumps({"endpoints": {PUBLIC_MODEL: endpoint}}))
        env = gateway_environment()
        env.update(item.split("=", 1) for item in args.gateway_env)
        with log_path.open("wb") as log_file:
            gateway = children.start(
                [sys.executable, "-m", "gateway", "--config", str(config), "--host", HOST,
                 "--port", str(gateway_port)],
                env=env,
                stderr=log_file,
                cpus=gateway_cpus,
            )  # fmt: skip
        wait_listening(backend, backend_port, "backend", 20)
        wait_listening(gateway, gateway_port, "gateway", 20)
        pids = {"client": os.getpid(), "backend": backend.pid, "gateway": gateway.pid}
        targets = [
            Target("direct", backend_port, UPSTREAM_MODEL, UPSTREAM_MODEL.encode()),
            Target("gateway", gateway_port, PUBLIC_MODEL, PUBLIC_MODEL.encode()),
        ]
        results = run_async(measure(args, pids, targets))
        results["gateway_log"] = summarize_log(log_path)
        results["meta"] = {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": len(cpus),
            "cpu_model": _cpu_model(),
            "pinned": pin,
            "python": platform.python_version(),
            "reps": args.reps,
            "seconds": args.seconds,
            "latency_seconds": args.latency_seconds,
            "concurrency": args.concurrency,
            "hold": args.hold,
            "gateway_env": args.gateway_env,
            "stream_events": STREAM_EVENTS,
            "response_bytes": len(completion_body(UPSTREAM_MODEL)),
            "event_bytes": len(stream_events(UPSTREAM_MODEL, STREAM_EVENTS)[0]),
        }
        if args.profile:
            progress = print_progress(args)
            progress(f"profiling the gateway for {args.profile:g} s")
            results["profile"] = profile_gateway(args, targets[1], pids, children)
        if args.json:
            print(json.dumps(results, indent=2, default=str))
        else:
            print_report(results)
            if results.get("profile"):
                print_profile(results["profile"])
        return 0
    finally:
        signal.alarm(0)
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `| head`: not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
