"""docs/OWNERSHIP.md on the real process table: bystanders, another user, two installs side by
side, forged cookies and a port squatter, in both identity modes.

Other users' processes run as ``nobody`` through the system Python, which ``nobody`` can
execute (the project's venv may live under /root). The stray patterns are real-shaped but
scoped to this test (a program path in its own temp dir, a title with the test's id), so no
other run on the machine can match them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from reconciler.act import cgroups
from reconciler.kit.freeport import free_port
from reconciler.loop import namespace_of
from tests.helpers import PY, Stack, demo_engine, kill_all, port_bound, port_listening, wait_until

pytestmark = pytest.mark.integration

NOBODY = 65534
IN_CI = os.environ.get("CI") == "true"
MODES = ["cgroup", "record"]


def _other_user_python() -> str | None:
    for candidate in ("/usr/bin/python3", sys.executable):
        if os.path.exists(candidate) and all(
            os.stat(parent).st_mode & stat.S_IXOTH for parent in Path(candidate).resolve().parents
        ):
            return candidate
    return None


OTHER_PY = _other_user_python()


def _require(mode: str | None = None) -> None:
    """Root (to run processes as another user) and, for cgroup mode, a cgroup v2 hierarchy."""
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root to run processes as another user")
    if OTHER_PY is None:
        problems.append("no Python that user nobody can execute")
    if mode == "cgroup" and cgroups.cgroup2_mount() is None:
        problems.append("no cgroup v2 hierarchy")
    if problems:
        if IN_CI:
            pytest.fail("; ".join(problems))
        pytest.skip("; ".join(problems))


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder other users can read: the bystanders' programs and scripts live here."""
    path = Path(tempfile.mkdtemp(prefix="ailayer-own-"))
    path.chmod(0o755)
    (path / "serve").write_text(SERVE_SCRIPT)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# Run as ``<fake program> serve [PORT]``: sleeps, holding PORT bound and listening if given, and
# prints one line per accepted connection (a squatter that counts the prompts it would get).
SERVE_SCRIPT = """
import socket, sys, time
if len(sys.argv) > 1:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
    print("listening", flush=True)
    while True:
        c, _ = s.accept(); print("accepted", flush=True); c.close()
time.sleep(600)
"""


def copy_of(program: str, directory: Path, *args: str, user: int | None = None) -> subprocess.Popen[str]:
    """A process whose argv is exactly ``program serve ARGS`` (a real-looking stray copy)."""
    python = OTHER_PY if user is not None else PY
    assert python is not None
    return subprocess.Popen([program, "serve", *args], executable=python, cwd=directory, user=user,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)


def pretend(argv: list[str], user: int | None = None) -> subprocess.Popen[str]:
    """A sleeping process with exactly ``argv`` (a Python -c underneath, argv[0] as given)."""
    python = OTHER_PY if user is not None else PY
    assert python is not None
    return subprocess.Popen([argv[0], "-c", "import time; time.sleep(600)", *argv[1:]], executable=python,
                            user=user, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)


def stack_for(root: Path, mode: str, engines: dict[str, dict[str, Any]], **top: Any) -> Stack:
    root.mkdir(parents=True, exist_ok=True)
    return Stack(root, engines, top={"identity": {"mode": mode}, **top})


def heartbeats(stack: Stack, count: int) -> None:
    """Wait until the reconciler has written ``count`` more passes (its heartbeat moved)."""
    seen: set[str] = set()

    def moved() -> bool:
        beat = stack.status().get("reconciler", {}).get("heartbeat")
        if beat:
            seen.add(beat)
        return len(seen) > count

    wait_until(f"{count} more reconciler passes", moved)


def dead(procs: list[subprocess.Popen[Any]]) -> list[int]:
    return [p.pid for p in procs if p.poll() is not None]


def stop_stack(stack: Stack) -> None:
    stack.toggle(None)
    stack.wait_phase("IDLE")
    stack.stop()


