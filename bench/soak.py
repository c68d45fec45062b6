"""Soak the gateway: many concurrent streams through it while its backends fail at random.

Run from the repository root (by hand; it is not a test):

    .venv/bin/python bench/soak.py [--streams 100] [--minutes 2] [--chaos-interval 5]

One run starts three fake OpenAI backends (bench/common.py's, `--serve-backend PORT`, each its own
process) and the real gateway (`python -m gateway`) with the three as one model, `soak`, on
loopback. `--streams` clients then loop for `--minutes`: each starts a streaming chat
completion (20-50 events, 20 ms apart), reads it to the end and classifies it:

- ok: every event, then `data: [DONE]`;
- failed-explicit: an HTTP error status with an OpenAI error body, or an error event in the
  stream (and no `[DONE]` after it);
- hung: the client's own timeout (`--timeout`) ran out first;
- malformed: anything else (a stream that ended without `[DONE]` and without an error event,
  a cut connection, missing events, an error body that is not OpenAI's). A gateway bug.

Meanwhile, every `--chaos-interval` seconds one backend, at random, is killed with SIGKILL
(and restarted on its port 1-4 s later), frozen with SIGSTOP, answers 500 or 503, stalls new
requests (accepts them, sends nothing), stalls its streams mid-way, or cuts them mid-way. The
last four are switched on through the fake backend's `POST /_chaos {"mode": ..., "seconds": N}`.

At the end it prints the four counts and their rates, the gateway's open file descriptors
(with its TCP connections by peer and state) and RSS at start, at the end of the load and after
3 s idle, the backends' in-flight counts from the gateway's `/debug`, a short check that
streams work again once the chaos stops, and the warning and error lines of the gateway's log.
Exit status 1 when any request hung or was malformed, else 0. bench/README.md records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    EVENTS_HEADER,
    HOST,
    INTERVAL_HEADER,
    free_port,
    percentile,
    run_async,
    serve_backend,
)
from gateway_bench import (
    Children,
    _raise_exit,
    gateway_environment,
    memory_kib,
    summarize_log,
    wait_listening,
)

MODEL = "soak"
BACKENDS = 3
EVENTS = (20, 50)  # events per stream, inclusive
EVENT_INTERVAL = 0.02
GATEWAY_CONFIG: dict[str, Any] = {
    "retries": 2,
    "circuitBreaker": {"failures": 3, "cooldown": 5},
    "timeouts": {"connect": 2, "firstByte": 10, "idle": 5},
}
# Chaos on one backend: (action, shortest, longest seconds). "kill": down for that long.
ACTIONS = (
    ("kill", 1.0, 4.0),
    ("freeze", 2.0, 8.0),
    ("500", 2.0, 6.0),
    ("503", 2.0, 6.0),
    ("stall", 2.0, 6.0),
    ("midstream", 2.0, 6.0),
    ("cut", 1.0, 3.0),
)
CLASSES = ("ok", "failed-explicit", "hung", "malformed")
_TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
    "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
    "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Processes: backends that come and go, the gateway, and readings from /proc
# --------------------------------------------------------------------------------------------


class Fleet:
    """The three backends: started, killed, frozen and thawed by the chaos task."""

    def __init__(self, children: Children, ports: list[int]) -> None:
        self.children = children
        self.ports = ports
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * len(ports)
        self.down: set[int] = set()  # killed, waiting for their restart
        self.frozen: set[int] = set()
        atexit.register(self.thaw_all)  # before Children's stop_all (atexit runs LIFO)

    def start(self, i: int) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve-backend"]
        self.procs[i] = self.children.start([*argv, str(self.ports[i])])

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
        self.frozen.discard(i)
        self.down.add(i)

    def freeze(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGSTOP)
            self.frozen.add(i)

    def thaw(self, i: int) -> None:
        proc = self.procs[i]
        if i in self.frozen and proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        self.frozen.discard(i)

    def thaw_all(self) -> None:
        for i in list(self.frozen):
            with contextlib.suppress(OSError):
                self.thaw(i)

    async def restart(self, i: int) -> None:
        if i in self.down:
            self.start(i)
            await wait_port(self.ports[i], 20)
            self.down.discard(i)


async def wait_port(port: int, limit_s: float) -> None:
    async with asyncio.timeout(limit_s):
        while True:
            try:
                _, writer = await asyncio.open_connection(HOST, port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return


def gateway_reading(pid: int, gateway_port: int, backend_ports: list[int]) -> dict[str, Any]:
    """Open fds, RSS, and the gateway's TCP sockets by peer (client/backend) and state."""
    inodes: set[str] = set()
    fds = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        fds += 1
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    sockets: Counter[str] = Counter()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[9] not in inodes:
                    continue
                local, remote = (
                    int(cols[1].rsplit(":", 1)[1], 16),
                    int(cols[2].rsplit(":", 1)[1], 16),
                )
                state = _TCP_STATES.get(cols[3], cols[3])
                if state == "LISTEN":
                    peer = "listen"
                elif local == gateway_port:
                    peer = "client"
                elif remote in backend_ports:
                    peer = "backend"
                else:
                    peer = "other"
                sockets[f"{peer} {state}"] += 1
    return {
        "fds": fds,
        "rss_kib": memory_kib(pid)["VmRSS"],
        "tcp": dict(sorted(sockets.items())),
        "other_fds": fds - sum(sockets.values()),
    }


