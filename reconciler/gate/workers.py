"""Several gate processes on one port, and the supervisor that keeps them running.

One asyncio process is one core: even with the front door (reconciler/gate/frontdoor.py) a
proxied small request costs about 25 µs of CPU, so one gate saturates near 40,000 requests/s
whatever the machine has. With
``gate.workers`` > 1, ``python -m reconciler.gate`` (and so ``ailayer up`` and ``ailayer gate``)
becomes a supervisor of that many workers. Each worker is a whole gate: it follows the same
observed-state file, serves every route and answers from its own view of the state. They all
listen on the one port with SO_REUSEPORT, and the kernel spreads new connections over them.

The supervisor:

* holds the port for its whole run (a socket bound with SO_REUSEPORT that never listens, so it
  gets no connections): with port 0 every worker gets the same port, and a worker's restart
  never frees the port for another program;
* starts the workers and says it listens (the stdout line supervisors parse) once all of them do;
* restarts a worker that died, after a delay that doubles while it keeps dying young;
* on SIGTERM or SIGINT stops them all: SIGTERM (each drains its requests), SIGKILL after
  WORKER_STOP_GRACE_S. A worker also gets SIGTERM from the kernel when the supervisor dies
  (PR_SET_PDEATHSIG), so none outlives it;
* gives the workers a per-run prometheus-client directory under the state dir, so /metrics
  sums their traffic (reconciler/gate/metrics.py); removed when it stops, and one left by a
  supervisor that was killed is removed at the next start.

Per worker, not shared: the in-flight count in /status, the recent switches (/switches; a
restarted worker remembers only what it saw), and the request-body budget.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from reconciler.domain.catalog import Catalog, GateConfig
from reconciler.gate.app import Listening, _url, run
from reconciler.gate.metrics import MULTIPROC_ENV
from reconciler.kit import clock

log = logging.getLogger("ailayer.gate")

# A worker that died is started again after this; the delay doubles each time one dies
# within WORKER_STEADY_S of its start (a worker that cannot start must not spin a core), up to
# WORKER_RESTART_MAX_S.
WORKER_RESTART_MIN_S = 0.5
WORKER_RESTART_MAX_S = 10.0
WORKER_STEADY_S = 30.0
# Every worker must listen within this at start (importing aiohttp and binding takes about a
# second; below `ailayer up`'s own 30 s wait would leave it guessing, so it is the same).
WORKER_START_LIMIT_S = 30.0
# After SIGTERM a worker drains for app.SHUTDOWN_GRACE_S (2 s); past this it is killed. Below
# cli.GATE_STOP_GRACE_S (15 s), so `ailayer up` never has to kill the supervisor.
WORKER_STOP_GRACE_S = 10.0
# The default share: a quarter of the usable cores (the engine's own API server, tokenizer and
# scheduler need CPU too), at least one, at most eight.
CORES_PER_WORKER = 4
MAX_DEFAULT_WORKERS = 8
METRICS_DIR = "gate-metrics"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def usable_cores() -> int:
    """CPUs this process may run on (taskset, cgroup cpusets), not merely the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(cores: int | None = None) -> int:
    n = usable_cores() if cores is None else cores
    return max(1, min(MAX_DEFAULT_WORKERS, n // CORES_PER_WORKER))


def worker_count(gate: GateConfig) -> int:
    return gate.workers if gate.workers is not None else default_workers()


def serve_gate(catalog: Catalog, where: list[str], on_listening: Listening, workers: int | None = None) -> int:
    """The gate as configured: in this process for one worker, else a supervisor of N.

    ``where`` are the arguments that make ``python -m reconciler.gate`` load this catalog.
    """
    count = workers if workers is not None else worker_count(catalog.gate)
    if count <= 1:
        run(catalog, on_listening=on_listening)
        return 0
    return Supervisor(catalog, where, count, on_listening).run()


def _die_with_parent(parent: int) -> Callable[[], None]:
    """For preexec_fn: SIGTERM this child when its parent dies, even if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)

    def arm() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


@dataclass
class _Worker:
    slot: int
    proc: subprocess.Popen[bytes]
    pidfd: int
    ready: int  # read end of the worker's "listening" pipe; -1 once it said so (or closed it)
    started: float


class Supervisor:
    def __init__(self, catalog: Catalog, where: list[str], count: int, on_listening: Listening) -> None:
        self._catalog = catalog
        self._where = where
        self._count = count
        self._on_listening = on_listening
        self._workers: dict[int, _Worker] = {}  # by slot
        self._young_deaths = [0] * count
        self._due: dict[int, float] = {}  # slot -> monotonic time of its restart
        self._stopping = False
        self._sel = selectors.DefaultSelector()
        self._port = 0
        self._metrics = Path()

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        gate = self._catalog.gate
        try:
            holder = self._hold_port(gate.host, gate.port)
        except OSError as exc:
            print(f"ailayer gate: cannot listen on {gate.host}:{gate.port}: {exc}", file=sys.stderr)
            return 1
        self._metrics = self._metrics_dir()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._sel.register(wake_r, selectors.EVENT_READ, None)
        try:
            for slot in range(self._count):
                self._spawn(slot)
            if not self._all_listening():
                return 1
            self._on_listening([_url((gate.host, self._port))])
            log.info("gate: %d workers on port %d (pids %s)", self._count, self._port,
                     ", ".join(str(w.proc.pid) for w in self._workers.values()))
            self._supervise(wake_r)
            return 0
        finally:
            self._stop_all()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self._sel.close()
            for fd in (wake_r, wake_w):
                os.close(fd)
            holder.close()
            shutil.rmtree(self._metrics, ignore_errors=True)

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self._stopping = True

    def _hold_port(self, host: str, port: int) -> socket.socket:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
        self._port = int(sock.getsockname()[1])
        return sock

    def _metrics_dir(self) -> Path:
        base = self._catalog.state_dir / METRICS_DIR
        try:
            base.mkdir(parents=True, exist_ok=True)
            for old in base.iterdir():
                if old.name.isdigit() and not _alive(int(old.name)):
                    shutil.rmtree(old, ignore_errors=True)
            mine = base / str(os.getpid())
            shutil.rmtree(mine, ignore_errors=True)  # a dead run's, by pid reuse
            mine.mkdir()
            return mine
        except OSError as exc:
            log.warning("gate: metrics directory not under %s (%s); using a temporary one", base, exc)
            return Path(tempfile.mkdtemp(prefix="ailayer-gate-metrics-"))

    # ------------------------------------------------------------------ workers

    def _spawn(self, slot: int) -> None:
        ready_r, ready_w = os.pipe()
        argv = [sys.executable, "-m", "reconciler.gate", *self._where, "--worker-port", str(self._port),
                "--ready-fd", str(ready_w)]
        env = {**os.environ, MULTIPROC_ENV: str(self._metrics)}
        try:
            proc = subprocess.Popen(argv, env=env, pass_fds=(ready_w,), preexec_fn=_die_with_parent(os.getpid()))
        finally:
            os.close(ready_w)
        pidfd = os.pidfd_open(proc.pid)
        worker = _Worker(slot, proc, pidfd, ready_r, time.monotonic())
        self._workers[slot] = worker
        self._sel.register(pidfd, selectors.EVENT_READ, ("exit", slot))
        self._sel.register(ready_r, selectors.EVENT_READ, ("ready", slot))

    def _all_listening(self) -> bool:
        """Wait until every worker said it listens; False if one exits first or time runs out."""
        deadline = time.monotonic() + clock.real_seconds(WORKER_START_LIMIT_S)
        while any(w.ready >= 0 for w in self._workers.values()):
            left = deadline - time.monotonic()
            if self._stopping or left <= 0:
                print("ailayer gate: the workers did not all listen in time", file=sys.stderr)
                return False
            for key, _ in self._sel.select(left):
                if key.data is None:
                    os.read(key.fd, 512)  # a signal: _stopping says which
                    continue
                what, slot = key.data
                if what == "exit" or not self._read_ready(self._workers[slot]):
                    code = self._workers[slot].proc.wait()
                    print(f"ailayer gate: worker {slot} exited with {code} before listening", file=sys.stderr)
                    return False
        return True

    def _read_ready(self, worker: _Worker) -> bool:
        """Consume the worker's one-byte 'listening'; False when it closed the pipe without it."""
        said = os.read(worker.ready, 1)
        self._sel.unregister(worker.ready)
        os.close(worker.ready)
        worker.ready = -1
        return bool(said)

    def _supervise(self, wake_r: int) -> None:
        while not self._stopping:
            now = time.monotonic()
            for slot, at in list(self._due.items()):
                if at <= now:
                    del self._due[slot]
                    self._spawn(slot)
                    log.info("gate: worker %d restarted (pid %d)", slot, self._workers[slot].proc.pid)
            timeout = max(0.0, min(self._due.values()) - now) if self._due else None
            for key, _ in self._sel.select(timeout):
                if key.data is None:
                    os.read(wake_r, 512)
                    continue
                what, slot = key.data
                worker = self._workers.get(slot)
                if worker is None:
                    continue
                if what == "ready":
                    self._read_ready(worker)
                elif what == "exit":
                    self._reap(worker)

    def _reap(self, worker: _Worker) -> None:
        code = worker.proc.wait()
        self._forget(worker)
        if self._stopping:
            return
        lived = time.monotonic() - worker.started
        young = self._young_deaths[worker.slot] = (self._young_deaths[worker.slot] + 1
                                                   if lived < clock.real_seconds(WORKER_STEADY_S) else 0)
        delay = min(WORKER_RESTART_MAX_S, WORKER_RESTART_MIN_S * 2 ** max(0, young - 1))
        log.warning("gate: worker %d (pid %d) exited with %s after %.1f s; restarting it in %.1f s",
                    worker.slot, worker.proc.pid, code, lived, delay)
        self._due[worker.slot] = time.monotonic() + clock.real_seconds(delay)

    def _forget(self, worker: _Worker) -> None:
        self._sel.unregister(worker.pidfd)
        os.close(worker.pidfd)
        if worker.ready >= 0:
            self._sel.unregister(worker.ready)
            os.close(worker.ready)
            worker.ready = -1
        self._workers.pop(worker.slot, None)
        mark_process_dead(worker.proc.pid, str(self._metrics))  # type: ignore[no-untyped-call]

    def _stop_all(self) -> None:
        self._stopping = True
        live = list(self._workers.values())
        for worker in live:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.terminate()
        deadline = time.monotonic() + clock.real_seconds(WORKER_STOP_GRACE_S)
        for worker in live:
            try:
                worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
            self._forget(worker)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