@pytest.mark.parametrize("mode", MODES)
def test_bystanders_and_another_users_copies_survive_idle_switch_and_ready(
        tmp_path: Path, shared_dir: Path, mode: str) -> None:
    _require(mode)
    program = str(shared_dir / "bin" / "vllm")
    title = f"AILTEST{uuid.uuid4().hex[:6]}::EngineCore"
    vllm = demo_engine("vllm", free_port(), strays={"argv": [[program, "serve"]], "titles": [title]})
    ollama_port = free_port()
    stack = stack_for(tmp_path, mode, {"gpt-oss": vllm, "gemma2": demo_engine("ollama", ollama_port)})
    (shared_dir / "vllm serve.log").write_text("")
    phrase = f"{program} serve"
    bystanders: list[subprocess.Popen[Any]] = [  # tail's pipe is bytes, the others' text
        subprocess.Popen(["tail", "-f", str(shared_dir / "vllm serve.log")], stdout=subprocess.DEVNULL),
        subprocess.Popen(["grep", phrase], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True),
        pretend(["git", "commit", "-m", f"fix {phrase} flags"]),
        pretend(["ssh", "gpu2", program, "serve"]),
        pretend(["tmux", "new", "-s", phrase]),
        pretend(["man", "vllm.entrypoints"]),
        pretend([phrase]),  # a program whose name has the phrase in it
        pretend([f"{title}Dump"]),  # a title that only starts alike
        pretend(["bash", "-c", phrase], user=NOBODY),
    ]
    copies = [copy_of(program, shared_dir, user=NOBODY),  # another user's real-looking copy
              copy_of(program, shared_dir)]  # root's copy, on no port of ours
    squatter: subprocess.Popen[str] | None = None
    everyone = bystanders + copies
    try:
        stack.start()
        stack.toggle(None)
        doc = wait_until("both copies reported as strays", lambda: _strays(stack, {c.pid for c in copies}))
        assert all("does not hold the wanted engine's port" in s["why"] for s in doc), doc
        heartbeats(stack, 2)
        assert dead(everyone) == [], "IDLE killed a bystander"

        stack.toggle("gpt-oss")
        stack.wait_phase("READY", "gpt-oss")
        heartbeats(stack, 2)
        assert dead(everyone) == [], "READY killed a bystander"

        # Another user's copy on the port we switch to: named, waited for, never killed.
        squatter = copy_of(program.replace("vllm", "ollama"), shared_dir, str(ollama_port), user=NOBODY)
        assert squatter.stdout is not None and squatter.stdout.readline().strip() == "listening"
        stack.toggle("gemma2")
        waiting = stack.wait_phase("WAITING_PORT")
        assert [(h["pid"], h["uid"]) for h in waiting["port_holders"]] == [(squatter.pid, NOBODY)]
        heartbeats(stack, 2)
        assert dead([*everyone, squatter]) == [], "mid-switch killed a bystander or the other user's holder"
        squatter.kill()
        squatter.wait()
        stack.wait_phase("READY", "gemma2")
        assert dead(everyone) == []
        stop_stack(stack)
        assert dead(everyone) == []
    finally:
        for proc in [*everyone, *([squatter] if squatter else [])]:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        stack.stop()


def _strays(stack: Stack, pids: set[int]) -> list[dict[str, Any]] | None:
    found = [s for s in stack.status().get("strays", []) if set(s["pids"]) & pids]
    return found if {p for s in found for p in s["pids"]} >= pids else None


@pytest.mark.parametrize("mode", MODES)
def test_two_installs_side_by_side_never_touch_each_other(tmp_path: Path, mode: str) -> None:
    _require(mode)
    model = f"shared/model-{uuid.uuid4().hex[:6]}"  # scopes the broad pattern to this test

    def engines() -> dict[str, dict[str, Any]]:
        vllm = demo_engine("vllm", free_port())
        vllm["command"][4] = model
        vllm["served_name"] = model
        # Broad on purpose: the other install's engine matches it, and must still be left alone.
        vllm["strays"] = {"argv": [["{python}", "-m", "reconciler.engines.demo.vllm_like", "serve", model]],
                          "titles": []}
        return {"gpt-oss": vllm, "gemma2": demo_engine("ollama", free_port())}

    a = stack_for(tmp_path / "a", mode, engines())
    b = stack_for(tmp_path / "b", mode, engines())
    try:
        a.start()
        b.start()
        a.toggle("gpt-oss")
        b.toggle("gpt-oss")
        a_pids = sorted(a.wait_phase("READY", "gpt-oss")["engine"]["pids"])
        b.wait_phase("READY", "gpt-oss")
        b.toggle("gemma2")
        b_pids = sorted(b.wait_phase("READY", "gemma2")["engine"]["pids"])
        heartbeats(a, 2)
        assert sorted(a.status()["engine"]["pids"]) == a_pids and all(psutil.pid_exists(p) for p in a_pids)
        assert a.status()["strays"] == [] and b.status()["strays"] == []
        check = a.cli("reconcile", "--check")
        assert "would change" not in check.stdout, check.stdout
        stop_stack(a)
        heartbeats(b, 2)
        assert sorted(b.status()["engine"]["pids"]) == b_pids and all(psutil.pid_exists(p) for p in b_pids)
        stop_stack(b)
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("mode", MODES)
def test_a_forged_cookie_from_another_uid_is_never_adopted_and_never_causes_a_kill(
        tmp_path: Path, mode: str) -> None:
    _require(mode)
    stack = stack_for(tmp_path, mode, {"gpt-oss": demo_engine("vllm", free_port())})
    forgers: list[subprocess.Popen[str]] = []
    try:
        stack.start()
        stack.toggle("gpt-oss")
        ready = stack.wait_phase("READY", "gpt-oss")
        namespace = namespace_of(stack.state_dir)
        future_ms = int((time.time() + 3600) * 1000)
        for instance in (ready["engine"]["instance"], "ffffffff"):
            cookie = f"{namespace}/gpt-oss/{instance}/{future_ms}"
            assert OTHER_PY is not None
            forgers.append(subprocess.Popen(
                [OTHER_PY, "-c", "import time; time.sleep(600)"], user=NOBODY,
                env={"AILAYER_INSTANCE": cookie}, start_new_session=True, text=True))
        # A restarted reconciler is where the old code believed the newest cookie.
        stack.stop(signal.SIGKILL)
        stack.start()
        reported = wait_until("forgers reported", lambda: _strays(stack, {f.pid for f in forgers}))
        assert all("forged" in s["why"] for s in reported), reported
        after = stack.wait_phase("READY", "gpt-oss")
        assert after["engine"]["pid"] == ready["engine"]["pid"]
        assert not {f.pid for f in forgers} & set(after["engine"]["pids"])
        heartbeats(stack, 2)
        assert dead(forgers) == []
        stop_stack(stack)
        assert dead(forgers) == []
    finally:
        for forger in forgers:
            forger.kill()
            forger.wait()
        stack.stop()