# --------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # one of CLASSES
    detail: str
    seconds: float
    at: float  # seconds since the load started
    request_id: str = ""


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for o in self.outcomes if o.kind == kind)

    def details(self, kind: str) -> Counter[str]:
        return Counter(o.detail for o in self.outcomes if o.kind == kind)


def _is_openai_error(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("error"), dict)
        and isinstance(obj["error"].get("message"), str)
    )


async def one_stream(session: Any, url: str, limit_s: float, started: float) -> Outcome:
    """One streaming chat completion through the gateway, read to its end and classified."""
    import aiohttp

    count = random.randint(*EVENTS)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": count,
        "stream": True,
    }
    t0 = time.monotonic()
    events = 0
    done = False
    error: dict[str, Any] | None = None
    after_done = 0
    request_id = ""

    def outcome(kind: str, detail: str) -> Outcome:
        return Outcome(kind, detail, time.monotonic() - t0, t0 - started, request_id)

    try:
        async with (
            asyncio.timeout(limit_s),
            session.post(
                url,
                json=body,
                headers={INTERVAL_HEADER: str(EVENT_INTERVAL), EVENTS_HEADER: str(count)},
            ) as resp,
        ):
            request_id = resp.headers.get("X-Request-ID", "")
            if resp.status != 200:
                raw = await resp.content.read(1 << 16)
                try:
                    obj = json.loads(raw)
                except ValueError:
                    obj = None
                if _is_openai_error(obj):
                    return outcome("failed-explicit", f"HTTP {resp.status} {obj['error']['code']}")
                return outcome("malformed", f"HTTP {resp.status} without an OpenAI error body")
            if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                return outcome("malformed", f"200 with Content-Type {resp.content_type}")
            try:
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if done:
                        after_done += 1
                    elif data == b"[DONE]":
                        done = True
                    else:
                        obj = json.loads(data)
                        if _is_openai_error(obj):
                            error = obj["error"]
                        elif error is None:
                            events += 1
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                if error is not None:
                    return outcome("failed-explicit", f"error event {error.get('code')}, then cut")
                return outcome(
                    "malformed", f"connection cut ({exc.__class__.__name__}) without error event"
                )
    except TimeoutError:
        where = "before the response headers" if not request_id else "while streaming"
        return outcome("hung", f"client timeout {limit_s:g} s {where}")
    except aiohttp.ClientError as exc:
        return outcome("malformed", f"gateway connection failed: {exc.__class__.__name__}")
    except ValueError:
        return outcome("malformed", "an event that is not JSON")
    if error is not None:
        if done:
            return outcome("malformed", f"error event {error.get('code')} followed by [DONE]")
        return outcome("failed-explicit", f"error event {error.get('code')}")
    if not done:
        return outcome("malformed", "stream ended without [DONE] and without an error event")
    if events != count or after_done:
        return outcome("malformed", f"[DONE] after {events}/{count} events (+{after_done} after)")
    return outcome("ok", "")


async def client_loop(
    session: Any, url: str, limit_s: float, started: float, deadline: float, tally: Tally
) -> None:
    while time.monotonic() < deadline:
        tally.outcomes.append(await one_stream(session, url, limit_s, started))


