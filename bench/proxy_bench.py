"""Issue #7's benchmark: the gateway against nginx and against no proxy at all, with wrk.

Run from the repository root, as root on Debian (it installs wrk and nginx when missing):

    .venv/bin/python bench/proxy_bench.py [--repeat 3] [--duration 5] [--streams 2000]
                                          [--quick] [--no-bare] [--multiproc-cost] [--tracing-cost]
                                          [--paced-only] [--paced-events 20,200]
                                          [--baseline-root DIR] [--json] [--profile PATH]

One run starts, on loopback:

- the fast fake OpenAI backend (bench/common.py, `--serve-backend PORT`): a raw asyncio protocol on
  uvloop, so that it costs far less than either proxy. `POST /v1/chat/completions` answers a
  495-byte chat completion, or with `"stream": true` 20 SSE events (5.4 KB, one send() each)
  and `data: [DONE]`; with `X-Bench-Interval: S` one event every S seconds (held streams);
- nginx as a plain reverse proxy (bench/nginx.conf: one worker, keep-alive upstream pool,
  proxy_buffering off, access log on);
- bench/bare_proxy.py, the smallest aiohttp + uvloop reverse proxy (no auth, logs, metrics or
  rewrite): the floor of any proxy written on aiohttp, the gateway's framework;
- the gateway, `python -m gateway`, with JSON access logs at INFO and metrics, as deployed.

Paced streams (issue #17): `--paced-streams` (256) streams at once whose events the backend
sends `--paced-interval` (20 ms) apart, each stamped with its send time, streams of each
`--paced-events` length (20 and 200): the proxy's CPU per event and per stream, each event's
added latency, the time to first event; then a saturation ramp per proxy (tokens/s when its
core is full). `--paced-only` runs only those; `--baseline-root DIR` adds another checkout's
gateway as a fifth target (before/after in one run).

The proxies are pinned to core 0; the backend, wrk and this script's own clients to core 1.
Four targets: direct (wrk -> backend), nginx, bare and gateway (each -> backend), measured in
turn (A B C D, then D C B A, ...) for `--repeat` repetitions. It prints the medians, the ratios
gateway/bare, bare/nginx, gateway/nginx and gateway/direct, and issue #7's targets beside the
gateway's figures. `--multiproc-cost` adds the gateway with and without
PROMETHEUS_MULTIPROC_DIR (prometheus_client's mmapped values, which `--workers N` switches on);
`--tracing-cost` the gateway with OpenTelemetry tracing off and on (always-on sampler, batch
exporter to an OTLP/HTTP sink).
It is a benchmark, run by hand, not a test. bench/README.md explains each figure and records
a run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from common import (
    DONE,
    EVENTS_HEADER,
    HOST,
    INTERVAL_HEADER,
    STAMP_HEADER,
    STAMP_MARK,
    STREAM_EVENTS,
    HoldResult,
    chat_request_body,
    free_port,
    median,
    percentile,
    run_async,
    serve_backend,
)
from gateway_bench import (
    BACKEND_KEY,
    PUBLIC_MODEL,
    UPSTREAM_MODEL,
    Children,
    _raise_exit,
    cpu_seconds,
    gateway_environment,
    ratio,
    wait_listening,
)

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
NGINX_TEMPLATE = BENCH / "nginx.conf"
WRK_SCRIPT = BENCH / "wrk_post.lua"
CLIENT_KEY = "sk-client-key-000000"
BARE_PROXY = BENCH / "bare_proxy.py"
TARGETS = ("direct", "nginx", "bare", "gateway")
# Per-rep ratios printed beside the medians: numerator, denominator. gateway/bare is what the
# gateway adds to aiohttp; bare/nginx is what aiohttp costs against nginx.
RATIOS = (
    ("gateway", "bare"),
    ("bare", "nginx"),
    ("gateway", "nginx"),
    ("gateway", "direct"),
    # --baseline-root: another checkout's gateway in the same run (before/after a change).
    ("baseline", "bare"),
    ("gateway", "baseline"),
)
MIB = 1024.0
# Issue #7's targets for the gateway (with access logging and metrics on): at most, except
# the --workers 2 scaling, at least.
GOALS = {
    "cpu_us_request": 150.0,
    "cpu_us_stream": 250.0,
    "added_p50_ms": 0.35,  # c=1
    "added_p99_ms": 1.0,
    "hold_rss_mb": 150.0,  # MB, as the issue writes it; the table prints MiB
    "scaling": 1.7,
}
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
# --gateway-root: the checkout every gateway runs from (empty: this one).
GATEWAY_ROOT: list[str] = []


# --------------------------------------------------------------------------------------------
# Tools, processes and /proc
# --------------------------------------------------------------------------------------------


def find_nginx() -> str | None:
    # /usr/sbin is not on a normal user's PATH.
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def ensure_tools() -> tuple[str, str]:
    """wrk and nginx, installed from Debian's archive when missing (as root)."""
    wrk, nginx = shutil.which("wrk"), find_nginx()
    if wrk and nginx:
        return wrk, nginx
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit("proxy_bench: needs wrk and nginx: sudo apt-get install -y wrk nginx-light")
    # While it exists, invoke-rc.d starts no service: the Debian package would otherwise start
    # a system nginx on port 80. This instance runs its own, in the foreground, from bench/.
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text(
            "#!/bin/sh\n# proxy_bench.py: no service starts during its install\nexit 101\n"
        )
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for packages in (["wrk", "nginx-light"], ["wrk", "nginx"]):
            command = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
            print(f"proxy_bench: {' '.join(command)}", file=sys.stderr, flush=True)
            if subprocess.run(command, env=env, check=False).returncode == 0:
                break
            subprocess.run(["apt-get", "update"], env=env, check=False)
            if subprocess.run(command, env=env, check=False).returncode == 0:
                break
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)
    wrk, nginx = shutil.which("wrk"), find_nginx()
    if not (wrk and nginx):
        sys.exit("proxy_bench: installing wrk and nginx failed")
    return wrk, nginx


def descendants(pid: int) -> list[int]:
    """`pid` and every process under it (nginx's worker, the gateway's workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry.name}/stat") as f:
                data = f.read()
            parent = int(data[data.rindex(")") + 2 :].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def tree_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def tree_rss_kib(pids: list[int]) -> int:
    """Sum of VmRSS (pages shared between nginx's master and worker count twice)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


# Kills the process groups it was told about once its stdin closes without "done": when the
# bench dies however it dies, SIGKILL included, which PR_SET_PDEATHSIG covers only for direct
# children (not nginx's worker, nor the gateway's `--workers`).
_REAPER = """
import os, signal, sys
groups = set()
for line in sys.stdin:
    if line.strip() == "done":
        sys.exit(0)
    groups.add(int(line))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
"""


class Processes(Children):
    """gateway_bench's Children (SIGTERM, then SIGKILL; PR_SET_PDEATHSIG; atexit), with each
    child in a process group of its own: Ctrl-C reaches only the bench, which then stops them
    all, grandchildren included, and a reaper process does the same if the bench is killed."""

    own_groups = True

    def __init__(self) -> None:
        super().__init__()
        self.groups: set[int] = set()
        self.reaper: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-c", _REAPER], stdin=subprocess.PIPE, start_new_session=True
        )

    def start(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        stdout: Any = subprocess.DEVNULL,
        stderr: Any = subprocess.DEVNULL,
        cpus: set[int] | None = None,
    ) -> subprocess.Popen[bytes]:
        proc = super().start(argv, env=env, stdout=stdout, stderr=stderr, cpus=cpus)
        self.groups.add(proc.pid)
        if self.reaper is not None and self.reaper.stdin is not None:
            self.reaper.stdin.write(b"%d\n" % proc.pid)
            self.reaper.stdin.flush()
        return proc

    def stop_all(self) -> None:
        super().stop_all()
        for group in self.groups:
            with contextlib.suppress(OSError):
                os.killpg(group, signal.SIGKILL)
        self.groups.clear()
        if self.reaper is not None and self.reaper.stdin is not None:
            with contextlib.suppress(OSError):
                self.reaper.stdin.write(b"done\n")
                self.reaper.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.reaper.wait(timeout=5)
            self.reaper = None

    def stop_tree(self, pid: int) -> None:
        """Stop one started process and its group (a `--workers` gateway) mid-run."""
        for proc in list(self.procs):
            if proc.pid == pid:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
                self.procs.remove(proc)
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        self.groups.discard(pid)


@dataclass
class Proxy:
    name: str
    port: int
    pid: int | None  # the process under test (None: direct)
    model: str  # the model the client asks for
    api_key: str
    workdir: Path
    cpus: str = ""  # its pinning, for the report

    def request_body(self, stream: bool) -> bytes:
        return chat_request_body(self.model, stream)

    def headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.api_key}",
            "Content-Type": "application/json",
            "User-Agent": "proxy-bench/1",
        }

    def raw_request(self, stream: bool, extra: dict[str, str] | None = None) -> bytes:
        body = self.request_body(stream)
        headers = {
            "Host": f"{HOST}:{self.port}",
            **self.headers(),
            **(extra or {}),
            "Content-Length": str(len(body)),
        }
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return f"POST /v1/chat/completions HTTP/1.1\r\n{head}\r\n".encode() + body

    def pids(self) -> list[int]:
        return descendants(self.pid) if self.pid else []


