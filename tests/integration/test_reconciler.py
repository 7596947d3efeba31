"""The reconciler against real child processes, real ports and the real process table."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from reconciler.kit.freeport import free_port
from tests.helpers import (
    PY,
    Stack,
    demo_engine,
    engine_procs,
    kill_all,
    port_bound,
    port_listening,
    sampler,
    two_demo_engines,
    wait_until,
)

pytestmark = pytest.mark.integration

# The engines' main processes by module, their workers by the titles real engines give them.
VLLM_MARK = ("reconciler.engines.demo.vllm_like", "VLLM::EngineCore", "VLLM::Worker")
OLLAMA_MARK = ("reconciler.engines.demo.ollama_like", "lib/ollama/llama-server")
LINE = re.compile(r"^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d\] \[([^\]]+)\] \[(\d+|-)\] (.*)$")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Two demo engines on their own free ports; torn down *through the product* (toggle none)."""
    s = Stack(tmp_path, two_demo_engines())
    yield s
    s.tear_down()


def test_idle_without_a_desired_file(stack: Stack) -> None:
    assert not stack.desired.exists()
    result = stack.cli("reconcile", "--once")
    assert result.returncode == 0, result.stderr
    doc = stack.status()
    assert doc["phase"] == "IDLE" and doc["desired_model"] is None and doc["engine"] is None
    assert "no model selected" in doc["message"]
    assert not engine_procs(VLLM_MARK) and not engine_procs(OLLAMA_MARK)


@pytest.mark.parametrize("identity", ["cgroup", "record"])
def test_switch_leaves_no_process_of_the_old_tree_before_the_new_starts(stack: Stack, identity: str) -> None:
    stack.engines["gpt-oss"]["command"].append("--worker-escapes")
    stack.top["identity"] = {"mode": identity}
    stack.write_catalog()
    stack.start()
    stack.toggle("gpt-oss")
    ready = stack.wait_phase("READY", "gpt-oss")
    old = engine_procs(VLLM_MARK)
    sessions = {p.pid: p for p in old}
    titles = sorted(" ".join(p.cmdline()).strip() for p in old if "VLLM::" in " ".join(p.cmdline()))
    assert titles == ["VLLM::EngineCore", "VLLM::Worker"], titles
    assert len({os.getsid(p.pid) for p in sessions.values()}) >= 2, "worker escaped the session"
    assert ready["identity"]["mode"] == identity

    overlaps: list[tuple[int, int]] = []
    done = threading.Event()

    def watch() -> None:
        for vllm_count, ollama_count in sampler((VLLM_MARK, OLLAMA_MARK), done.is_set):
            if vllm_count and ollama_count:
                overlaps.append((vllm_count, ollama_count))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        stack.toggle("gemma2")
        doc = stack.wait_phase("READY", "gemma2")
    finally:
        done.set()
        watcher.join()
    assert overlaps == [], "processes of both engines were alive at the same moment"
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in old)
    assert doc["engine"]["pid"] != ready["engine"]["pid"]
    assert psutil.pid_exists(doc["engine"]["pid"])
    assert any("kill (SIGKILL)" in line for line in stack.output().splitlines())