# --------------------------------------------------------------------------------------------
# Chaos
# --------------------------------------------------------------------------------------------


@dataclass
class ChaosLog:
    actions: list[tuple[float, int, str, float]] = field(default_factory=list)
    control_failures: int = 0


async def chaos_loop(
    fleet: Fleet,
    session: Any,
    interval: float,
    actions: list[tuple[str, float, float]],
    started: float,
    log: ChaosLog,
) -> None:
    import aiohttp

    pending: set[asyncio.Task[None]] = set()

    async def later(seconds: float, what: Any) -> None:
        await asyncio.sleep(seconds)
        result = what()
        if asyncio.iscoroutine(result):
            await result

    try:
        while True:
            await asyncio.sleep(interval)
            up = [i for i in range(len(fleet.ports)) if i not in fleet.down | fleet.frozen]
            if not up:
                continue
            i = random.choice(up)
            action, low, high = random.choice(actions)
            seconds = round(random.uniform(low, high), 1)
            log.actions.append((time.monotonic() - started, i, action, seconds))
            if action == "kill":
                fleet.kill(i)
                task = asyncio.create_task(later(seconds, lambda i=i: fleet.restart(i)))
            elif action == "freeze":
                fleet.freeze(i)
                task = asyncio.create_task(later(seconds, lambda i=i: fleet.thaw(i)))
            else:
                try:
                    async with session.post(
                        f"http://{HOST}:{fleet.ports[i]}/_chaos",
                        json={"mode": action, "seconds": seconds},
                        timeout=aiohttp.ClientTimeout(total=2),
                    ) as resp:
                        resp.raise_for_status()
                except (aiohttp.ClientError, TimeoutError):
                    log.control_failures += 1
                continue
            pending.add(task)
            task.add_done_callback(pending.discard)
    finally:
        for task in pending:
            task.cancel()
        fleet.thaw_all()
        for i in list(fleet.down):
            await fleet.restart(i)
        for port in fleet.ports:  # every backend back to normal
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.post(
                    f"http://{HOST}:{port}/_chaos",
                    json={"mode": "ok", "seconds": 0},
                    timeout=aiohttp.ClientTimeout(total=5),
                ):
                    pass


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


async def soak(
    args: argparse.Namespace, fleet: Fleet, gateway_pid: int, gateway_port: int
) -> dict[str, Any]:
    import aiohttp

    def reading() -> dict[str, Any]:
        return gateway_reading(gateway_pid, gateway_port, fleet.ports)

    url = f"http://{HOST}:{gateway_port}/v1/chat/completions"
    readings = {"start": reading()}
    tally = Tally()
    chaos = ChaosLog()
    control = aiohttp.ClientSession()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        started = time.monotonic()
        deadline = started + args.minutes * 60
        chaos_task = asyncio.create_task(
            chaos_loop(fleet, control, args.chaos_interval, args.actions, started, chaos)
        )
        clients = [
            asyncio.create_task(client_loop(session, url, args.timeout, started, deadline, tally))
            for _ in range(args.streams)
        ]
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        chaos_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await chaos_task
        await asyncio.gather(*clients)  # each ends its last request: bounded by --timeout
        load_seconds = time.monotonic() - started
        readings["end of load"] = reading()
    finally:
        await session.close()
    await asyncio.sleep(3)
    readings["after 3 s idle"] = reading()

    # The gateway's own view of its backends: nothing may still be counted in flight.
    debug_url = f"http://{HOST}:{gateway_port}/debug"
    async with control.get(debug_url) as resp:
        debug = await resp.json()
    backends_after = [b["live"] for b in debug["config"]["endpoints"][MODEL]["backends"]]

    # Once every backend has rested (cooldown), streams must work again.
    cooldown = float(GATEWAY_CONFIG["circuitBreaker"]["cooldown"])
    await asyncio.sleep(cooldown + 0.5)
    check = Tally()
    async with aiohttp.ClientSession() as fresh:
        check.outcomes = list(
            await asyncio.gather(
                *(one_stream(fresh, url, args.timeout, time.monotonic()) for _ in range(20))
            )
        )
    await control.close()
    return {
        "tally": tally,
        "check": check,
        "chaos": chaos,
        "readings": readings,
        "load_seconds": load_seconds,
        "backends_after": backends_after,
    }