# --------------------------------------------------------------------------------------------
# Load: wrk for throughput and c=1 latency, a blocking socket for time to first event
# --------------------------------------------------------------------------------------------


@dataclass
class WrkRun:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    proxy_cpu_s: float
    backend_cpu_s: float
    wrk_cpu_s: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else math.nan

    def proxy_us(self) -> float:
        return 1e6 * self.proxy_cpu_s / self.requests if self.requests else math.nan

    def backend_us(self) -> float:
        return 1e6 * self.backend_cpu_s / self.requests if self.requests else math.nan


class Bench:
    def __init__(self, args: argparse.Namespace, wrk: str, procs: Processes) -> None:
        self.args = args
        self.wrk = wrk
        self.procs = procs
        self.backend_pid = 0
        self.client_cpus: set[int] | None = None
        self.errors: Counter[str] = Counter()

    def run_wrk(
        self,
        proxy: Proxy,
        *,
        stream: bool,
        connections: int,
        seconds: int,
        threads: int = 1,
        pinned: bool = True,
    ) -> WrkRun:
        body = proxy.workdir / f"body-{proxy.name}-{'stream' if stream else 'plain'}.json"
        body.write_bytes(proxy.request_body(stream))
        env = {
            **os.environ,
            "BENCH_BODY": str(body),
            "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in proxy.headers().items()),
        }
        argv = [
            self.wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
            "--latency", "-s", str(WRK_SCRIPT), f"http://{HOST}:{proxy.port}/v1/chat/completions",
        ]  # fmt: skip
        pids = proxy.pids()
        before = tree_cpu(pids), cpu_seconds(self.backend_pid)
        proc = self.procs.start(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cpus=self.client_cpus if pinned else None,
        )
        assert proc.stdout is not None
        output = proc.stdout.read().decode(errors="replace")
        # wait4, not wait: wrk's own CPU comes with its exit status.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proxy_cpu = tree_cpu(pids) - before[0]
        backend_cpu = cpu_seconds(self.backend_pid) - before[1]
        self.procs.procs.remove(proc)
        line = next((ln for ln in output.splitlines() if ln.startswith("BENCH_JSON ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {output[-1000:]}")
        summary = json.loads(line.removeprefix("BENCH_JSON "))
        errors = sum(
            summary[k]
            for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
        )
        if errors:
            kind = "stream" if stream else "plain"
            self.errors[f"{proxy.name} {kind} c={connections}: wrk errors"] += errors
        return WrkRun(
            requests=summary["requests"] - summary["status_errors"],
            seconds=summary["duration_us"] / 1e6,
            errors=errors,
            p50_ms=summary["p50_us"] / 1e3,
            p99_ms=summary["p99_us"] / 1e3,
            proxy_cpu_s=proxy_cpu,
            backend_cpu_s=backend_cpu,
            wrk_cpu_s=usage.ru_utime + usage.ru_stime,
        )


class BadAnswer(Exception):
    pass


class BlockingClient:
    """One keep-alive connection; one request at a time; times the first SSE event."""

    def __init__(self, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def _more(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise BadAnswer("connection closed")
        self.buffer += data

    def _take_line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            self._more()
        line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
        return line

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._more()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def exchange(self, request: bytes) -> tuple[int, bytes, float, float]:
        """Status, body, seconds to the first body byte, seconds to the end."""
        sent = time.perf_counter()
        self.sock.sendall(request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._more()
        head, self.buffer = self.buffer[:end].lower(), self.buffer[end + 4 :]
        status = int(head[9:12])
        first = math.nan
        if b"transfer-encoding: chunked" in head:
            parts = []
            while size := int(self._take_line().split(b";")[0], 16):
                parts.append(self._take(size + 2)[:-2])
                if len(parts) == 1:
                    first = time.perf_counter() - sent
            self._take_line()
            body = b"".join(parts)
        else:
            found = _CONTENT_LENGTH.search(b"\r\n" + head)
            if not found:
                raise BadAnswer(f"HTTP {status} without a length")
            body = self._take(int(found.group(1)))
            first = time.perf_counter() - sent
        return status, body, first, time.perf_counter() - sent


def check_answer(proxy: Proxy, stream: bool, status: int, body: bytes) -> None:
    if status != 200:
        raise BadAnswer(f"HTTP {status}: {body[:200]!r}")
    if f'"model":"{proxy.model}"'.encode() not in body:
        raise BadAnswer(f"answer does not name the model asked for: {body[:200]!r}")
    if stream and (not body.endswith(DONE) or body.count(b"data: ") != STREAM_EVENTS + 1):
        raise BadAnswer(f"not {STREAM_EVENTS} events and [DONE]: {body[-200:]!r}")


def check_target(proxy: Proxy, timeout: float) -> None:
    """One request and one stream, checked in full: wrk counts statuses, not contents."""
    client = BlockingClient(proxy.port, timeout)
    try:
        for stream in (False, True):
            status, body, _, _ = client.exchange(proxy.raw_request(stream))
            check_answer(proxy, stream, status, body)
    finally:
        client.close()


def stream_latency(proxy: Proxy, seconds: float, timeout: float) -> dict[str, float]:
    """Streams one after another on one connection for `seconds`: time to the first event and
    to the end (the wrk run measures the same end-to-end time for non-stream requests)."""
    request = proxy.raw_request(True)
    client = BlockingClient(proxy.port, timeout)
    first: list[float] = []
    total: list[float] = []
    try:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            status, body, ttfb, done = client.exchange(request)
            check_answer(proxy, True, status, body)
            first.append(ttfb)
            total.append(done)
    finally:
        client.close()
    return {
        "ttfb_p50_ms": 1e3 * percentile(first, 50),
        "ttfb_p99_ms": 1e3 * percentile(first, 99),
        "stream_p50_ms": 1e3 * percentile(total, 50),
        "streams_c1": float(len(total)),
    }


async def _release(backend_port: int) -> None:
    reader, writer = await asyncio.open_connection(HOST, backend_port)
    writer.write(b"POST /_release HTTP/1.1\r\nHost: backend\r\nContent-Length: 0\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    writer.close()


async def hold_streams(
    proxy: Proxy,
    backend_port: int,
    n: int,
    hold_seconds: float,
    limit_s: float,
    settle: float,
    connect_at_once: int,
) -> HoldResult:
    """`n` streams open at once through `proxy` (the backend sends one event per second), held
    `hold_seconds` once all are open, then ended by the backend; the proxy's RSS throughout."""
    request = proxy.raw_request(True, {INTERVAL_HEADER: "1"})
    pids = proxy.pids()
    result = HoldResult(streams=n, rss_before_kib=tree_rss_kib(pids))
    open_now = settled = 0
    all_settled = asyncio.Event()  # every stream is open, or failed before it opened
    # The gateway listens with aiohttp's backlog of 128: 2,000 connects at once would overflow
    # it and wait for SYN retries, which would time the kernel, not the proxy.
    gate = asyncio.Semaphore(connect_at_once)

    def settle_one() -> None:
        nonlocal settled
        settled += 1
        if settled == n:
            all_settled.set()

    async def one() -> None:
        nonlocal open_now
        writer: asyncio.StreamWriter | None = None
        opened = False
        try:
            events = 0
            async with gate, asyncio.timeout(limit_s):
                reader, writer = await asyncio.open_connection(HOST, proxy.port)
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if int(head[9:12]) != 200 or b"chunked" not in head.lower():
                    raise BadAnswer(f"bad head: {head[:80]!r}")
            tail = b""
            while True:
                async with asyncio.timeout(limit_s):
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if not size:
                        await reader.readuntil(b"\r\n")
                        break
                    data = (await reader.readexactly(size + 2))[:-2]
                # Chunks are not events: a proxy may pass on two events in one chunk.
                events += data.count(b"data: ")
                tail = (tail + data)[-64:]
                if not opened and events:
                    opened = True
                    open_now += 1
                    result.peak_open = max(result.peak_open, open_now)
                    settle_one()
            if not tail.endswith(DONE):
                raise BadAnswer(f"no [DONE] after {events} events")
            result.completed += 1
        except (BadAnswer, OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            result.errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
            if not opened:
                settle_one()
        finally:
            if opened:
                open_now -= 1
            if writer is not None:
                writer.close()

    async def sample_until(done: Callable[[], bool]) -> None:
        while not done() and not gathered.done():
            result.rss_peak_kib = max(result.rss_peak_kib, tree_rss_kib(pids))
            await asyncio.wait([gathered], timeout=0.1)

    cpu_before = tree_cpu(pids)
    started = time.perf_counter()
    gathered = asyncio.gather(*(one() for _ in range(n)))
    await sample_until(all_settled.is_set)
    result.all_open_after_s = time.perf_counter() - started
    result.rss_all_open_kib = tree_rss_kib(pids)
    held_until = time.perf_counter() + hold_seconds
    await sample_until(lambda: time.perf_counter() >= held_until)
    result.rss_held_kib = tree_rss_kib(pids)
    await _release(backend_port)
    await sample_until(lambda: False)
    await gathered
    result.proxy_cpu_s = tree_cpu(pids) - cpu_before
    await asyncio.sleep(settle)
    result.rss_after_kib = tree_rss_kib(pids)
    return result


# --------------------------------------------------------------------------------------------
# Paced streams: events spaced like tokens, hundreds of streams at once (issue #17)
# --------------------------------------------------------------------------------------------


@dataclass
class PacedRun:
    """One paced phase through one target: what arrived in its measuring window."""

    streams: int  # connections, each one stream after another
    events_per_stream: int
    interval: float
    seconds: float = 0.0  # the window
    events: int = 0  # events that arrived in the window
    completed: int = 0  # streams that ended in the window
    proxy_cpu_s: float = 0.0
    backend_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    latency_ns: list[int] = field(default_factory=list)  # arrival - backend's send, per event
    ttfe_ns: list[int] = field(default_factory=list)  # request sent -> first event, per stream
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def tokens_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else math.nan

    def cpu_us_event(self) -> float:
        return 1e6 * self.proxy_cpu_s / self.events if self.events else math.nan

    def cpu_us_stream(self) -> float:
        """CPU per event times the events of a stream: what one whole stream costs, its
        request and its end included (they fall in the window in proportion)."""
        return self.cpu_us_event() * self.events_per_stream

    def busy(self) -> float:
        return self.proxy_cpu_s / self.seconds if self.seconds else math.nan

    def client_core_busy(self) -> float:
        """The backend's and this client's CPU per wall second: both share one core."""
        return (self.backend_cpu_s + self.client_cpu_s) / self.seconds if self.seconds else 0.0

    def latency_ms(self, p: float) -> float:
        return percentile(self.latency_ns, p) / 1e6 if self.latency_ns else math.nan

    def ttfe_ms(self, p: float) -> float:
        return percentile(self.ttfe_ns, p) / 1e6 if self.ttfe_ns else math.nan


_HEAD_END = b"\r\n\r\n"
_LAST_CHUNK = b"\r\n0\r\n\r\n"
_STAMP_DIGITS = 32
_STAMP_SPAN = len(STAMP_MARK) + _STAMP_DIGITS


class _PacedClient(asyncio.Protocol):
    """One keep-alive connection that sends one paced stream after another and times each
    event against the backend's stamp. A protocol, not streams: at tens of thousands of
    events a second on the client's core, each read costs a few finds and no copies."""

    def __init__(self, phase: _PacedPhase, delay: float, first_events: int) -> None:
        self.phase = phase
        self.delay = delay  # before the first request: streams start spread over an interval
        # The first stream is shorter, one length per connection: the streams' ends are
        # spread evenly from the start, as in the steady state, not all at once.
        self.expected = first_events
        self.transport: asyncio.Transport | None = None
        self.pending = b""
        self.head = True
        self.done = False
        self.events = 0
        self.model_seen = False
        self.sent_ns = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        asyncio.get_running_loop().call_later(self.delay, self.send)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.phase.stopping:
            self.phase.error(f"connection lost ({exc!r})"[:120])

    def send(self) -> None:
        if self.transport is None or self.phase.stopping:
            return
        self.pending, self.head, self.done, self.events = b"", True, False, 0
        self.model_seen = False
        self.sent_ns = time.monotonic_ns()
        self.transport.write(self.phase.request(self.expected))

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        phase = self.phase
        buf = self.pending + data if self.pending else data
        if self.head:
            end = buf.find(_HEAD_END)
            if end == -1:
                self.pending = buf
                return
            if not buf.startswith(b"HTTP/1.1 200"):
                phase.error(f"bad head: {buf[:40]!r}")
                self.close()
                return
            self.head = False
            buf = buf[end + 4 :]
        if not self.model_seen and buf.find(phase.model_mark) != -1:
            self.model_seen = True
        find, pos, at, keep = buf.find, 0, -1, -1
        while (at := find(STAMP_MARK, pos)) != -1:
            end = at + _STAMP_SPAN
            if end > len(buf):
                keep = at  # a stamp cut by the read: kept for the next
                break
            stamp = int(buf[end - _STAMP_DIGITS : end])
            if self.events == 0:
                phase.first_event(now - self.sent_ns)
            self.events += 1
            phase.event(now - stamp)
            pos = end
        if not self.done and find(DONE, pos) != -1:
            self.done = True
            pos = find(DONE, pos)
        if self.done:
            if find(_LAST_CHUNK, pos) != -1 or buf.endswith(b"0\r\n\r\n"):
                self.finished()
                return
            self.pending = buf[pos:]
            return
        self.pending = buf[keep:] if keep != -1 else buf[max(pos, len(buf) - _STAMP_SPAN) :]

    def finished(self) -> None:
        phase = self.phase
        if self.events != self.expected:
            phase.error(f"{self.events} events, not {self.expected}")
        elif not self.model_seen:
            phase.error("events do not name the model asked for")
        else:
            phase.completed()
        self.expected = phase.events_per_stream
        self.send()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _PacedPhase:
    """The streams of one paced run, and what it counts while its window is open."""

    def __init__(self, proxy: Proxy, events: int, interval: float, model: str) -> None:
        self._proxy = proxy
        self._interval = interval
        self._requests: dict[int, bytes] = {}
        self.events_per_stream = events
        self.model_mark = f'"model":"{model}"'.encode()
        self.stopping = False
        self.counting = False
        self.run: PacedRun | None = None

    def request(self, events: int) -> bytes:
        found = self._requests.get(events)
        if found is None:
            headers = {
                EVENTS_HEADER: str(events),
                INTERVAL_HEADER: f"{self._interval:g}",
                STAMP_HEADER: "1",
            }
            found = self._requests[events] = self._proxy.raw_request(True, headers)
        return found

    def first_event(self, ns: int) -> None:
        if self.counting:
            self.run.ttfe_ns.append(ns)  # type: ignore[union-attr]

    def event(self, ns: int) -> None:
        if self.counting:
            run = self.run
            run.events += 1  # type: ignore[union-attr]
            run.latency_ns.append(ns)  # type: ignore[union-attr]

    def completed(self) -> None:
        if self.counting:
            self.run.completed += 1  # type: ignore[union-attr]

    def error(self, text: str) -> None:
        if self.run is not None:
            self.run.errors[text] += 1


async def paced_streams(
    proxy: Proxy,
    backend_pid: int,
    streams: int,
    events: int,
    interval: float,
    seconds: float,
    warmup: float,
    connect_limit: float,
) -> PacedRun:
    """`streams` connections through `proxy`, each sending paced streams of `events` events
    `interval` s apart one after another; after `warmup` s, a window of `seconds` s counts
    the events that arrive, their latency and the proxy's CPU."""
    run = PacedRun(streams, events, interval)
    phase = _PacedPhase(proxy, events, interval, proxy.model)
    phase.run = run
    loop = asyncio.get_running_loop()
    clients: list[_PacedClient] = []
    gate = asyncio.Semaphore(64)  # a listen backlog of 128 (aiohttp's) must not overflow

    async def connect(i: int) -> None:
        client = _PacedClient(phase, interval * i / streams, 1 + i * events // streams)
        async with gate:
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(connect_limit):
                    await loop.create_connection(lambda: client, HOST, proxy.port)
                clients.append(client)
                return
        run.errors["connect failed"] += 1

    try:
        await asyncio.gather(*(connect(i) for i in range(streams)))
        await asyncio.sleep(warmup + interval)
        pids = proxy.pids()
        before = tree_cpu(pids), cpu_seconds(backend_pid), time.process_time()
        started = time.perf_counter()
        phase.counting = True
        await asyncio.sleep(seconds)
        phase.counting = False
        run.seconds = time.perf_counter() - started
        run.proxy_cpu_s = tree_cpu(pids) - before[0]
        run.backend_cpu_s = cpu_seconds(backend_pid) - before[1]
        run.client_cpu_s = time.process_time() - before[2]
    finally:
        phase.stopping = True
        for client in clients:
            client.close()
    await asyncio.sleep(0.3)  # the proxy sees its connections go before the next phase
    return run


def paced_figures(run: PacedRun) -> dict[str, float]:
    return {
        "cpu_us_event": run.cpu_us_event(),
        "cpu_us_stream": run.cpu_us_stream(),
        "tokens_per_s": run.tokens_per_s,
        "busy": run.busy(),
        "latency_p50_ms": run.latency_ms(50),
        "latency_p99_ms": run.latency_ms(99),
        "ttfe_p50_ms": run.ttfe_ms(50),
        "ttfe_p99_ms": run.ttfe_ms(99),
        "client_core": run.client_core_busy(),
        "completed": float(run.completed),
    }


# Saturation: the ramp stops when the proxy's core is this busy, when an event's latency
# p50 passes LATENCY_BLOWN (events queue in the proxy), or when the client's core is full.
SATURATED_BUSY = 0.95
LATENCY_BLOWN_MS = 20.0
CLIENT_CORE_FULL = 0.92


def saturate(
    bench: Bench,
    proxy: Proxy,
    events: int,
    interval: float,
    start: int,
    seconds: float,
    steps: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Ramp the number of paced streams through `proxy` until its one core is full (or the
    latency blows up, or the client cannot keep up): the tokens/s there. Each step aims at
    the concurrency that the last one's busy share says would fill the core."""
    args = bench.args
    count = start
    ramp: list[dict[str, float]] = []
    verdict = "not saturated"
    for step in range(steps):
        progress(f"saturation: {proxy.name}, {count} paced streams")
        run = run_async(
            paced_streams(proxy, bench.backend_pid, count, events, interval, seconds, 1.0,
                          args.timeout)
        )  # fmt: skip
        bench.errors.update({f"{proxy.name} saturation: {k}": v for k, v in run.errors.items()})
        figures = {"streams": float(count), **paced_figures(run)}
        ramp.append(figures)
        busy = figures["busy"]
        if busy >= SATURATED_BUSY:
            verdict = "core full"
        elif figures["latency_p50_ms"] > LATENCY_BLOWN_MS:
            verdict = "latency blown"
        elif figures["client_core"] >= CLIENT_CORE_FULL:
            verdict = "client-bound"
        if verdict != "not saturated" or step == steps - 1:
            break
        grow = 1.05 / busy if busy > 0 else 4.0
        count = int(count * min(4.0, max(1.25, grow)))
    return {"verdict": verdict, "ramp": ramp, **ramp[-1]}


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def goal(key: str, value: float) -> str:
    """The issue's goal for `key`, and whether the gateway's `value` meets it."""
    if key not in GOALS:
        return ""
    target = GOALS[key]
    at_least = key == "scaling"
    met = value >= target if at_least else value <= target
    mark = "-" if math.isnan(value) else ("met" if met else "NOT")
    return f"{'>=' if at_least else '<='} {target:g} {mark}"


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


# --------------------------------------------------------------------------------------------
# Starting the three targets
# --------------------------------------------------------------------------------------------


def start_nginx(
    nginx: str, procs: Processes, workdir: Path, backend_port: int, access_log: bool, cpus: Any
) -> tuple[int, int]:
    prefix = workdir / "nginx"
    prefix.mkdir()
    # As root, nginx's worker runs as nobody and must reach the files under the prefix.
    for folder in (workdir, prefix):
        folder.chmod(0o755)
    port = free_port()
    conf = (
        NGINX_TEMPLATE.read_text()
        .replace("@PREFIX@", str(prefix))
        .replace("@PORT@", str(port))
        .replace("@BACKEND_PORT@", str(backend_port))
        .replace("@ACCESS_LOG@", str(prefix / "access.log") if access_log else "off")
    )
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    argv = [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf_path)]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t: {check.stderr.strip()}")
    proc = procs.start([*argv, "-g", "daemon off;"], cpus=cpus)
    wait_listening(proc, port, "nginx", 20)
    return proc.pid, port


def start_gateway(
    procs: Processes,
    workdir: Path,
    backend_port: int,
    log_path: Path,
    cpus: Any,
    workers: int | None = None,
    name: str = "gateway",
    extra_env: dict[str, str] | None = None,
    root: str | None = None,
) -> tuple[int, int]:
    # A folder of its own: the gateway watches its config's folder.
    config_dir = workdir / f"{name}-config"
    config_dir.mkdir()
    config = config_dir / "gateway.json"
    endpoint = {
        "url": f"http://{HOST}:{backend_port}/v1",
        "apiKey": BACKEND_KEY,
        "actualModelName": UPSTREAM_MODEL,
    }
    config.write_text(json.dumps({"endpoints": {PUBLIC_MODEL: endpoint}}))
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "--config", str(config), "--host", HOST,
            "--port", str(port)]  # fmt: skip
    if workers is not None:
        argv += ["--workers", str(workers)]
    env = gateway_environment()
    root = root or (GATEWAY_ROOT[0] if GATEWAY_ROOT else None)
    if root:
        # That checkout's gateway and wire packages, not this one's: no cwd on sys.path.
        env.update(PYTHONSAFEPATH="1", PYTHONPATH=root)
    # Set in the caller's shell, it would put every gateway in multiprocess mode (mmapped
    # metric values): only --multiproc-cost's second gateway runs that way, by `extra_env`.
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(extra_env or {})
    with log_path.open("ab") as log:
        proc = procs.start(argv, env=env, stderr=log, cpus=cpus)
    wait_listening(proc, port, name, 30)
    if workers and workers > 1:
        wait_listeners(proc, port, workers, 30)
    return proc.pid, port


def start_bare(procs: Processes, workdir: Path, backend_port: int, cpus: Any) -> tuple[int, int]:
    port = free_port()
    argv = [sys.executable, str(BARE_PROXY), "--port", str(port),
            "--backend", f"http://{HOST}:{backend_port}"]  # fmt: skip
    # It logs nothing by design; stderr is kept for a traceback, should it die.
    with (workdir / "bare.log").open("ab") as log:
        proc = procs.start(argv, stderr=log, cpus=cpus)
    wait_listening(proc, port, "bare proxy", 20)
    return proc.pid, port


def wait_listeners(proc: subprocess.Popen[bytes], port: int, count: int, timeout: float) -> None:
    """Until `count` sockets listen on `port`: with SO_REUSEPORT each worker has its own, and
    the kernel sends connections only to the ones already listening."""
    wanted = f"{socket.htonl(0x7F000001):08X}:{port:04X}".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with status {proc.returncode}")
        with open("/proc/net/tcp", "rb") as f:
            # Local address, then state 0A = LISTEN.
            listening = sum(
                1 for line in f if line.split()[1] == wanted and line.split()[3] == b"0A"
            )
        if listening >= count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{count} gateway workers not listening on {port} after {timeout:g} s")


def gateway_has_workers() -> bool:
    shown = subprocess.run(
        [sys.executable, "-m", "gateway", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return "--workers" in shown.stdout


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def alternating(reps: int, items: tuple[str, ...]) -> Iterator[tuple[int, tuple[str, ...]]]:
    """A B C, then C B A, ...: no target always runs right after the same one."""
    for rep in range(reps):
        yield rep, items if rep % 2 == 0 else tuple(reversed(items))


def measure(
    bench: Bench, proxies: dict[str, Proxy], progress: Callable[[str], None]
) -> dict[str, Any]:
    """Every target in `proxies` (in TARGETS' order), alternated rep by rep."""
    args = bench.args
    targets = tuple(proxies)
    held = tuple(name for name in targets if name != "direct")
    per_rep: list[dict[str, dict[str, float]]] = []
    holds: dict[str, list[HoldResult]] = {name: [] for name in held}
    for name in targets:
        check_target(proxies[name], args.timeout)
        # Warm-up: connection pools, first-request imports, the allocator's arenas.
        for stream in (False, True):
            bench.run_wrk(proxies[name], stream=stream, connections=args.connections, seconds=1)
    for rep, order in alternating(args.repeat, targets):
        figures: dict[str, dict[str, float]] = {name: {} for name in targets}
        if not args.paced_only:
            measure_wrk(bench, proxies, rep, order, figures, progress)
        for events in args.paced_events:
            for name in order:
                progress(
                    f"rep {rep + 1}/{args.repeat}: {name}, {args.paced_streams} paced streams of "
                    f"{events} events {1e3 * args.paced_interval:g} ms apart"
                )
                run = run_async(
                    paced_streams(
                        proxies[name], bench.backend_pid, args.paced_streams, events,
                        args.paced_interval, args.paced_seconds, args.paced_warmup, args.timeout,
                    )
                )  # fmt: skip
                bench.errors.update({f"{name} paced: {k}": v for k, v in run.errors.items()})
                paced = paced_figures(run)
                if name == "direct":  # no proxy: no proxy CPU
                    for key in ("cpu_us_event", "cpu_us_stream", "busy"):
                        paced[key] = math.nan
                figures[name].update({f"paced{events}_{k}": v for k, v in paced.items()})
        if args.streams and not args.paced_only:
            for name in held if rep % 2 == 0 else tuple(reversed(held)):
                progress(f"rep {rep + 1}/{args.repeat}: {name}, holding {args.streams} streams")
                hold = run_async(
                    hold_streams(
                        proxies[name],
                        proxies["direct"].port,
                        args.streams,
                        hold_seconds=args.hold_seconds,
                        limit_s=args.timeout,
                        settle=2.0,
                        connect_at_once=64,
                    )
                )
                bench.errors.update({f"{name} hold: {k}": v for k, v in hold.errors.items()})
                holds[name].append(hold)
        per_rep.append(figures)
    saturation: dict[str, Any] = {}
    if args.saturation_steps:
        events = max(args.paced_events) if args.paced_events else 200
        for name in held:
            saturation[name] = saturate(
                bench, proxies[name], events, args.paced_interval, args.paced_streams,
                args.paced_seconds, args.saturation_steps, progress,
            )  # fmt: skip
    return {
        "targets": targets,
        "per_rep": per_rep,
        "holds": holds,
        "paced_events": list(args.paced_events),
        "paced_streams": args.paced_streams,
        "paced_interval": args.paced_interval,
        "saturation": saturation,
    }


def measure_wrk(
    bench: Bench,
    proxies: dict[str, Proxy],
    rep: int,
    order: tuple[str, ...],
    figures: dict[str, dict[str, float]],
    progress: Callable[[str], None],
) -> None:
    """One rep's wrk rows (requests and back-to-back streams at c=connections, c=1 latency)."""
    args = bench.args
    for name in order:
        progress(f"rep {rep + 1}/{args.repeat}: {name}, requests c={args.connections}")
        run = bench.run_wrk(
            proxies[name], stream=False, connections=args.connections, seconds=args.duration
        )
        figures[name].update(
            rps=run.rate,
            cpu_us_request=run.proxy_us() if name != "direct" else math.nan,
            backend_us_request=run.backend_us(),
            busy_request=run.proxy_cpu_s / run.seconds if name != "direct" else math.nan,
            wrk_us_request=1e6 * run.wrk_cpu_s / max(run.requests, 1),
        )
    for name in order:
        progress(f"rep {rep + 1}/{args.repeat}: {name}, streams c={args.connections}")
        run = bench.run_wrk(
            proxies[name], stream=True, connections=args.connections, seconds=args.duration
        )
        figures[name].update(
            streams_per_s=run.rate,
            cpu_us_stream=run.proxy_us() if name != "direct" else math.nan,
            backend_us_stream=run.backend_us(),
            busy_stream=run.proxy_cpu_s / run.seconds if name != "direct" else math.nan,
        )
    for name in order:
        progress(f"rep {rep + 1}/{args.repeat}: {name}, latency c=1")
        run = bench.run_wrk(
            proxies[name], stream=False, connections=1, seconds=args.latency_duration
        )
        figures[name].update(p50_ms=run.p50_ms, p99_ms=run.p99_ms)
        figures[name].update(stream_latency(proxies[name], args.latency_duration, args.timeout))


def measure_workers(
    bench: Bench, workdir: Path, backend_port: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Throughput of `--workers 1` against `--workers 2`, neither pinned (wrk gets 2 threads),
    alternated like the main targets."""
    args = bench.args
    all_cpus = os.sched_getaffinity(0) | (bench.client_cpus or set())
    os.sched_setaffinity(bench.backend_pid, all_cpus)
    keys = ("rps", "sps", "cpu_us_request", "cpu_us_stream", "busy_request", "busy_stream")
    rates: dict[int, dict[str, list[float]]] = {1: {k: [] for k in keys}, 2: {k: [] for k in keys}}
    gateways: dict[int, Proxy] = {}
    try:
        # Both run from the start (an idle gateway costs nothing measurable), so that each is
        # started and warmed up once.
        for workers in (1, 2):
            name = f"gateway-w{workers}"
            pid, port = start_gateway(
                bench.procs, workdir, backend_port, workdir / f"{name}.log", None, workers, name
            )
            gateways[workers] = Proxy(name, port, pid, PUBLIC_MODEL, CLIENT_KEY, workdir)
            check_target(gateways[workers], args.timeout)
            for stream in (False, True):
                bench.run_wrk(
                    gateways[workers], stream=stream, connections=args.connections, seconds=1,
                    threads=2, pinned=False,
                )  # fmt: skip
        for rep, order in alternating(args.repeat, ("1", "2")):
            for stream, key, kind in ((False, "rps", "request"), (True, "sps", "stream")):
                for text in order:
                    workers = int(text)
                    progress(
                        f"rep {rep + 1}/{args.repeat}: gateway --workers {workers}, unpinned, "
                        f"{kind}s c={args.connections}"
                    )
                    run = bench.run_wrk(
                        gateways[workers], stream=stream, connections=args.connections,
                        seconds=args.duration, threads=2, pinned=False,
                    )  # fmt: skip
                    rates[workers][key].append(run.rate)
                    rates[workers][f"cpu_us_{kind}"].append(run.proxy_us())
                    rates[workers][f"busy_{kind}"].append(run.proxy_cpu_s / run.seconds)
    finally:
        for proxy in gateways.values():
            assert proxy.pid is not None
            bench.procs.stop_tree(proxy.pid)
        if bench.client_cpus:
            os.sched_setaffinity(bench.backend_pid, bench.client_cpus)
    return {
        **{key: {w: median(r[key]) for w, r in rates.items()} for key in keys},
        **{
            f"{key}_scaling": median(
                [ratio(two, one) for one, two in zip(rates[1][key], rates[2][key], strict=True)]
            )
            for key in ("rps", "sps")
        },
        "raw": rates,
    }


COMPARED_KEYS = ("cpu_us_request", "cpu_us_stream", "rps", "sps")


def compare_gateways(
    bench: Bench,
    workdir: Path,
    backend_port: int,
    cpus: set[int] | None,
    progress: Callable[[str], None],
    modes: dict[str, dict[str, str] | None],
) -> tuple[dict[str, Any], dict[str, Proxy]]:
    """One gateway process per mode (its extra environment), pinned like the main targets and
    alternated, so that the difference is the cost of the mode alone. The figures are medians,
    and the ratios (second mode / first) the median of each rep's ratio. The gateways are
    returned still running, for the caller to read, and stopped by `bench.procs`."""
    args = bench.args
    raw: dict[str, dict[str, list[float]]] = {m: {k: [] for k in COMPARED_KEYS} for m in modes}
    gateways: dict[str, Proxy] = {}
    for mode, extra_env in modes.items():
        name = f"gateway-{mode}"
        pid, port = start_gateway(
            bench.procs, workdir, backend_port, workdir / f"{name}.log", cpus,
            name=name, extra_env=extra_env,
        )  # fmt: skip
        gateways[mode] = Proxy(name, port, pid, PUBLIC_MODEL, CLIENT_KEY, workdir)
        check_target(gateways[mode], args.timeout)
        for stream in (False, True):
            bench.run_wrk(gateways[mode], stream=stream, connections=args.connections, seconds=1)
    for rep, order in alternating(args.repeat, tuple(modes)):
        for stream, kind, rate in ((False, "request", "rps"), (True, "stream", "sps")):
            for mode in order:
                progress(
                    f"rep {rep + 1}/{args.repeat}: gateway, {mode}, {kind}s c={args.connections}"
                )
                run = bench.run_wrk(
                    gateways[mode], stream=stream, connections=args.connections,
                    seconds=args.duration,
                )  # fmt: skip
                raw[mode][f"cpu_us_{kind}"].append(run.proxy_us())
                raw[mode][rate].append(run.rate)
    first, second = modes
    figures = {
        **{key: {mode: median(raw[mode][key]) for mode in modes} for key in COMPARED_KEYS},
        **{
            f"{key}_ratio": median(
                [ratio(b, a) for a, b in zip(raw[first][key], raw[second][key], strict=True)]
            )
            for key in COMPARED_KEYS
        },
        "modes": list(modes),
        "raw": raw,
    }
    return figures, gateways


def _stop(bench: Bench, gateways: dict[str, Proxy]) -> None:
    for proxy in gateways.values():
        assert proxy.pid is not None
        bench.procs.stop_tree(proxy.pid)


def measure_multiproc(
    bench: Bench,
    workdir: Path,
    backend_port: int,
    cpus: set[int] | None,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """One gateway process as usual against one with PROMETHEUS_MULTIPROC_DIR set (an empty
    folder): prometheus_client then keeps every value in an mmapped file, as under
    `--workers N`, without a second worker competing for the cores."""
    metrics_dir = workdir / "prometheus-multiproc"
    metrics_dir.mkdir()
    modes = {"single": None, "multiproc": {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}}
    figures, gateways = compare_gateways(bench, workdir, backend_port, cpus, progress, modes)
    _stop(bench, gateways)
    return {**figures, "files": sorted(path.name for path in metrics_dir.iterdir())}


def measure_tracing(
    bench: Bench,
    workdir: Path,
    backend_port: int,
    cpus: set[int] | None,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """The gateway with tracing off (no OTLP endpoint: the default) against on, with the
    always-on sampler and the SDK's batch exporter sending to an OTLP/HTTP sink on the
    backend's core (`--serve-otlp-sink`), which answers every batch and counts it."""
    sink_port = free_port()
    sink = bench.procs.start(
        [sys.executable, str(Path(__file__).resolve()), "--serve-otlp-sink", str(sink_port)],
        cpus=bench.client_cpus,
    )
    wait_listening(sink, sink_port, "OTLP sink", 20)
    tracing = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{HOST}:{sink_port}",
        "OTEL_TRACES_SAMPLER": "always_on",
    }
    figures, gateways = compare_gateways(
        bench, workdir, backend_port, cpus, progress, {"off": None, "on": tracing}
    )
    try:
        metrics = _get(gateways["on"].port, "/metrics").decode()
        dropped = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("gateway_trace_spans_dropped_total")
        )
    finally:
        _stop(bench, gateways)  # flushes what the tracing gateway still held
    received = json.loads(_get(sink_port, "/stats"))
    bench.procs.stop_tree(sink.pid)
    return {**figures, "spans_dropped": dropped, "sink": received}


def _get(port: int, path: str) -> bytes:
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.split(b"\r\n\r\n", 1)[1]


async def serve_otlp_sink(port: int) -> None:
    """An OTLP/HTTP trace endpoint that accepts every batch unread beyond its size: the cost
    measured is the gateway's, not a collector's. GET /stats: batches and bytes received."""
    from aiohttp import web

    stats = {"batches": 0, "bytes": 0}

    async def traces(request: web.Request) -> web.Response:
        stats["batches"] += 1
        stats["bytes"] += len(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def report(request: web.Request) -> web.Response:
        return web.json_response(stats)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", report)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port, reuse_address=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def profile_gateway(
    bench: Bench,
    proxy: Proxy,
    path: Path,
    progress: Callable[[str], None],
    paced: bool = False,
    stream: bool = False,
) -> dict[str, Any] | None:
    """py-spy on the gateway during one more non-stream run at c=connections (`stream`: of
    back-to-back streams; `paced`: one more paced phase of the longest streams). The collapsed
    stacks it writes (`--format raw`) open in speedscope.app or flamegraph.pl as they are."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("--profile: py-spy not found (.venv/bin/pip install py-spy)", file=sys.stderr)
        return None
    assert proxy.pid is not None
    args = bench.args
    seconds = args.duration if not paced else math.ceil(args.paced_seconds)
    events = max(args.paced_events) if args.paced_events else 200
    load = (
        f"{args.paced_streams} paced streams of {events} events"
        if paced
        else f"{'streams' if stream else 'requests'} c={args.connections}"
    )
    progress(f"profiling the gateway for {seconds} s ({load})")
    spy = bench.procs.start(
        [py_spy, "record", "--pid", str(proxy.pid), "--duration", str(seconds + 1),
         "--rate", "250", "--nonblocking", "--format", "raw", "--subprocesses",
         "--output", str(path)],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(0.5)  # let it attach
    if paced:
        paced_run = run_async(
            paced_streams(proxy, bench.backend_pid, args.paced_streams, events,
                          args.paced_interval, seconds, 0.0, args.timeout)
        )  # fmt: skip
        rate = paced_run.tokens_per_s
    else:
        wrk = bench.run_wrk(proxy, stream=stream, connections=args.connections, seconds=seconds)
        rate = wrk.rate
    try:
        _, err = spy.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if not path.exists():
        print(f"--profile: py-spy failed: {err.decode()[-500:]}", file=sys.stderr)
        return None
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = other_threads = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        # Only the event loop's thread. The config watcher's thread waits in Rust code
        # (watchfiles) that py-spy counts as active: a third of all samples, but 0.01 s of CPU
        # in /proc/<pid>/task/<tid>/stat.
        frames = stack.split(";")
        if frames[0].startswith("process "):  # --subprocesses names the process first
            frames = frames[1:]
        if not frames or frames[0].startswith("Thread._bootstrap "):
            other_threads += int(count_text)
            continue
        # `func (file:line)` -> `func (file)`: a function's samples together, whatever line.
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in frames]
        count = int(count_text)
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    share = max(total, 1) / 100
    return {
        "path": str(path),
        "seconds": seconds,
        "samples": total,
        "other_thread_samples": other_threads,
        "load": load,
        "rps_while_profiled": rate,
        "own_percent": {k: round(v / share, 1) for k, v in own.most_common(15)},
        "inclusive_percent": {k: round(v / share, 1) for k, v in inclusive.most_common(25)},
    }


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

ROWS = (
    # key, label, digits
    ("cpu_us_request", "proxy CPU per request, c=C (µs)", 0),
    ("cpu_us_stream", "proxy CPU per 20-event stream, c=C (µs)", 0),
    ("rps", "requests/s, c=C", 0),
    ("streams_per_s", "streams/s, c=C", 0),
    ("p50_ms", "latency p50, c=1 (ms)", 3),
    ("p99_ms", "latency p99, c=1 (ms)", 3),
    ("ttfb_p50_ms", "stream first event p50, c=1 (ms)", 3),
    ("ttfb_p99_ms", "stream first event p99, c=1 (ms)", 3),
    ("stream_p50_ms", "stream complete p50, c=1 (ms)", 3),
    ("busy_request", "proxy busy cores, requests c=C", 2),
    ("busy_stream", "proxy busy cores, streams c=C", 2),
    ("backend_us_request", "backend CPU per request (µs)", 0),
    ("backend_us_stream", "backend CPU per stream (µs)", 0),
    ("wrk_us_request", "wrk CPU per request (µs)", 0),
)
ADDED = (
    ("p50_ms", "added latency p50, c=1 (ms)", "added_p50_ms"),
    ("p99_ms", "added latency p99, c=1 (ms)", "added_p99_ms"),
    ("ttfb_p50_ms", "added first event p50, c=1 (ms)", None),
)


def paced_rows(
    events_list: list[int], streams: int, interval: float
) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, str | None]]]:
    """The paced phases' rows (issue #17), one block per stream length, and their added
    latencies (the proxy's figure minus direct's, per rep)."""
    rows: list[tuple[str, str, int]] = []
    added: list[tuple[str, str, str | None]] = []
    del streams, interval  # in the report's header line
    for events in events_list:
        k, shape = f"paced{events}_", f"{events}-ev paced"
        rows += [
            (k + "cpu_us_event", f"proxy CPU per event, {shape} (µs)", 1),
            (k + "cpu_us_stream", f"proxy CPU per {shape} stream (µs)", 0),
            (k + "tokens_per_s", f"events/s, {shape}", 0),
            (k + "busy", f"proxy busy cores, {shape}", 2),
            (k + "latency_p50_ms", f"event latency p50, {shape} (ms)", 3),
            (k + "latency_p99_ms", f"event latency p99, {shape} (ms)", 3),
            (k + "ttfe_p50_ms", f"first event p50, {shape} (ms)", 3),
            (k + "client_core", f"backend + client core, {shape}", 2),
        ]
        added += [
            (k + "latency_p50_ms", f"added event latency p50, {shape} (ms)", None),
            (k + "latency_p99_ms", f"added event latency p99, {shape} (ms)", None),
            (k + "ttfe_p50_ms", f"added first event p50, {shape} (ms)", None),
        ]
    return rows, added


def summarize(measured: dict[str, Any]) -> dict[str, Any]:
    """Medians per target; ratios and added latency per rep first (a rep's targets ran back to
    back, so they saw the same neighbours), then their median."""
    per_rep, targets = measured["per_rep"], measured["targets"]
    extra_rows, extra_added = paced_rows(
        measured["paced_events"], measured["paced_streams"], measured["paced_interval"]
    )
    measured_keys = set(per_rep[0][targets[0]])
    rows = [row for row in (*ROWS, *extra_rows) if row[0] in measured_keys]
    added_rows = [row for row in (*ADDED, *extra_added) if row[0] in measured_keys]
    table: dict[str, dict[str, float]] = {}
    for key, _, _ in rows:
        row = {name: median([rep[name][key] for rep in per_rep]) for name in targets}
        for top, bottom in RATIOS:
            if top in targets and bottom in targets:
                row[f"{top}/{bottom}"] = median(
                    [ratio(rep[top][key], rep[bottom][key]) for rep in per_rep]
                )
        table[key] = row
    added: dict[str, dict[str, float]] = {}
    for key, _, _ in added_rows:
        added[key] = {
            name: median([rep[name][key] - rep["direct"][key] for rep in per_rep])
            for name in targets
            if name != "direct"
        }
    holds: dict[str, dict[str, Any]] = {}
    for name, runs in measured["holds"].items():
        if not runs:
            continue
        holds[name] = {
            "rss_before_first_mib": runs[0].rss_before_kib / MIB,
            "rss_all_open_mib": median([r.rss_all_open_kib / MIB for r in runs]),
            "rss_held_mib": median([r.rss_held_kib / MIB for r in runs]),
            "peak_open": median([float(r.peak_open) for r in runs]),
            "rss_peak_mib": median([r.rss_peak_kib / MIB for r in runs]),
            "rss_after_mib": [round(r.rss_after_kib / MIB, 1) for r in runs],
            "all_open_after_s": median([r.all_open_after_s for r in runs]),
            "completed": [r.completed for r in runs],
            "cpu_us_per_held_stream": median(
                [1e6 * r.proxy_cpu_s / r.streams for r in runs if r.streams]
            ),
        }
    return {
        "table": table,
        "added": added,
        "holds": holds,
        "rows": rows,
        "added_rows": added_rows,
        "saturation": measured["saturation"],
    }


def print_comparison(figures: dict[str, Any], conns: str, ratio_name: str) -> None:
    first, second = figures["modes"]
    print(f"  {'':42}{first:>10}{second:>10}{ratio_name:>10}")
    for key, label, digits in (
        ("cpu_us_request", "gateway CPU per request (µs)", 0),
        ("cpu_us_stream", "gateway CPU per 20-event stream (µs)", 0),
        ("rps", f"requests/s, c={conns}", 0),
        ("sps", f"streams/s, c={conns}", 0),
    ):
        row = figures[key]
        print(
            f"  {label:42}{fmt(row[first], digits):>10}{fmt(row[second], digits):>10}"
            f"{fmt(figures[key + '_ratio'], 2) + 'x':>10}"
        )


def print_saturation(saturation: dict[str, Any], meta: dict[str, Any]) -> None:
    """Each proxy's ramp of paced streams, and the tokens/s where its core was full."""
    if not saturation:
        return
    print()
    print(
        f"  saturation: paced streams of {meta['saturation_events']} events "
        f"{1e3 * meta['paced_interval']:g} ms apart, ramped until the proxy's core is full "
        f"(busy >= {SATURATED_BUSY}), an event's latency p50 passes {LATENCY_BLOWN_MS:g} ms, or "
        f"the client's core is full (>= {CLIENT_CORE_FULL})"
    )
    for name, found in saturation.items():
        steps = ", ".join(
            f"{s['streams']:.0f} streams: {fmt(s['tokens_per_s'], 0)} tok/s at "
            f"{fmt(s['busy'], 2)} core, p50 {fmt(s['latency_p50_ms'], 2)} ms"
            for s in found["ramp"]
        )
        print(
            f"  {name:>8}: {fmt(found['tokens_per_s'], 0)} tokens/s ({found['verdict']}; "
            f"{fmt(found['cpu_us_event'], 1)} µs per event, "
            f"1/that = {fmt(1e6 / found['cpu_us_event'], 0)} tokens/s per core)"
        )
        print(f"            ramp: {steps}")


def print_report(results: dict[str, Any]) -> None:
    meta, summary = results["meta"], results["summary"]
    table, added = summary["table"], summary["added"]
    targets = meta["targets"]
    held = [name for name in targets if name != "direct"]
    ratios = [f"{t}/{b}" for t, b in RATIOS if t in targets and b in targets]
    order = " ".join("ABCDE"[: len(targets)])
    conns = str(meta["connections"])
    print()
    print(
        f"proxy bench {meta['date']}  commit {meta['commit']}  {meta['cpus']} CPUs ({meta['cpu']})"
    )
    print(f"  {meta['placement']}")
    print(
        f"  {meta['repeat']} reps (targets alternated: {order}, {order[::-1]}, ...), "
        f"wrk {meta['duration']} s per run at c={conns}, {meta['latency_duration']} s at c=1; "
        "medians of the reps"
    )
    print(f"  {meta['wrk']}; {meta['nginx']} (access log {meta['nginx_access_log']})")
    print("  other work on the machine moves the absolute figures: compare the ratios")
    if meta.get("paced_events"):
        print(
            f"  paced (issue #17): {meta['paced_streams']} streams at once, events "
            f"{1e3 * meta['paced_interval']:g} ms apart (lengths {meta['paced_events']}), "
            f"{meta['paced_seconds']:g} s windows; event latency = arrival - the backend's "
            "send stamp; CPU per stream = CPU per event x its events"
        )
    if "bare" in targets:
        print("  bare: bench/bare_proxy.py, aiohttp + uvloop with nothing else (issue #7's floor)")
    print()
    head = "".join(f"{name:>10}" for name in targets)
    head += "".join(f"{name.replace('gateway', 'gw'):>11}" for name in ratios)
    print(f"  {'':42}{head}  #7 goal (gateway)")
    for key, label, digits in summary["rows"]:
        row = table[key]
        cells = "".join(f"{fmt(row[name], digits):>10}" for name in targets)
        for name in ratios:
            value = fmt(row[name], 2)
            cells += f"{value + ('x' if value != '-' else ''):>11}"
        label = label.replace("c=C", "c=" + conns)
        # rstrip: rows without a goal would end in spaces, which pasted tables keep.
        print(f"  {label:42}{cells}  {goal(key, row['gateway'])}".rstrip())
    for key, label, _ in summary["added_rows"]:
        cells = f"{'':>10}" + "".join(f"{fmt(added[key][name], 3):>10}" for name in held)
        cells += " " * 11 * len(ratios)
        print(f"  {label:42}{cells}  {goal('added_' + key, added[key]['gateway'])}".rstrip())
    print_saturation(summary["saturation"], meta)
    holds = summary["holds"]
    if holds:
        print()
        streams = meta["streams"]
        print(
            f"  {streams} streams open at once (one event per second each), held "
            f"{meta['hold_seconds']} s once all are open, then ended by the backend; "
            "RSS of the proxy's processes (MiB)"
        )
        print(f"  {'':42}{'':10}" + "".join(f"{name:>10}" for name in held))

        def line(label: str, key: str, digits: int = 1) -> None:
            cells = "".join(f"{fmt(holds.get(n, {}).get(key), digits):>10}" for n in held)
            print(f"  {label:42}{'':10}{cells}")

        line("before the first hold", "rss_before_first_mib")
        line(f"all {streams} open", "rss_all_open_mib")
        line(f"all open, {meta['hold_seconds']} s later", "rss_held_mib")
        line("peak while holding", "rss_peak_mib")
        line("most open at once", "peak_open", 0)
        line("all open after (s)", "all_open_after_s", 2)
        line("CPU per held stream (µs)", "cpu_us_per_held_stream", 0)
        for name in held:
            if name in holds:
                after = holds[name]["rss_after_mib"]
                done = "/".join(str(c) for c in holds[name]["completed"])
                print(
                    f"  {name} 2 s after each hold ended: {', '.join(f'{v:.1f}' for v in after)}"
                    f" (growth {after[-1] - after[0]:+.1f} from first to last;"
                    f" completed {done})"
                )
        if "gateway" in holds:
            held_mb = holds["gateway"]["rss_all_open_mib"] * 1.048576
            print(
                f"  #7 goal (gateway): <= 150 MB with 2000 held, no growth after; "
                f"{held_mb:.0f} MB with {streams} held: {goal('hold_rss_mb', held_mb)}"
            )
    workers = results.get("workers")
    print()
    if workers is None:
        print(f"  --workers: {meta['workers_note']}")
    else:
        print(
            "  gateway --workers 1 vs --workers 2, nothing pinned: gateway, backend and wrk -t2 "
            "share all the cores"
        )
        print(f"  {'':42}{'1 worker':>10}{'2 workers':>10}{'2w/1w':>10}  #7 goal")
        for key, label, digits in (
            ("rps", f"requests/s, c={conns}", 0),
            ("sps", f"streams/s, c={conns}", 0),
            ("cpu_us_request", "gateway CPU per request (µs)", 0),
            ("cpu_us_stream", "gateway CPU per stream (µs)", 0),
            ("busy_request", "gateway busy cores, requests", 2),
            ("busy_stream", "gateway busy cores, streams", 2),
        ):
            one, two = workers[key][1], workers[key][2]
            scaling = workers.get(f"{key}_scaling", ratio(two, one))
            verdict = goal("scaling", scaling) if key in ("rps", "sps") else ""
            print(
                f"  {label:42}{fmt(one, digits):>10}{fmt(two, digits):>10}"
                f"{fmt(scaling, 2) + 'x':>10}  {verdict}"
            )
    multiproc = results.get("multiproc")
    if multiproc is not None:
        print()
        print(
            "  one gateway process, prometheus_client as usual vs PROMETHEUS_MULTIPROC_DIR set "
            "(mmapped values, as --workers N); pinned as above"
        )
        print_comparison(multiproc, conns, "mp/single")
        print(f"  multiprocess files written: {len(multiproc['files'])}")
    tracing = results.get("tracing")
    if tracing is not None:
        print()
        print(
            "  one gateway process, tracing off (no OTLP endpoint) vs on (always_on sampler, "
            "batch exporter to an OTLP/HTTP sink); pinned as above"
        )
        print_comparison(tracing, conns, "on/off")
        sink = tracing["sink"]
        print(
            f"  OTLP batches received: {sink['batches']} ({sink['bytes'] / 1e6:.1f} MB); "
            f"spans dropped: {tracing['spans_dropped']:.0f}"
        )
    errors = results["errors"]
    print()
    print(f"  errors: {sum(errors.values()) or 'none'}")
    for text, count in list(errors.items())[:8]:
        print(f"    {count} x {text}")
    for key in ("profile", "profile_stream", "profile_paced"):
        profile = results.get(key)
        if not profile:
            continue
        print()
        unit = {"profile_paced": "events/s", "profile_stream": "streams/s"}.get(key, "req/s")
        print(
            f"  py-spy, gateway under {profile['load']} for {profile['seconds']} s "
            f"({fmt(profile['rps_while_profiled'], 0)} {unit} while sampled); "
            f"stacks in {profile['path']}"
        )
        print(
            f"  top functions by own time, event loop thread ({profile['samples']} samples; "
            f"{profile['other_thread_samples']} in other threads left out):"
        )
        for frame, percent in profile["own_percent"].items():
            print(f"    {percent:5.1f}%  {frame}")
        print("  inclusive (the stack passes through it):")
        for frame, percent in profile["inclusive_percent"].items():
            print(f"    {percent:5.1f}%  {frame}")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="repetitions, alternated (3)")
    parser.add_argument("--duration", type=int, default=5, help="s per wrk run at c=64 (5)")
    parser.add_argument("--latency-duration", type=int, default=2, help="s per c=1 run (2)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--streams", type=int, default=2000, help="streams held (2000; 0 skips)")
    parser.add_argument("--hold-seconds", type=int, default=5, help="s held, all open (5)")
    parser.add_argument("--timeout", type=float, default=15.0, help="client timeout, s (15)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 rep, 2 s runs, 500 held streams, 2 s paced windows, 3 saturation steps",
    )
    parser.add_argument(
        "--paced-streams", type=int, default=256, help="paced streams at once (256)"
    )
    parser.add_argument(
        "--paced-events",
        default="20,200",
        help="events per paced stream, comma-separated: one phase each (20,200; '' skips)",
    )
    parser.add_argument(
        "--paced-interval", type=float, default=0.02, help="s between paced events (0.02)"
    )
    parser.add_argument("--paced-seconds", type=float, default=5.0, help="paced window, s (5)")
    parser.add_argument(
        "--paced-warmup", type=float, default=1.0, help="s of paced streams before it (1)"
    )
    parser.add_argument(
        "--saturation-steps",
        type=int,
        default=4,
        help="most ramp steps to find each proxy's saturation point (4; 0 skips)",
    )
    parser.add_argument(
        "--paced-only",
        action="store_true",
        help="only the paced phases and saturation (no wrk rows, holds or --workers)",
    )
    parser.add_argument(
        "--baseline-root",
        metavar="DIR",
        help="also run, as target `baseline`, the gateway of this checkout (before/after)",
    )
    parser.add_argument(
        "--gateway-root",
        metavar="DIR",
        help="run the gateway from this checkout (e.g. `git archive` of another commit)",
    )
    parser.add_argument("--no-pin", action="store_true", help="pin nothing")
    parser.add_argument("--no-workers", action="store_true", help="skip --workers 1 vs 2")
    parser.add_argument("--no-bare", action="store_true", help="skip bench/bare_proxy.py")
    parser.add_argument(
        "--multiproc-cost",
        action="store_true",
        help="also measure the gateway with PROMETHEUS_MULTIPROC_DIR set against without",
    )
    parser.add_argument(
        "--tracing-cost",
        action="store_true",
        help="also measure the gateway with OpenTelemetry tracing on against off",
    )
    parser.add_argument(
        "--nginx-access-log",
        choices=("on", "off"),
        default="on",
        help="nginx's access log (on: a file in the temporary folder)",
    )
    parser.add_argument("--gateway-log", help="keep the gateway's JSON log at this path")
    parser.add_argument("--profile", metavar="PATH", help="py-spy the gateway, stacks to PATH")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--serve-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-otlp-sink", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.duration, args.latency_duration = 1, 2, 1
        args.streams = min(args.streams, 500)
        args.paced_seconds, args.paced_warmup = min(args.paced_seconds, 2.0), 0.5
        args.saturation_steps = min(args.saturation_steps, 3)
    try:
        args.paced_events = [int(n) for n in args.paced_events.split(",") if n.strip()]
    except ValueError:
        parser.error("--paced-events: comma-separated whole numbers")
    if any(n < 1 or n > 10_000 for n in args.paced_events) or args.paced_streams < 1:
        parser.error("--paced-events must be 1 to 10000 and --paced-streams at least 1")
    if args.paced_interval <= 0 or args.paced_seconds <= 0 or args.paced_warmup < 0:
        parser.error("--paced-interval and --paced-seconds must be > 0, --paced-warmup >= 0")
    if args.repeat < 1 or args.connections < 1 or args.duration < 1 or args.latency_duration < 1:
        parser.error("--repeat, --connections and the durations must be at least 1")
    if args.streams < 0 or args.hold_seconds < 1:
        parser.error("--streams must be >= 0 and --hold-seconds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_backend is not None:
        run_async(serve_backend(args.serve_backend))
        return 0
    if args.serve_otlp_sink is not None:
        run_async(serve_otlp_sink(args.serve_otlp_sink))
        return 0
    wrk, nginx = ensure_tools()
    for option in ("gateway_root", "baseline_root"):
        if getattr(args, option):
            root = Path(getattr(args, option)).resolve()
            if not (root / "gateway" / "__main__.py").exists():
                sys.exit(f"proxy_bench: no gateway/__main__.py under {root}")
            setattr(args, option, str(root))
    if args.gateway_root:
        GATEWAY_ROOT[:] = [args.gateway_root]
    signal.signal(signal.SIGTERM, _raise_exit)
    # Even when started with SIGINT ignored (in the background from a script): Ctrl-C or
    # kill -INT must stop the run and its children.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # 2,000 held streams: 2,000 sockets here, 4,000 in a proxy; children inherit the limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(soft, min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted < 3 * args.streams + 200:
        print(f"proxy_bench: only {wanted} file descriptors; --streams lowered", file=sys.stderr)
        args.streams = max(0, (wanted - 200) // 3)

    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    proxy_cpus = {cpus[0]} if pin else None
    client_cpus = {cpus[1]} if pin else None
    placement = (
        f"pinned: proxy under test on core {cpus[0]}; backend, wrk and this script on core "
        f"{cpus[1]}"
        if pin
        else "unpinned"
    )
    started = time.monotonic()
    # At the start: others may commit to the same tree while the bench runs.
    commit = _commit() if not args.gateway_root else f"gateway from {args.gateway_root}"

    def progress(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    gateway_log = Path(args.gateway_log) if args.gateway_log else workdir / "gateway.log"
    try:
        if client_cpus:
            os.sched_setaffinity(0, client_cpus)
        bench = Bench(args, wrk, procs)
        bench.client_cpus = client_cpus
        backend_port = free_port()
        backend = procs.start(
            [sys.executable, str(Path(__file__).resolve()), "--serve-backend", str(backend_port)],
            cpus=client_cpus,
        )
        wait_listening(backend, backend_port, "backend", 20)
        bench.backend_pid = backend.pid
        nginx_pid, nginx_port = start_nginx(
            nginx, procs, workdir, backend_port, args.nginx_access_log == "on", proxy_cpus
        )
        gateway_pid, gateway_port = start_gateway(
            procs, workdir, backend_port, gateway_log, proxy_cpus
        )
        proxies = {
            "direct": Proxy("direct", backend_port, None, UPSTREAM_MODEL, BACKEND_KEY, workdir),
            "nginx": Proxy("nginx", nginx_port, nginx_pid, UPSTREAM_MODEL, BACKEND_KEY, workdir),
        }
        if not args.no_bare:
            # It passes the model through, as nginx does: the client asks for the backend's.
            bare_pid, bare_port = start_bare(procs, workdir, backend_port, proxy_cpus)
            proxies["bare"] = Proxy(
                "bare", bare_port, bare_pid, UPSTREAM_MODEL, BACKEND_KEY, workdir
            )
        if args.baseline_root:
            base_pid, base_port = start_gateway(
                procs, workdir, backend_port, workdir / "baseline.log", proxy_cpus,
                name="baseline", root=args.baseline_root,
            )  # fmt: skip
            proxies["baseline"] = Proxy(
                "baseline", base_port, base_pid, PUBLIC_MODEL, CLIENT_KEY, workdir
            )
        proxies["gateway"] = Proxy(
            "gateway", gateway_port, gateway_pid, PUBLIC_MODEL, CLIENT_KEY, workdir
        )
        measured = measure(bench, proxies, progress)
        results: dict[str, Any] = {"summary": summarize(measured)}
        results["per_rep"] = measured["per_rep"]
        results["holds"] = {
            name: [vars(h) | {"errors": dict(h.errors)} for h in runs]
            for name, runs in measured["holds"].items()
        }
        has_workers = gateway_has_workers()
        note = ""
        if args.no_workers or args.paced_only:
            note = "skipped (--no-workers)" if args.no_workers else "skipped (--paced-only)"
        elif not has_workers:
            note = "skipped: this gateway's CLI has no --workers option (python -m gateway --help)"
        else:
            results["workers"] = measure_workers(bench, workdir, backend_port, progress)
        if args.multiproc_cost:
            results["multiproc"] = measure_multiproc(
                bench, workdir, backend_port, proxy_cpus, progress
            )
        if args.tracing_cost:
            results["tracing"] = measure_tracing(bench, workdir, backend_port, proxy_cpus, progress)
        if args.profile:
            path = Path(args.profile).resolve()
            if not args.paced_only:
                results["profile"] = profile_gateway(bench, proxies["gateway"], path, progress)
                results["profile_stream"] = profile_gateway(
                    bench, proxies["gateway"], path.with_name(path.name + ".stream"), progress,
                    stream=True,
                )  # fmt: skip
            if args.paced_events:
                results["profile_paced"] = profile_gateway(
                    bench, proxies["gateway"], path.with_name(path.name + ".paced"), progress,
                    paced=True,
                )  # fmt: skip
        results["errors"] = dict(bench.errors.most_common())
        results["meta"] = {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit,
            "cpus": len(cpus),
            "cpu": _cpu_model(),
            "placement": placement,
            "targets": measured["targets"],
            "python": platform.python_version(),
            "wrk": _version([wrk, "-v"]),
            "nginx": _version([nginx, "-v"]),
            "nginx_access_log": args.nginx_access_log,
            "repeat": args.repeat,
            "duration": args.duration,
            "latency_duration": args.latency_duration,
            "connections": args.connections,
            "streams": args.streams,
            "hold_seconds": args.hold_seconds,
            "workers_note": note,
            "paced_interval": args.paced_interval,
            "paced_events": args.paced_events,
            "paced_streams": args.paced_streams,
            "paced_seconds": args.paced_seconds,
            "saturation_events": max(args.paced_events) if args.paced_events else 200,
            "seconds": round(time.monotonic() - started, 1),
        }
        if args.json:
            print(json.dumps(_no_nan(results), indent=2, default=str))
        else:
            print_report(results)
            print(f"\n  run time {results['meta']['seconds']:.0f} s")
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def _no_nan(value: Any) -> Any:
    """NaN (a figure that does not apply, as direct's proxy CPU) as null: NaN is not JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nan(v) for v in value]
    return value


def _commit() -> str:
    found = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "gateway"], cwd=ROOT, capture_output=True, text=True
    )
    return found.stdout.strip() + (" (gateway/ modified)" if dirty.stdout.strip() else "")


def _version(argv: list[str]) -> str:
    with contextlib.suppress(OSError):
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        text = (out.stdout + out.stderr).strip().splitlines()
        if text:
            return text[0].replace("nginx version: ", "")
    return "?"


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: the children are stopped already (finally)
        print("\nproxy_bench: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `| head`: not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
