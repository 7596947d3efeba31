"""The operator's commands through the real CLI: down, the banner, systemd readiness,
validate's checks, the real catalog as non-root, and logs' fallback."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from reconciler.kit.freeport import free_port
from tests.helpers import DEADLINE_S, PY, REPO, Stack, demo_engine, port_listening, two_demo_engines, wait_until

pytestmark = pytest.mark.e2e

SCRIPT = Path(PY).parent / "ailayer"
NOBODY = 65534
# One `ailayer` command that must not hang (validate scans the process table once).
COMMAND_TIMEOUT_S = 60.0


def _gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)


def _running(stack: Stack, pid: int) -> None:
    """Wait until the reconciler ``pid`` has written its first state (a toggle is then its)."""
    wait_until(f"reconciler {pid} running", lambda: (stack.status().get("reconciler") or {}).get("pid") == pid)


def _up(stack: Stack, *, env: dict[str, str] | None = None, cwd: Path | None = None,
        program: list[str] | None = None) -> subprocess.Popen[str]:
    """`ailayer up`; its stdout (the activity log) goes to up.out, so no pipe ever fills."""
    with (stack.root / "up.out").open("a") as out:
        return subprocess.Popen([*(program or [PY, "-m", "reconciler"]), "up", "--config", str(stack.config)],
                                stdout=out, stderr=subprocess.PIPE, text=True,
                                cwd=cwd or stack.root, env=env or os.environ.copy())


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path, two_demo_engines(), gate_port=free_port())
    yield s
    s.stop()
    s.cli("down")  # `reconcile` leaves its engines: whatever a test left goes


def test_down_stops_up_and_its_engines(stack: Stack) -> None:
    up = _up(stack)
    try:
        _running(stack, up.pid)
        stack.toggle("gpt-oss")
        pids = stack.wait_phase("READY", "gpt-oss")["engine"]["pids"]
        down = stack.cli("down")
        assert down.returncode == 0, down.stderr
        assert f"reconciler pid {up.pid} stopped; no engine is running" in down.stdout
        assert "still selects gpt-oss" in down.stdout  # and says what the next `up` will do
        assert up.wait(timeout=DEADLINE_S) == 0  # it was stopped, not killed
        assert _gone(pids)
    finally:
        if up.poll() is None:
            up.kill()
        up.communicate(timeout=DEADLINE_S)
    assert "stopping managed engines (ailayer down)" in (stack.root / "up.out").read_text()


def test_down_stops_a_reconcile_that_keeps_its_engines(stack: Stack) -> None:
    """`reconcile` leaves engines running on exit; `down` still converges them to nothing."""
    loop = stack.start()
    _running(stack, loop.pid)
    stack.toggle("gemma2")
    pids = stack.wait_phase("READY", "gemma2")["engine"]["pids"]
    down = stack.cli("down")
    assert down.returncode == 0, down.stderr
    assert loop.wait(timeout=DEADLINE_S) == 0
    assert _gone(pids)
    again = stack.cli("down")  # nothing left to do is fine, and says so
    assert again.returncode == 0 and "no reconciler was running" in again.stdout


def test_down_stops_engines_a_killed_reconciler_left(stack: Stack) -> None:
    loop = stack.start()
    _running(stack, loop.pid)
    stack.toggle("gpt-oss")
    pids = stack.wait_phase("READY", "gpt-oss")["engine"]["pids"]
    loop.kill()
    loop.wait()
    assert not _gone(pids)  # a SIGKILLed reconciler stops nothing
    down = stack.cli("down")
    assert down.returncode == 0, down.stderr
    assert "no reconciler was running; no engine is running" in down.stdout
    assert _gone(pids)
    doc = stack.status()  # the state no longer shows the engine a dead reconciler left
    assert doc.get("engine") is None and "stopped its engines" in doc.get("message", "")


def test_the_banner_commands_work_as_printed(stack: Stack) -> None:
    """From the checkout with the venv not on PATH: `.venv/bin/ailayer …`, with --config."""
    if not SCRIPT.is_file():
        pytest.skip(f"no installed ailayer script at {SCRIPT}")
    bare = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != SCRIPT.parent.resolve())
    env = {**os.environ, "PATH": bare}
    cwd = SCRIPT.parent.parent.parent if SCRIPT.is_relative_to(REPO) else stack.root
    up = _up(stack, env=env, cwd=cwd, program=[str(SCRIPT)])
    assert up.stderr is not None
    banner: dict[str, str] = {}
    try:
        for line in up.stderr:
            label, _, command = line.strip().partition(":  ")
            if command:
                banner[label] = command.strip()
            if label == "stop it":
                break
        toggle = shlex.split(banner["select a model"].split("   (or:")[0])
        if shutil.which("ailayer", path=bare) is None:
            assert toggle[0] != "ailayer"
        assert "--config" in toggle and str(stack.config) in toggle
        done = subprocess.run(toggle, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
        assert done.returncode == 0, done.stderr
        stack.wait_phase("READY", "gemma2")
        watch = subprocess.Popen(shlex.split(banner["follow it"].split("   |")[0]), cwd=cwd, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert watch.stdout is not None and watch.stdout.readline().startswith("phase: READY")
        finally:
            watch.terminate()
            watch.wait(timeout=DEADLINE_S)
        if shutil.which("curl"):
            curl = subprocess.run(shlex.split(banner["then prompt it"]), capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S)
            assert '"choices"' in curl.stdout, curl.stdout
        down = subprocess.run(shlex.split(banner["stop it"].split("or ", 1)[1]), cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        assert down.returncode == 0, down.stderr
        assert up.wait(timeout=DEADLINE_S) == 0
    finally:
        if up.poll() is None:
            up.kill()
        up.communicate(timeout=DEADLINE_S)


def test_up_tells_systemd_it_is_ready_once_the_gate_listens(stack: Stack) -> None:
    """Type=notify: READY=1 only when the gate accepts connections; STOPPING=1 on the way out."""
    assert stack.gate_port is not None
    gate_port = stack.gate_port
    address = stack.root / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(address))
        sock.settimeout(DEADLINE_S)
        up = _up(stack, env={**os.environ, "NOTIFY_SOCKET": str(address)})
        try:
            ready = sock.recv(4096).decode()
            listening_then = port_listening(gate_port)
            assert ready.splitlines()[0] == "READY=1" and listening_then, ready
            children = psutil.Process(up.pid).children(recursive=True)
            assert children and all("NOTIFY_SOCKET" not in c.environ() for c in children)
            up.send_signal(signal.SIGTERM)
            assert sock.recv(4096).decode() == "STOPPING=1"
            assert up.wait(timeout=DEADLINE_S) == 0
        finally:
            if up.poll() is None:
                up.kill()
            up.communicate(timeout=DEADLINE_S)


def test_validate_checks_executables_ports_and_the_token(tmp_path: Path) -> None:
    squatted = free_port()
    engines = {"gpt-oss": demo_engine("vllm", free_port()),
               "gemma2": demo_engine("ollama", squatted)}
    engines["gpt-oss"]["command"] = ["/nonexistent/bin/vllm", "serve", "--port", "{port}"]
    stack = Stack(tmp_path, engines, env={"AILAYER_TOKEN": ""})
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", squatted))
        squatter.listen()
        result = stack.cli("validate", timeout=COMMAND_TIMEOUT_S)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: engine gpt-oss: /nonexistent/bin/vllm is not an executable file"]
    assert f"warning: port {squatted} (engine gemma2) is held by a foreign process pid {os.getpid()}" \
        in result.stderr
    assert "WAITING_PORT" in result.stderr
    assert "warning: no token: $AILAYER_TOKEN is not set" in result.stderr

    engines["gpt-oss"] = demo_engine("vllm", free_port())
    stack.write_catalog()
    stack.env = {"AILAYER_TOKEN": "s3cret"}
    clean = stack.cli("validate", timeout=COMMAND_TIMEOUT_S)
    assert clean.returncode == 0, clean.stderr
    assert "warning" not in clean.stderr and "ports free, token set" in clean.stdout


def _as_nobody() -> list[str]:
    if os.geteuid() != 0:
        return []  # already not root: run as ourselves
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv (util-linux) to drop root")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.mark.parametrize("args", [("up",), ("reconcile", "--once"), ("toggle", "gemma2"), ("down",),
                                  ("validate",), ("logs",)])
def test_the_real_catalog_as_non_root_is_a_clear_line_not_a_traceback(args: tuple[str, ...]) -> None:
    real = REPO / "examples" / "gpt-oss-gemma2.yaml"
    state = Path(yaml.safe_load(real.read_text())["state_dir"])
    if os.access(state.parent if not state.exists() else state, os.W_OK) and os.geteuid() != 0:
        pytest.skip(f"{state} is writable by this user")
    result = subprocess.run([*_as_nobody(), PY, "-m", "reconciler", *args, "--config", str(real)],
                            capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, cwd="/")
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr and "│" not in result.stderr, result.stderr
    said = [line for line in result.stderr.splitlines() if not line.startswith("ailayer: using ")]
    if args[0] == "validate":
        assert said and all(line.startswith(("error: ", "warning: ")) for line in said), said
    else:
        assert len(said) == 1 and said[0].startswith("ailayer: "), said
        assert args[0] == "logs" or "run it as root" in said[0]


@contextlib.contextmanager
def _shared_dir() -> Iterator[Path]:
    """A temp dir another user can enter (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="ailayer-logs-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path)


def test_logs_reads_the_fallback_log_when_the_main_one_is_unreadable() -> None:
    with _shared_dir() as root:
        stack = Stack(root, {"gpt-oss": demo_engine("vllm", free_port())})
        (root / "run").mkdir(mode=0o755)
        stack.log_file.write_text("[t] [ailayer] [1] the old main log\n")
        fallback = root / "run" / "ai_layer_activity.log"
        fallback.write_text("[t] [ailayer] [2] written while the main log was not writable\n")
        fallback.chmod(0o644)
        os.utime(stack.log_file, (time.time() - 60, time.time() - 60))
        newer = stack.cli("logs")  # the reconciler fell back: its file is the newer one
        assert newer.returncode == 0 and "while the main log was not writable" in newer.stdout
        if os.geteuid() == 0:
            stack.log_file.chmod(0o600)  # root's, unreadable to nobody; and make it the newer
            os.utime(stack.log_file, None)
            config = str(stack.config)
            result = subprocess.run([*_as_nobody(), PY, "-m", "reconciler", "logs", "--config", config],
                                    capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, cwd="/")
            assert result.returncode == 0, result.stderr
            assert "while the main log was not writable" in result.stdout
        assert stat.S_IMODE(fallback.stat().st_mode) == 0o644


def test_engines_survive_a_restart_of_up_with_no_stop_on_exit(stack: Stack) -> None:
    """What `systemctl restart ailayer` does with deploy/systemd/ailayer.service (KillMode=process:
    SIGTERM to `up` only): the engine lives on, the next `up` adopts it, `down` stops it."""
    def start() -> subprocess.Popen[str]:
        with (stack.root / "up.out").open("a") as out:
            return subprocess.Popen([PY, "-m", "reconciler", "up", "--config", str(stack.config),
                                     "--no-stop-on-exit"], stdout=out, stderr=subprocess.DEVNULL,
                                    text=True, cwd=stack.root)

    first = start()
    second: subprocess.Popen[str] | None = None
    try:
        _running(stack, first.pid)
        stack.toggle("gpt-oss")
        before = stack.wait_phase("READY", "gpt-oss")["engine"]
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=DEADLINE_S) == 0
        assert not _gone(before["pids"])  # the engine outlived its reconciler
        second = start()
        def kept() -> bool:  # the same engine, READY, reported by the new reconciler
            doc = stack.status()
            return (doc.get("reconciler") or {}).get("pid") == second.pid and doc.get("phase") == "READY" \
                and (doc.get("engine") or {}).get("pid") == before["pid"]

        wait_until("the new reconciler keeping the engine", kept)
        down = stack.cli("down")
        assert down.returncode == 0, down.stderr
        assert second.wait(timeout=DEADLINE_S) == 0 and _gone(before["pids"])
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        stack.cli("down")  # whatever a failure left


def test_a_removed_cgroup_base_is_made_again_at_the_next_spawn(stack: Stack) -> None:
    """A cleanup that rmdirs empty cgroups (one pytest session did it to another's) took the
    install's base from under a running reconciler, and every spawn after failed."""
    loop = stack.start()
    _running(stack, loop.pid)
    identity = stack.status().get("identity") or {}
    if identity.get("mode") != "cgroup":
        pytest.skip(f"not in cgroup mode here: {identity.get('reason')}")
    stack.toggle("gpt-oss")
    cgroup_of = stack.wait_phase("READY", "gpt-oss")["engine"]["instance"]
    stack.toggle(None)
    stack.wait_phase("IDLE")
    base = next(Path(line[3:]) for line in Path(f"/proc/{loop.pid}/cgroup").read_text().splitlines()
                if line.startswith("0::"))
    from reconciler.act import cgroups

    mount = cgroups.cgroup2_mount()
    assert mount is not None
    bases = list((mount / str(base).lstrip("/")).glob("ailayer-*"))
    assert bases and not any((b / cgroup_of).exists() for b in bases)
    for empty in bases:
        empty.rmdir()
    stack.toggle("gemma2")
    stack.wait_phase("READY", "gemma2")
