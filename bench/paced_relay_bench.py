"""CPU per paced token event: the gateway with its transport relay, without it, the bare aiohttp
proxy and nginx, in one run.

    flock /work/coord/bench.lock .venv/bin/python bench/paced_relay_bench.py --streams 256 \\
        --events 200 --interval 0.02 --repeat 3

Each rep opens `--streams` streams at once through each target in turn (A B C D, then D C B A),
the fake backend (bench/common.py) sending `--events` events `--interval` s apart, each its own
send(); the figure is the target's CPU (utime + stime from /proc, its whole process tree) over
the run, divided by the events relayed. The targets are pinned to the last core, the backend
and this script's client to the others. The gateway runs as deployed (JSON access log, metrics);
`gateway-slow` is the same gateway with GATEWAY_TRANSPORT_RELAY=off. It prints the medians, the
ratios to bare per rep, and writes them as JSON with `--json PATH`. A benchmark, run by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DONE, EVENTS_HEADER, HOST, INTERVAL_HEADER, free_port, median
from gateway_bench import BACKEND_KEY, PUBLIC_MODEL, UPSTREAM_MODEL
from proxy_bench import (
    CLIENT_KEY,
    Processes,
    Proxy,
    find_nginx,
    start_bare,
    start_gateway,
    start_nginx,
    wait_listening,
)

TARGETS = ("nginx", "bare", "gateway-slow", "gateway")
_TICK = os.sysconf("SC_CLK_TCK")


async def paced_streams(
    proxy: Proxy, streams: int, events: int, interval: float, limit_s: float
) -> tuple[int, int, tuple[float, float]]:
    """`streams` paced streams at once through `proxy`: (events seen, streams complete, the
    proxy's user and system CPU seconds over the run)."""
    request = proxy.raw_request(True, {EVENTS_HEADER: str(events), INTERVAL_HEADER: str(interval)})
    gate = asyncio.Semaphore(64)  # aiohttp listens with a backlog of 128
    seen = complete = 0

    async def one() -> None:
        nonlocal seen, complete
        async with gate:
            reader, writer = await asyncio.open_connection(HOST, proxy.port)
            writer.write(request)
            await reader.readuntil(b"\r\n\r\n")
        try:
            tail = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if not size:
                    await reader.readuntil(b"\r\n")
                    break
                data = (await reader.readexactly(size + 2))[:-2]
                seen += data.count(b"data: ")
                tail = (tail + data)[-64:]
            complete += tail.endswith(DONE)
        finally:
            writer.close()

    pids = proxy.pids()
    before = _user_system(pids)
    async with asyncio.timeout(limit_s):
        await asyncio.gather(*(one() for _ in range(streams)))
    after = _user_system(pids)
    return seen, complete, (after[0] - before[0], after[1] - before[1])


def _user_system(pids: list[int]) -> tuple[float, float]:
    """utime and stime of the processes, in seconds (/proc/<pid>/stat)."""
    user = system = 0.0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11]) / _TICK
            system += int(fields[12]) / _TICK
    return user, system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument(
        "--profile", help="py-spy (raw, --native) of the gateway's first rep, written here"
    )
    parser.add_argument("--serve-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_backend is not None:
        from common import run_async, serve_backend

        run_async(serve_backend(args.serve_backend))
        return 0
    cores = sorted(os.sched_getaffinity(0))
    proxy_cpus, client_cpus = {cores[-1]}, set(cores[:-1]) or {cores[-1]}
    os.sched_setaffinity(0, client_cpus)
    targets = [t for t in args.targets.split(",") if t]
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="paced-relay-bench-"))
    try:
        proxies = _start(procs, workdir, targets, proxy_cpus, client_cpus)
        per_rep: dict[str, list[float]] = {t: [] for t in targets}
        split: dict[str, list[tuple[float, float]]] = {t: [] for t in targets}
        for rep in range(args.repeat):
            order = targets if rep % 2 == 0 else list(reversed(targets))
            for name in order:
                spy = _spy(proxies[name], args) if rep == 0 and name == "gateway" else None
                seen, complete, cpu = asyncio.run(
                    paced_streams(
                        proxies[name], args.streams, args.events, args.interval, limit_s=300
                    )
                )
                if spy is not None:
                    spy.wait()
                if complete != args.streams:
                    print(f"{name}: {args.streams - complete} streams incomplete", file=sys.stderr)
                user, system = (t / max(seen, 1) * 1e6 for t in cpu)
                per_rep[name].append(user + system)
                split[name].append((user, system))
                print(
                    f"rep {rep} {name}: {seen} events, {user + system:.1f} us CPU per event "
                    f"(user {user:.1f}, system {system:.1f})",
                    flush=True,
                )
        _report(per_rep, split, args)
    finally:
        procs.stop_all()
    return 0


def _spy(proxy: Proxy, args: argparse.Namespace) -> subprocess.Popen[bytes] | None:
    if not args.profile:
        return None
    seconds = max(1, int(args.events * args.interval) - 1)
    argv = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(proxy.pid),
            "--duration", str(seconds), "--rate", "250", "--native", "--format", "raw",
            "--output", args.profile]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _start(
    procs: Processes, workdir: Path, targets: list[str], proxy_cpus: set[int], client: set[int]
) -> dict[str, Proxy]:
    backend_port = free_port()
    backend = procs.start(
        [sys.executable, str(Path(__file__).resolve()), "--serve-backend", str(backend_port)],
        cpus=client,
    )
    wait_listening(backend, backend_port, "backend", 20)
    proxies: dict[str, Proxy] = {}
    if "nginx" in targets:
        nginx = find_nginx()
        if nginx is None:
            sys.exit("paced_relay_bench: needs nginx (apt-get install nginx-light)")
        pid, port = start_nginx(nginx, procs, workdir, backend_port, False, proxy_cpus)
        proxies["nginx"] = Proxy("nginx", port, pid, UPSTREAM_MODEL, BACKEND_KEY, workdir)
    if "bare" in targets:
        pid, port = start_bare(procs, workdir, backend_port, proxy_cpus)
        proxies["bare"] = Proxy("bare", port, pid, UPSTREAM_MODEL, BACKEND_KEY, workdir)
    for name, relay in (("gateway", "on"), ("gateway-slow", "off")):
        if name in targets:
            pid, port = start_gateway(
                procs,
                workdir,
                backend_port,
                workdir / f"{name}.log",
                proxy_cpus,
                name=name,
                extra_env={"GATEWAY_TRANSPORT_RELAY": relay},
            )
            proxies[name] = Proxy(name, port, pid, PUBLIC_MODEL, CLIENT_KEY, workdir)
    return proxies


def _report(
    per_rep: dict[str, list[float]],
    split: dict[str, list[tuple[float, float]]],
    args: argparse.Namespace,
) -> None:
    figures: dict[str, Any] = {
        "streams": args.streams,
        "events": args.events,
        "interval_s": args.interval,
        "cpu_us_per_event": {name: median(values) for name, values in per_rep.items()},
        "per_rep": per_rep,
        "user_system_per_rep": split,
        "load": os.getloadavg(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if "bare" in per_rep:
        figures["to_bare"] = {
            name: median([v / b for v, b in zip(values, per_rep["bare"], strict=True)])
            for name, values in per_rep.items()
        }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    sys.exit(main())