def log_details(path: Path) -> dict[str, Any]:
    """What summarize_log leaves out: access lines' error kinds, and the first problem lines."""
    errors: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    examples: list[str] = []
    with path.open("rb") as f:
        for raw in f:
            try:
                entry = json.loads(raw)
            except ValueError:
                if len(examples) < 8:
                    examples.append(raw.decode("utf-8", "replace").rstrip()[:300])
                continue
            if entry.get("event") == "request":
                if entry.get("error"):
                    errors[f"{entry.get('status')} {entry['error']}"] += 1
                for kind in entry.get("failures") or ():
                    failures[kind] += 1
            if entry.get("level") in ("error", "critical") and len(examples) < 8:
                examples.append(raw.decode("utf-8", "replace").rstrip()[:300])
    return {"errors": errors, "failures": failures, "examples": examples}


def print_report(args: argparse.Namespace, result: dict[str, Any], log_path: Path) -> int:
    tally: Tally = result["tally"]
    check: Tally = result["check"]
    total = len(tally.outcomes)
    seconds = result["load_seconds"]
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"gateway soak {date}: {args.streams} streams for {args.minutes:g} min "
        f"({seconds:.1f} s with the drain), {BACKENDS} backends, chaos every "
        f"{args.chaos_interval:g} s, client timeout {args.timeout:g} s, {os.cpu_count()} CPU(s)"
    )
    print(f"\n  requests {total:,} ({total / seconds:.1f}/s)")
    for kind in CLASSES:
        n = tally.count(kind)
        durations = [o.seconds for o in tally.outcomes if o.kind == kind]
        timing = (
            f"   time p50 {statistics.median(durations):.2f} s, p99 "
            f"{percentile(durations, 99):.2f} s, max {max(durations):.2f} s"
            if durations
            else ""
        )
        print(
            f"  {kind:<16}{n:>8,}  {100 * n / max(total, 1):6.2f} %  {n / seconds:7.2f}/s{timing}"
        )
        if kind != "ok":
            for detail, m in tally.details(kind).most_common(12):
                print(f"      {m:>7,}  {detail}")
    bad = [o for o in tally.outcomes if o.kind in ("hung", "malformed")]
    for o in bad[:10]:
        print(
            f"    e.g. at {o.at:6.1f} s, {o.seconds:.2f} s: {o.kind}, {o.detail} [{o.request_id}]"
        )

    chaos: ChaosLog = result["chaos"]
    counts = Counter(action for _, _, action, _ in chaos.actions)
    print(
        f"\n  chaos: {len(chaos.actions)} actions "
        + ", ".join(f"{a} {counts[a]}" for a, _, _ in ACTIONS)
        + (f"; {chaos.control_failures} control calls failed" if chaos.control_failures else "")
    )
    timeline = ", ".join(f"{t:.0f}s b{i} {a} {s:g}s" for t, i, a, s in chaos.actions)
    print(f"    {timeline}")

    print("\n  gateway                   fds   RSS MiB  TCP sockets (peer state: count)")
    for name, r in result["readings"].items():
        tcp = ", ".join(f"{k}: {v}" for k, v in r["tcp"].items())
        mib = r["rss_kib"] / 1024
        print(f"    {name:<20}{r['fds']:>7}  {mib:8.1f}  {tcp}; other fds {r['other_fds']}")
    in_flight = [b.get("inFlight") for b in result["backends_after"]]
    print(f"  backends in flight after idle (/debug): {in_flight}")
    ejections = [b.get("ejections") for b in result["backends_after"]]
    print(f"  ejections per backend (/debug): {ejections}")
    check_counts = {k: check.count(k) for k in CLASSES if check.count(k)}
    print(f"  after the chaos, 20 streams on a rested gateway: {check_counts}")
    for detail, m in Counter(
        f"{o.kind}: {o.detail}" for o in check.outcomes if o.kind != "ok"
    ).most_common(5):
        print(f"      {m:>7,}  {detail}")

    summary = summarize_log(log_path)
    details = log_details(log_path)
    levels = Counter()
    for problem, n in summary["problems"].items():
        levels[problem.split(":", 1)[0]] += n
    print(
        f"\n  gateway log: {summary['lines']:,} lines, statuses {summary['statuses']}, "
        f"warning lines {levels['warning']}, error lines {levels['error'] + levels['critical']}"
        + (f", non-JSON lines {levels['non-JSON line']}" if levels["non-JSON line"] else "")
    )
    for problem, n in sorted(summary["problems"].items(), key=lambda kv: -kv[1]):
        print(f"      {n:>7,}  {problem}")
    if details["errors"]:
        print("    access lines with an error (status kind): " + ", ".join(
            f"{k} {v}" for k, v in details["errors"].most_common()))  # fmt: skip
    if details["failures"]:
        print("    failed attempts (retried or not): " + ", ".join(
            f"{k} {v}" for k, v in details["failures"].most_common()))  # fmt: skip
    for line in details["examples"]:
        print(f"    | {line}")

    suspect = len(bad) + check.count("hung") + check.count("malformed")
    if any(in_flight):
        print(f"\n  SUSPECT: backends still counted in flight after idle: {in_flight}")
    print(f"\n  verdict: {'FAIL' if suspect else 'PASS'} ({suspect} hung or malformed)")
    return 1 if suspect else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100, help="concurrent streams (100)")
    parser.add_argument("--minutes", type=float, default=2.0, help="length of the load (2)")
    parser.add_argument(
        "--chaos-interval", type=float, default=5.0, help="seconds between failures (5)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=45.0,
        help="client limit per request, s (45: above the gateway's own worst case, "
        "3 attempts x 10 s first byte + a stream + 5 s idle)",
    )
    parser.add_argument(
        "--actions",
        default=",".join(a for a, _, _ in ACTIONS),
        help="the failures to draw from, comma-separated (default: all of them)",
    )
    parser.add_argument("--seed", type=int, help="random seed, to replay a chaos sequence")
    parser.add_argument("--gateway-log", help="keep the gateway's JSON log at this path")
    parser.add_argument("--serve-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.streams < 1 or args.minutes <= 0 or args.chaos_interval <= 0 or args.timeout <= 0:
        parser.error("--streams, --minutes, --chaos-interval and --timeout must be positive")
    known = {a[0]: a for a in ACTIONS}
    names = [name.strip() for name in args.actions.split(",") if name.strip()]
    if not names or any(name not in known for name in names):
        parser.error(f"--actions: a comma-separated list from {', '.join(known)}")
    args.actions = [known[name] for name in names]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_backend is not None:
        run_async(serve_backend(args.serve_backend))
        return 0
    if args.seed is not None:
        random.seed(args.seed)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, _raise_exit)
    # A backstop far above the expected run time: the finally below still stops the children.
    signal.alarm(int(args.minutes * 60 + 2 * args.timeout + 120))

    children = Children()
    fleet = Fleet(children, [free_port() for _ in range(BACKENDS)])
    workdir = Path(tempfile.mkdtemp(prefix="gateway-soak-"))
    log_path = Path(args.gateway_log) if args.gateway_log else workdir / "gateway.log"
    try:
        for i in range(BACKENDS):
            fleet.start(i)
        gateway_port = free_port()
        (workdir / "config").mkdir()  # a folder of its own: the gateway watches it
        config = workdir / "config" / "gateway.json"
        backends = [{"url": f"http://{HOST}:{port}/v1"} for port in fleet.ports]
        endpoint = {"backends": backends, "strategy": "least-busy"}
        config.write_text(json.dumps({"endpoints": {MODEL: endpoint}, **GATEWAY_CONFIG}))
        env = gateway_environment()
        with log_path.open("wb") as log_file:
            gateway = children.start(
                [sys.executable, "-m", "gateway", "--config", str(config), "--host", HOST,
                 "--port", str(gateway_port)],
                env=env,
                stderr=log_file,
            )  # fmt: skip
        for i, port in enumerate(fleet.ports):
            proc = fleet.procs[i]
            assert proc is not None
            wait_listening(proc, port, f"backend {i}", 20)
        wait_listening(gateway, gateway_port, "gateway", 20)
        result = run_async(soak(args, fleet, gateway.pid, gateway_port))
        return print_report(args, result, log_path)
    finally:
        signal.alarm(0)
        fleet.thaw_all()
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `| head`: not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
