"""`--workers N`: N gateway processes on one port (SO_REUSEPORT: the kernel spreads the
connections), each with its own event loop and connection pools, under one supervisor.

The supervisor serves nothing itself. It starts the workers, passes SIGHUP (reload) and
SIGTERM/SIGINT (drain, then stop) on to them, starts a new worker when one dies unexpectedly,
and gives them one PROMETHEUS_MULTIPROC_DIR so a scrape of any worker counts all of them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import structlog
from prometheus_client import multiprocess

log = structlog.get_logger("gateway.supervisor")

# A worker that dies sooner than this after starting, twice in a row or more, is restarted
# only after a pause that doubles each time: a broken environment must not become a fork loop.
_HEALTHY_AFTER = 10.0
_MAX_PAUSE = 30.0


class Supervisor:
    def __init__(self, worker_args: list[str], workers: int, drain_timeout: float) -> None:
        self._args = worker_args
        self._count = workers
        self._drain_timeout = drain_timeout
        self._stopping = False
        self._reload = False
        self._processes: dict[int, subprocess.Popen[bytes]] = {}  # worker index -> process
        self._started: dict[int, float] = {}
        self._pause: dict[int, float] = {}
        self._quick_deaths: dict[int, int] = {}
        self._metrics_dir, self._own_dir = _metrics_dir()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
            for index in range(self._count):
                self._spawn(index)
            log.info("supervisor started", workers=self._count, pid=os.getpid())
            while not self._stopping:
                if self._reload:
                    self._reload = False
                    self._signal_all(signal.SIGHUP)
                self._restart_dead()
                time.sleep(0.2)
            return self._stop()
        finally:
            if self._own_dir:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _spawn(self, index: int) -> None:
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir,
            "GATEWAY_WORKER_INDEX": str(index),
            "GATEWAY_SUPERVISOR_PID": str(os.getpid()),
        }
        command = [sys.executable, "-m", "gateway", "serve", *self._args, "--workers", "1"]
        process = subprocess.Popen(command, env=env)
        self._processes[index] = process
        self._started[index] = time.monotonic()
        log.info("worker started", worker=index, pid=process.pid)

    def _restart_dead(self) -> None:
        now = time.monotonic()
        for index, process in list(self._processes.items()):
            code = process.poll()
            if code is None:
                continue
            if index not in self._pause:
                lived = now - self._started[index]
                # Only a worker that keeps dying young is restarted after a growing pause.
                quick = self._quick_deaths.get(index, 0) + 1 if lived < _HEALTHY_AFTER else 0
                self._quick_deaths[index] = quick
                pause = 0.0 if quick <= 1 else min(_MAX_PAUSE, 2.0 ** (quick - 1))
                self._pause[index] = now + pause
                multiprocess.mark_process_dead(process.pid, self._metrics_dir)
                log.warning(
                    "worker died",
                    worker=index,
                    pid=process.pid,
                    exit_code=code,
                    restart_in_s=pause,
                )
            if now >= self._pause[index]:
                del self._pause[index]
                self._spawn(index)

    def _signal_all(self, sig: signal.Signals) -> None:
        for process in self._processes.values():
            if process.poll() is None:
                process.send_signal(sig)

    def _stop(self) -> int:
        """Each worker drains its in-flight requests (GATEWAY_DRAIN_TIMEOUT), then exits."""
        log.info("supervisor stopping", workers=len(self._processes))
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self._drain_timeout + 10.0
        failed = False
        for index, process in self._processes.items():
            try:
                code = process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop in time; killing it", worker=index)
                process.kill()
                code = process.wait()
            failed = failed or code != 0
        log.info("supervisor stopped")
        return 1 if failed else 0

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._reload = True


def _metrics_dir() -> tuple[str, bool]:
    """The operator's PROMETHEUS_MULTIPROC_DIR (emptied: stale files would add up), or a
    fresh temporary one that is removed on exit. Returns (path, whether we created it)."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not given:
        return tempfile.mkdtemp(prefix="gateway-metrics-"), True
    path = Path(given)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    return str(path), False
