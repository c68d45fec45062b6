"""Instructions per request and per stream, counted by callgrind: a before/after that does not
move with the machine's load.

    .venv/bin/python bench/instructions.py                          # bare aiohttp and the gateway
    .venv/bin/python bench/instructions.py --baseline-root DIR      # and another checkout's

The CPU figures of proxy_bench.py move by 10-20 % from run to run on these shared 2-core
machines, which hides a cut of a few percent. valgrind's callgrind counts the instructions a
process executes instead: the same count for the same code and inputs, within about 1 % from
one start to the next (0.1 % within one process), whatever else the machine is doing
(PYTHONHASHSEED is fixed for that). Each proxy runs under
callgrind with instrumentation off (so start-up is fast and not counted); after a warm-up,
instrumentation is switched on for exactly `--requests` non-stream requests, then as many
20-event streams, `--concurrency` at a time, and the totals are read from callgrind's dumps.

What it does not count: the kernel (the recv and send every proxy pays, about a third of a
proxy's CPU here) and cache misses. So the ratio to bare here is the ratio of the proxies'
own user-space work, higher than the ratio of their CPU time in proxy_bench. Needs valgrind
(Debian's package; `make` does not install it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HOST, chat_request_body, free_port
from gateway_bench import (
    BACKEND_KEY,
    PUBLIC_MODEL,
    ROOT,
    UPSTREAM_MODEL,
    Children,
    gateway_environment,
    wait_listening,
)

BARE_PROXY = ROOT / "bench" / "bare_proxy.py"
KINDS = ("request", "stream")


async def drive(port: int, count: int, stream: bool, concurrency: int) -> None:
    """Exactly `count` requests, `concurrency` at a time, each read to its end."""
    body = chat_request_body(PUBLIC_MODEL, stream)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-client"}
    url = f"http://{HOST}:{port}/v1/chat/completions"
    left = count

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"status {response.status}: {await response.text()}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))


def callgrind(pid: int, *command: str) -> None:
    subprocess.run(
        ["callgrind_control", *command, str(pid)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def dumped_total(out: Path, before: set[Path]) -> int:
    """The `totals:` of the dump that appeared since `before`."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = set(out.parent.glob(out.name + ".*")) - before
        for path in new:
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("totals:"):
                    return int(line.split()[1])
        time.sleep(0.1)
    raise RuntimeError(f"no callgrind dump next to {out}")


def measure(
    procs: Children,
    name: str,
    argv: list[str],
    env: dict[str, str],
    workdir: Path,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Instructions per request and per stream of one proxy, run under callgrind."""
    port = free_port()
    out = workdir / f"callgrind-{name}"
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        *argv, "--port", str(port),
    ]  # fmt: skip
    with (workdir / f"{name}.log").open("ab") as log:
        proc = procs.start(command, env={**env, "PYTHONHASHSEED": "0"}, stderr=log)
    wait_listening(proc, port, name, 180)
    asyncio.run(drive(port, args.warmup, False, args.concurrency))
    asyncio.run(drive(port, args.warmup, True, args.concurrency))
    figures = {}
    for kind in KINDS:
        callgrind(proc.pid, "--zero")
        callgrind(proc.pid, "--instr=on")
        asyncio.run(drive(port, args.requests, kind == "stream", args.concurrency))
        callgrind(proc.pid, "--instr=off")
        before = set(workdir.glob(out.name + ".*"))
        callgrind(proc.pid, f"--dump={name}-{kind}")
        figures[kind] = dumped_total(out, before) / args.requests
    proc.terminate()
    proc.wait(timeout=30)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="counted, of each kind (300)")
    parser.add_argument("--warmup", type=int, default=100, help="of each kind, not counted (100)")
    parser.add_argument("--concurrency", type=int, default=8, help="at a time (8)")
    parser.add_argument("--baseline-root", metavar="DIR", help="also the gateway of this checkout")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:K=V,...",
        help="also this gateway with these environment variables (e.g. quiet:LOG_LEVEL=WARNING)",
    )
    parser.add_argument("--serve-backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_backend is not None:
        from common import run_async, serve_backend

        run_async(serve_backend(args.serve_backend))
        return 0
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (apt-get install valgrind)", file=sys.stderr)
            return 2
    procs = Children()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="instructions-") as tmp:
        workdir = Path(tmp)
        backend_port = free_port()
        backend = procs.start([sys.executable, __file__, "--serve-backend", str(backend_port)])
        wait_listening(backend, backend_port, "backend", 20)
        config = workdir / "config" / "gateway.json"
        config.parent.mkdir()
        endpoint = {
            "url": f"http://{HOST}:{backend_port}/v1",
            "apiKey": BACKEND_KEY,
            "actualModelName": UPSTREAM_MODEL,
        }
        config.write_text(json.dumps({"endpoints": {PUBLIC_MODEL: endpoint}}))
        gateway = [sys.executable, "-m", "gateway", "--config", str(config), "--host", HOST]
        targets: list[tuple[str, list[str], dict[str, str]]] = [
            ("bare", [sys.executable, str(BARE_PROXY), "--backend", f"http://{HOST}:{backend_port}"],
             {}),
            ("gateway", gateway, gateway_environment()),
        ]  # fmt: skip
        if args.baseline_root:
            env = {**gateway_environment(), "PYTHONSAFEPATH": "1", "PYTHONPATH": args.baseline_root}
            targets.insert(1, ("baseline", gateway, env))
        for variant in args.variant:
            name, _, settings = variant.partition(":")
            extra = dict(item.split("=", 1) for item in settings.split(",") if item)
            targets.append((name, gateway, {**gateway_environment(), **extra}))
        for name, command, env in targets:
            print(f"  {name} under callgrind ...", file=sys.stderr, flush=True)
            results[name] = measure(procs, name, command, env, workdir, args)
        procs.stop_all()
    print_report(results, args)
    return 0


def print_report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    names = list(results)
    print(
        f"\ninstructions (user space, callgrind) per request and per 20-event stream; "
        f"{args.requests} of each, {args.concurrency} at a time"
    )
    header = "".join(f"{name:>12}" for name in names)
    ratios = [name for name in names if name != "bare"]
    print(f"  {'':10}{header}" + "".join(f"{name + '/bare':>16}" for name in ratios), end="")
    print(f"{'gateway/baseline':>18}" if "baseline" in results else "")
    for kind in KINDS:
        row = "".join(f"{results[name][kind] / 1e6:>11.3f}M" for name in names)
        row += "".join(f"{results[name][kind] / results['bare'][kind]:>15.2f}x" for name in ratios)
        if "baseline" in results:
            row += f"{results['gateway'][kind] / results['baseline'][kind]:>17.3f}x"
        print(f"  {kind:10}{row}")


if __name__ == "__main__":
    sys.exit(main())