@pytest.mark.parametrize("mode", MODES)
def test_a_port_squatter_is_never_proxied_to(tmp_path: Path, shared_dir: Path, mode: str) -> None:
    """vLLM binds before it listens; a squatter that listens first must get no prompt."""
    _require(mode)
    port, gate_port = free_port(), free_port()
    engine = demo_engine("vllm", port, boot_s=3.0)
    stack = stack_for(tmp_path, mode, {"gpt-oss": engine}, gate={"listen": f"127.0.0.1:{gate_port}"})
    gate = subprocess.Popen([PY, "-m", "reconciler", "gate", "--config", str(stack.config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    squatter: subprocess.Popen[str] | None = None
    accepted = 0
    try:
        wait_until("the gate listening", lambda: port_listening(gate_port))
        stack.start()
        stack.toggle("gpt-oss")
        wait_until("the engine's port bound while it loads", lambda: port_bound(port))
        squatter = copy_of(str(shared_dir / "bin" / "squat"), shared_dir, str(port), user=NOBODY)
        assert squatter.stdout is not None and squatter.stdout.readline().strip() == "listening"
        doc = wait_until("the squatter named", lambda: _squatted(stack, squatter))
        assert doc["phase"] in ("LOADING", "FAILED", "WAITING_PORT"), doc["phase"]
        answers = [_gate_status(gate_port) for _ in range(5)]
        heartbeats(stack, 3)
        assert stack.status()["phase"] != "READY"
        assert set(answers) == {503}, answers
    finally:
        if squatter is not None:
            squatter.kill()
            out, _ = squatter.communicate()
            accepted = out.count("accepted")
    assert accepted == 0, f"the squatter got {accepted} connections"
    try:
        stack.wait_phase("READY", "gpt-oss")  # the engine comes back once the squatter is gone
        # The gate follows the state file a few milliseconds behind the reconciler's write.
        wait_until("the gate to proxy to the engine again", lambda: _gate_status(gate_port) == 200)
        stop_stack(stack)
    finally:
        gate.terminate()
        gate.wait()
        stack.stop()


def _squatted(stack: Stack, squatter: subprocess.Popen[str]) -> dict[str, Any] | None:
    doc = stack.status()
    holders = {(h["pid"], h["uid"]) for h in doc.get("port_holders", [])}
    return doc if (squatter.pid, NOBODY) in holders else None


def _gate_status(port: int) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models")
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_leak_check_sees_processes_that_wiped_their_environment() -> None:
    """The session cgroup finds what the environment marker cannot (setproctitle)."""
    from tests.helpers import session_procs

    if os.environ.get("AILAYER_TEST_CGROUP") is None:
        if IN_CI:
            pytest.fail("CI runs as root with cgroup v2: the session cgroup must exist")
        pytest.skip("no session cgroup (not root, or no cgroup v2)")
    child = subprocess.Popen([PY, "-c", "import time; time.sleep(600)"], env={})  # no marker at all
    try:
        assert child.pid in {p.pid for p in session_procs()}
    finally:
        kill_all([psutil.Process(child.pid)])
        child.wait()