def test_foreign_port_holder_is_waited_for_never_killed(stack: Stack) -> None:
    port = stack.engines["gpt-oss"]["port"]
    holder = subprocess.Popen([PY, "-c", (
        "import socket,sys\n"
        f"s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"up\n"
    try:
        stack.start()
        stack.wait_phase("IDLE")
        toggled = time.monotonic()
        stack.toggle("gpt-oss")
        doc = stack.wait_phase("WAITING_PORT")
        # The holder accepts connections and never answers: probing it would cost a whole
        # probe timeout (5 s) per pass. It is not our engine, so it is not probed at all.
        assert time.monotonic() - toggled < 3.0
        assert doc["port_holders"][0]["pid"] == holder.pid
        assert str(port) in doc["message"]
        cond = {c["type"]: c for c in doc["conditions"]}
        assert cond["PortAvailable"]["status"] == "False"
        # Stays waiting, and the holder is untouched, across several passes.
        later = wait_until("a later pass", lambda: (d := stack.status())["reconciler"]["heartbeat"]
                           != doc["reconciler"]["heartbeat"] and d)
        assert later["phase"] == "WAITING_PORT" and later["port_holders"][0]["pid"] == holder.pid
        assert holder.poll() is None
        assert not engine_procs(VLLM_MARK)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    released = time.time()
    started = wait_until("engine started", lambda: engine_procs(VLLM_MARK))
    first = min(p.create_time() for p in started)
    assert first - released < 1.0, f"engine started {first - released:.2f} s after the port was freed"
    stack.wait_phase("READY", "gpt-oss")


def test_a_stray_copy_holding_the_wanted_port_is_cleared(stack: Stack) -> None:
    """A copy of the wanted engine, started by hand, still loading (bound, not listening) on
    its port: in the way, not adoptable, so it is killed and ours starts."""
    port = stack.engines["gpt-oss"]["port"]
    head = stack.engines["gpt-oss"]["command"][:stack.engines["gpt-oss"]["command"].index("{port}") + 1]
    argv = [PY if a == "{python}" else a.replace("{host}", "127.0.0.1").replace("{port}", str(port))
            for a in head]
    stray = subprocess.Popen([*argv, "--boot-seconds", "600"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until("stray's port bound", lambda: port_bound(port))
        stray_tree = [stray.pid] + [c.pid for c in psutil.Process(stray.pid).children(recursive=True)]
        stack.toggle("gpt-oss")
        stack.start()
        ready = stack.wait_phase("READY", "gpt-oss")
        wait_until("stray reaped", lambda: stray.poll() is not None)
        assert stray.pid not in ready["engine"]["pids"]
        assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE
                   for p in stray_tree)
    finally:
        if stray.poll() is None:
            kill_all([psutil.Process(stray.pid), *psutil.Process(stray.pid).children(recursive=True)])
        stray.wait()


def test_a_stray_copy_on_another_port_is_reported_not_killed(stack: Stack) -> None:
    """A copy of gpt-oss on its own port gets in nobody's way while gemma2 runs."""
    port = stack.engines["gpt-oss"]["port"]
    stray = subprocess.Popen([PY, "-m", "reconciler.engines.demo.vllm_like", "serve", "openai/gpt-oss-20b", "--host",
                              "127.0.0.1", "--port", str(port), "--boot-seconds", "0.1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until("stray listening", lambda: port_listening(port))
        stack.toggle("gemma2")
        stack.start()
        stack.wait_phase("READY", "gemma2")
        doc = wait_until("the stray reported", lambda: [s for s in stack.status()["strays"]
                                                       if stray.pid in s["pids"]])
        assert doc[0]["model"] == "gpt-oss" and "does not hold the wanted engine's port" in doc[0]["why"]
        assert stray.poll() is None
    finally:
        kill_all([psutil.Process(stray.pid), *psutil.Process(stray.pid).children(recursive=True)])
        stray.wait()


def test_crash_while_loading_backs_off_and_retries(stack: Stack) -> None:
    stack.engines["gpt-oss"]["command"] += ["--fail", "crash-loading"]
    stack.write_catalog()
    stack.start()
    stack.toggle("gpt-oss")
    failed = stack.wait_phase("FAILED")
    assert failed["last_error"]["reason"] == "EngineExited"
    assert "exited with code" in failed["last_error"]["message"], failed["last_error"]
    assert failed["next_retry_at"] is not None and failed["restarts"] == 1
    second = wait_until("the second failure, backing off", lambda: (
        (d := stack.status()).get("restarts") == 2 and d["phase"] == "FAILED" and d))
    assert second["last_error"]["reason"] == "EngineExited"
    assert second["next_retry_at"] > failed["next_retry_at"]


def test_crash_while_ready_is_restarted(stack: Stack) -> None:
    stack.start()
    stack.toggle("gpt-oss")
    first = stack.wait_phase("READY", "gpt-oss")
    victim = first["engine"]["pid"]
    os_kill(victim)
    second = wait_until("restarted engine ready", lambda: (
        (d := stack.status()).get("phase") == "READY" and d["engine"]["pid"] != victim and d))
    assert second["restarts"] == 1  # remembered until it has run healthy for a while
    assert "error EngineExited: main process was killed by signal 9" in stack.output()


def os_kill(pid: int) -> None:
    import os

    os.kill(pid, signal.SIGKILL)


def test_desired_change_mid_boot_aborts_the_boot(stack: Stack) -> None:
    stack.engines["gpt-oss"]["command"][stack.engines["gpt-oss"]["command"].index("--boot-seconds") + 1] = "120"
    stack.write_catalog()
    stack.start()
    stack.toggle("gpt-oss")
    loading = stack.wait_phase("LOADING", "gpt-oss")
    assert loading["boot"]["budget_s"] == 2700
    old = engine_procs(VLLM_MARK)
    t0 = time.monotonic()
    stack.toggle("gemma2")
    stack.wait_phase("READY", "gemma2")
    assert time.monotonic() - t0 < 15
    assert not [p for p in old if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_adopts_a_running_engine_after_reconciler_restart(stack: Stack) -> None:
    stack.start()
    stack.toggle("gemma2")
    first = stack.wait_phase("READY", "gemma2")
    stack.stop(signal.SIGKILL)
    pids_before = sorted(p.pid for p in engine_procs(OLLAMA_MARK))
    stack.start()
    wait_until("new reconciler heartbeat", lambda: stack.status()["reconciler"]["pid"] == stack.proc.pid)  # type: ignore[union-attr]
    doc = stack.wait_phase("READY", "gemma2")
    assert doc["engine"]["pid"] == first["engine"]["pid"]
    assert sorted(p.pid for p in engine_procs(OLLAMA_MARK)) == pids_before
    assert "changed: start" not in stack.output().split("reconciler started")[-1]


def test_once_is_idempotent(stack: Stack) -> None:
    stack.toggle("gpt-oss")
    first = stack.cli("reconcile", "--once")
    assert first.returncode == 2, first.stdout  # started, still loading
    assert "changed=1" in first.stdout
    wait_until("ready via --once", lambda: stack.cli("reconcile", "--once").returncode == 0)
    pids = sorted(p.pid for p in engine_procs(VLLM_MARK))
    again = stack.cli("reconcile", "--once")
    assert again.returncode == 0 and "changed=0" in again.stdout and "ok=1" in again.stdout
    assert sorted(p.pid for p in engine_procs(VLLM_MARK)) == pids
    check = stack.cli("reconcile", "--check")
    assert check.returncode == 0 and "nothing to change" in check.stdout


def test_check_changes_nothing(stack: Stack) -> None:
    stack.toggle("gpt-oss")
    result = stack.cli("reconcile", "--check")
    assert result.returncode == 2
    assert "would change: start gpt-oss" in result.stdout
    assert not engine_procs(VLLM_MARK)
    assert not (stack.state_dir / "observed_state.json").exists()


def test_malformed_files_keep_the_last_good_state(stack: Stack) -> None:
    stack.start()
    stack.toggle("gemma2")
    ready = stack.wait_phase("READY", "gemma2")
    stack.desired.write_text("model: [unclosed\n")
    bad = wait_until("desired error reported", lambda: (d := stack.status()).get("last_error")
                     and d["last_error"]["reason"] == "InvalidDesiredState" and d)
    assert "YAML syntax error" in bad["last_error"]["message"]
    assert str(stack.desired) in bad["last_error"]["message"]
    assert bad["phase"] == "READY" and bad["engine"]["pid"] == ready["engine"]["pid"]
    cond = {c["type"]: c for c in bad["conditions"]}
    assert cond["DesiredValid"]["status"] == "False"

    stack.desired.write_text("model: llama-9000\n")
    unknown = wait_until("unknown model reported", lambda: (d := stack.status()).get("last_error")
                         and d["last_error"]["reason"] == "UnknownModel" and d)
    assert "gemma2" in unknown["last_error"]["message"] and "gpt-oss" in unknown["last_error"]["message"]

    stack.config.write_text("engines: {broken: {command: 'rm -rf /', port: 1}}\n")
    cat = wait_until("catalog error reported", lambda: any(
        c["type"] == "CatalogValid" and c["status"] == "False" for c in stack.status().get("conditions", []))
        and stack.status())
    assert "command" in {c["type"]: c for c in cat["conditions"]}["CatalogValid"]["message"]
    assert cat["phase"] == "READY" and cat["engine"]["pid"] == ready["engine"]["pid"]
    assert stack.proc is not None and stack.proc.poll() is None
    stack.write_catalog()
    stack.toggle("gemma2")
    wait_until("errors clear", lambda: stack.status().get("last_error") is None)


def test_log_lines_reach_terminal_and_file_in_one_format(stack: Stack) -> None:
    stack.start()
    stack.toggle("gpt-oss")
    doc = stack.wait_phase("READY", "gpt-oss")
    pid = doc["engine"]["pid"]
    wait_until("engine lines in the file", lambda: f"[gpt-oss] [{pid}]" in stack.log_file.read_text())
    for source in (stack.output(), stack.log_file.read_text()):
        lines = [line for line in source.splitlines() if line.strip()]
        engine_lines = [m for m in map(LINE.match, lines) if m and m.group(1) == "gpt-oss"]
        own_lines = [m for m in map(LINE.match, lines) if m and m.group(1) == "ailayer"]
        assert engine_lines and own_lines
        assert all(m.group(2) == str(pid) for m in engine_lines)
        assert all(LINE.match(line) for line in lines), [x for x in lines if not LINE.match(x)][:3]
        # carriage-return progress bars became separate lines, with no control bytes left
        assert sum("Loading safetensors" in m.group(3) for m in engine_lines) >= 2
        assert not any("\r" in line or "\x1b" in line for line in lines)
    assert doc["last_log_line"]


def test_file_events_wake_the_loop_for_rename_and_configmap_swap(tmp_path: Path) -> None:
    """With a 60 s resync, only watchdog events can make the loop react within seconds."""
    s = Stack(tmp_path, two_demo_engines(), resync_s=60)
    # Kubernetes' ConfigMap layout: the file is a symlink through "..data" to a timestamped dir.
    def publish(model: str, tag: str) -> None:
        version = tmp_path / f"..{tag}"
        version.mkdir()
        (version / "desired_state.yaml").write_text(f"model: {model}\n")
        (tmp_path / "..data_tmp").symlink_to(version.name)
        (tmp_path / "..data_tmp").rename(tmp_path / "..data")

    publish("gpt-oss", "2026_01")
    s.desired.symlink_to("..data/desired_state.yaml")
    try:
        s.start()
        s.wait_phase("READY", "gpt-oss")
        t0 = time.monotonic()
        publish("gemma2", "2026_02")
        s.wait_phase("READY", "gemma2", limit_s=15)
        assert time.monotonic() - t0 < 15, "a 60 s resync would have been slower"
        s.desired.unlink()
        t1 = time.monotonic()
        s.toggle("gpt-oss")  # the reference writer: temp file + rename
        s.wait_phase("READY", "gpt-oss", limit_s=15)
        assert time.monotonic() - t1 < 15
    finally:
        s.stop()
        s.toggle(None)
        assert s.cli("reconcile", "--once").returncode == 0


def test_a_second_reconciler_on_the_same_state_dir_refuses(stack: Stack) -> None:
    stack.start()
    wait_until("first reconciler running", lambda: stack.status().get("reconciler"))
    second = stack.cli("reconcile", "--once")
    assert second.returncode == 1
    assert "another reconciler" in second.stderr and str(stack.proc.pid) in second.stderr  # type: ignore[union-attr]


def test_a_non_atomic_write_does_not_stop_the_engine(stack: Stack) -> None:
    """`echo model: x > desired_state.yaml` truncates first: an empty instant is not IDLE."""
    stack.start()
    stack.toggle("gemma2")
    ready = stack.wait_phase("READY", "gemma2")
    content = stack.desired.read_text()
    for _ in range(5):
        stack.desired.write_text("")  # what the shell's > does before writing
        stack.desired.write_text(content)
    stack.desired.unlink()
    stack.desired.write_text(content)
    written = datetime.now(UTC)

    def settled() -> dict[str, Any] | None:
        doc = stack.status()
        beat = datetime.fromisoformat(doc["reconciler"]["heartbeat"])
        return doc if (beat - written).total_seconds() > 1.5 else None  # past DESIRED_SETTLE_S

    doc = wait_until("a pass well after the writes", settled)
    assert doc["phase"] == "READY" and doc["engine"]["pid"] == ready["engine"]["pid"]
    # An empty file that stays empty is IDLE, as the contract says.
    stack.desired.write_text("")
    stack.wait_phase("IDLE", None)
    assert "missing or empty" in stack.output()


def test_engines_never_inherit_the_gates_token(stack: Stack) -> None:
    """With the token any engine (or anything it runs) could switch models through /toggle."""
    stack.env["AILAYER_TOKEN"] = "s3cret-token-of-the-gate"
    stack.env["SOME_OTHER_VAR"] = "kept"
    stack.start()
    stack.toggle("gpt-oss")
    doc = stack.wait_phase("READY", "gpt-oss")
    env = psutil.Process(doc["engine"]["pid"]).environ()
    assert "AILAYER_TOKEN" not in env and env.get("SOME_OTHER_VAR") == "kept"


@pytest.mark.parametrize(("model", "first_stage"), [("gpt-oss", "loading checkpoint shards"),
                                                    ("gemma2", "loading model tensors")])
def test_boot_progress_reaches_the_observed_state_while_loading(tmp_path: Path, model: str,
                                                                first_stage: str) -> None:
    """The stand-ins print progress as the real engines do (tqdm bar, llama.cpp dots); the
    observed state carries it as boot.progress while LOADING, and drops it once READY."""
    # Ollama from 0.32.4 holds /api/ps (the readiness check) until the load ends, so a pass
    # waits a probe timeout (5 s) there: longer than this load. 0.32.3 answers at once.
    s = Stack(tmp_path, {"gpt-oss": demo_engine("vllm", free_port(), boot_s=3.0),
                         "gemma2": demo_engine("ollama", free_port(), boot_s=3.0,
                                               args=["--ollama-version", "0.32.3"])})
    seen: list[dict[str, Any]] = []
    try:
        s.start()
        s.toggle(model)

        def ready() -> bool:
            doc = s.status()
            boot = doc.get("boot") or {}
            if doc.get("phase") == "LOADING" and boot.get("progress") and boot["progress"] not in seen:
                seen.append(boot["progress"])
            return doc.get("phase") == "READY"

        wait_until("READY", ready)
        assert s.status()["boot"] is None
    finally:
        s.stop()
        s.toggle(None)
        assert s.cli("reconcile", "--once").returncode == 0
    loads = [p["percent"] for p in seen if p["stage"].startswith(first_stage) and p["percent"] is not None]
    assert len(loads) >= 2, seen  # a 3 s load in steps, followed pass by pass
    assert loads == sorted(loads) and 0 <= loads[0] < loads[-1] <= 100, seen


def test_a_model_chosen_before_a_reboot_is_not_loaded_until_toggled_again(stack: Stack) -> None:
    """A reboot must not start a 35-minute load that nobody asked for."""
    stack.desired.write_text("model: gpt-oss\ngeneration: 4\nboot_id: 00000000-0000-4000-8000-000000000000\n")
    result = stack.cli("reconcile", "--once")
    assert result.returncode == 0, result.stdout + result.stderr  # IDLE is converged
    doc = stack.status()
    assert doc["phase"] == "IDLE" and doc["desired_model"] is None
    assert doc["last_error"]["reason"] == "ChosenBeforeReboot"
    assert "until someone toggles again" in doc["last_error"]["message"]
    assert not engine_procs(VLLM_MARK)
    assert stack.desired.read_text().startswith("model: gpt-oss")  # the file is left alone
    # A hand-written file without a boot id, older than this boot: the same.
    stack.desired.write_text("model: gpt-oss\n")
    os.utime(stack.desired, (psutil.boot_time() - 60, psutil.boot_time() - 60))
    assert stack.cli("reconcile", "--once").returncode == 0
    assert stack.status()["phase"] == "IDLE" and not engine_procs(VLLM_MARK)
    # The admin's opt-in loads it after all.
    stack.top["resume_after_reboot"] = True
    stack.write_catalog()
    assert stack.cli("reconcile", "--once").returncode == 2  # started, loading
    assert stack.status()["desired_model"] == "gpt-oss"


def test_a_toggle_on_this_boot_survives_a_reconciler_restart(stack: Stack) -> None:
    stack.toggle("gpt-oss")
    assert "boot_id:" in stack.desired.read_text()
    stack.start()
    ready = stack.wait_phase("READY", "gpt-oss")
    stack.stop()  # engines keep running
    stack.start()
    again = stack.wait_phase("READY", "gpt-oss")
    assert again["engine"]["pid"] == ready["engine"]["pid"]  # adopted, not restarted
    assert again["reconciler"]["boot_id"] == ready["reconciler"]["boot_id"]
    stack.stop()
