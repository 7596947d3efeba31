"""The demo engines, exercised the way the reconciler meets them: real processes, real ports.

Each test checks one real engine behaviour the stand-ins reproduce (docs/ENGINES.md).

Every engine started here carries a per-test tag in its environment, so the teardown can
find what a test started, orphans included. The tag cannot find everything: vLLM's
EngineCore and Worker set their titles with setproctitle, which wipes their
/proc/PID/environ, exactly as in real vLLM. So every process seen in an engine's tree is
also remembered by pid (psutil guards against pid reuse with the create time), and the
teardown SIGKILLs and waits for those too.

Engines run with ``AILAYER_TIME_SCALE=1`` whatever this process's clock scale is; the
helpers below convert, so deadlines and measured spreads are in wall seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import ollama
import openai
import psutil
import pytest

from reconciler.engines.demo.generation import demo_text
from reconciler.kit import clock
from reconciler.kit.freeport import free_port
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

T = TypeVar("T")
TAG_ENV = "AILAYER_DEMO_TEST_TAG"
DEMO_MARK = "reconciler.engines.demo"
ENGINE_CORE, WORKER = "VLLM::EngineCore", "VLLM::Worker"
TRACKER_MARK = "multiprocessing.resource_tracker"
BOOT_S = 0.5
# A load long enough to look at the engine while it loads, on a slow 2-core CI box.
SLOW_BOOT_S = 3.0
START_TIMEOUT_S = 15.0
MiB = 1024 * 1024


# --------------------------------------------------------------------------- time & polling


def wall() -> float:
    """Wall seconds (differences only), read through the project clock."""
    return clock.monotonic() * clock.real_seconds(1.0)


def refuses(port: int) -> bool:
    """True if nothing listens on the port (connect is refused)."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def get(url: str, timeout: float = 2.0) -> httpx.Response | None:
    """GET, or None when the engine does not answer (refused, reset or timed out)."""
    try:
        return httpx.get(url, timeout=timeout)
    except httpx.TransportError:
        return None


def argv(proc: psutil.Process) -> list[str]:
    """The command line without the empty strings a setproctitle'd argv area ends in."""
    try:
        return [a for a in proc.cmdline() if a]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def cmdline(proc: psutil.Process) -> str:
    return " ".join(argv(proc))


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def raw_environ(proc: psutil.Process) -> bytes:
    return Path(f"/proc/{proc.pid}/environ").read_bytes()


def titled(title: str) -> Callable[[psutil.Process], bool]:
    """Processes whose whole command line is ``title`` (set with setproctitle)."""
    return lambda proc: argv(proc) == [title]


def program(name: str) -> Callable[[psutil.Process], bool]:
    """Processes whose argv[0] basename is ``name``."""
    return lambda proc: bool(argv(proc)) and os.path.basename(argv(proc)[0]) == name


def marked(marker: str) -> Callable[[psutil.Process], bool]:
    return lambda proc: marker in cmdline(proc)


# --------------------------------------------------------------------------- engines


@dataclass
class Engine:
    """One started engine process and where it listens."""

    proc: subprocess.Popen[bytes]
    port: int
    out: Path
    err: Path
    owner: Engines

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        return self.out.read_bytes().decode(errors="replace")

    def stderr(self) -> str:
        return self.err.read_bytes().decode(errors="replace")

    def tree(self) -> list[psutil.Process]:
        """Live descendants, each remembered so the teardown finds it even once orphaned."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        live = [k for k in kids if alive(k)]
        self.owner.remember(live)
        return live

    def children(self, which: Callable[[psutil.Process], bool]) -> list[psutil.Process]:
        return [k for k in self.tree() if which(k)]

    def worker(self, which: Callable[[psutil.Process], bool], what: str) -> psutil.Process:
        """The one child ``which`` picks out, once it is the only one.

        A child forked from a titled process carries its title until it execs (the
        EngineCore starting its Worker shows two EngineCores for a moment, in real vLLM
        too), so a second match is waited out; a lasting second one fails at the deadline.
        """
        def single() -> psutil.Process | None:
            found = self.children(which)
            return found[0] if len(found) == 1 else None

        return wait_until(f"exactly one {what}", single)

    def wait_healthy(self, path: str) -> None:
        def ok() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"engine exited {self.proc.returncode}:\n{self.stderr()}")
            resp = get(self.url + path)
            return resp is not None and resp.status_code == 200

        wait_until(f"{path} to answer 200", ok)

    def stats(self) -> dict[str, int]:
        data: dict[str, int] = httpx.get(self.url + "/demo/stats", timeout=5).json()
        return data


class Engines:
    """Starts demo engines for one test and guarantees they, and all their children, die."""

    def __init__(self, logs: Path) -> None:
        self.tag = uuid.uuid4().hex
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []
        self.seen: dict[int, psutil.Process] = {}

    def env(self, extra: dict[str, str] | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AILAYER_DEMO_", "OLLAMA_"))}
        env.update({"AILAYER_TIME_SCALE": "1", TAG_ENV: self.tag, **(extra or {})})
        return env

    def start(self, module: str, args: list[str], port: int, env: dict[str, str] | None = None) -> Engine:
        n = len(self.started)
        out, err = self.logs / f"engine{n}.out", self.logs / f"engine{n}.err"
        with out.open("wb") as fout, err.open("wb") as ferr:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"reconciler.engines.demo.{module}", *args],
                stdout=fout,
                stderr=ferr,
                env=self.env(env),
            )
        self.started.append(proc)
        return Engine(proc, port, out, err, self)

    def vllm(self, *extra: str, boot_s: float = BOOT_S, env: dict[str, str] | None = None) -> Engine:
        port = free_port()
        args = ["serve", "demo/model", "--host", "127.0.0.1", "--port", str(port), "--boot-seconds", str(boot_s)]
        return self.start("vllm_like", [*args, *extra], port, env)

    def ollama(self, *extra: str, load_s: float = BOOT_S, env: dict[str, str] | None = None) -> Engine:
        port = free_port()
        args = ["serve", "--port", str(port), "--load-seconds", str(load_s)]
        return self.start("ollama_like", [*args, *extra], port, env)

    def remember(self, procs: list[psutil.Process]) -> None:
        self.seen.update({p.pid: p for p in procs})

    def tagged(self) -> list[psutil.Process]:
        """Live demo processes whose readable environment carries this test's tag."""
        found = []
        for proc in psutil.process_iter():
            if not alive(proc):
                continue
            try:
                if proc.environ().get(TAG_ENV) == self.tag:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def family(self) -> list[psutil.Process]:
        """Everything alive this test started: engines, their trees, tagged and remembered orphans."""
        found: dict[int, psutil.Process] = {p.pid: p for p in self.tagged()}
        for popen in self.started:
            try:
                top = psutil.Process(popen.pid)
                found.update({p.pid: p for p in [top, *top.children(recursive=True)]})
            except psutil.NoSuchProcess:
                continue
        self.remember(list(found.values()))
        return [p for p in self.seen.values() if alive(p)]

    def kill_round(self) -> bool:
        """SIGKILL the whole family, collected first since a dead parent no longer leads to
        its children; True once a round finds nothing (so a child spawned mid-kill is caught)."""
        victims = self.family()
        for proc in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        return not victims

    def kill_all(self) -> None:
        wait_until("every demo process of this test to be killed", self.kill_round, 10)
        for popen in self.started:  # reap our own children; orphans are init's to reap
            popen.wait(timeout=10)

    def leftovers(self) -> list[psutil.Process]:
        return [*self.tagged(), *(p for p in self.seen.values() if alive(p))]


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[Engines]:
    started = Engines(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()
    wait_until("every demo process of this test to be gone", lambda: not started.leftovers(), 10)


def core_of(engine: Engine) -> psutil.Process:
    return engine.worker(titled(ENGINE_CORE), "the EngineCore")


def vllm_worker_of(engine: Engine) -> psutil.Process:
    return engine.worker(titled(WORKER), "the Worker")


def runner_of(engine: Engine) -> psutil.Process:
    return engine.worker(program("llama-server"), "the llama-server runner")


def preload(engine: Engine, model: str = "gemma2:9b", **extra: Any) -> dict[str, Any]:
    body = {"model": model, "keep_alive": -1, **extra}
    resp = httpx.post(engine.url + "/api/generate", json=body, timeout=START_TIMEOUT_S)
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def ps_names(engine: Engine, timeout: float = 5.0) -> list[str]:
    return [m["name"] for m in httpx.get(engine.url + "/api/ps", timeout=timeout).json()["models"]]


def ready(engine: Engine, kind: str) -> psutil.Process:
    """Bring an engine to serving and return its worker child (the one holding memory)."""
    if kind == "vllm":
        engine.wait_healthy("/health")
        return vllm_worker_of(engine)
    engine.wait_healthy("/api/version")
    preload(engine)
    return runner_of(engine)


def answered(sock: socket.socket) -> bool:
    """True once the peer has sent anything on ``sock`` (nothing is consumed)."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """Read (under the socket's timeout) until ``marker`` has arrived or the peer closed."""
    received = b""
    while marker not in received:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def post_and_hang_up(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a request on a raw socket and return it unread; closing it is the hang-up."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head.encode() + payload)
    return sock


# --------------------------------------------------------------------------- vLLM-like


def test_vllm_tree_titles_and_wiped_environments(engines: Engines) -> None:
    """API server -> VLLM::EngineCore -> VLLM::Worker, plus the resource tracker, one group."""
    eng = engines.vllm()
    eng.wait_healthy("/health")
    core, worker = core_of(eng), vllm_worker_of(eng)
    assert core.ppid() == eng.proc.pid and worker.ppid() == core.pid
    trackers = eng.children(marked(TRACKER_MARK))
    assert [t.ppid() for t in trackers] == [eng.proc.pid], trackers
    assert "reconciler.engines.demo.vllm_like serve demo/model" in cmdline(psutil.Process(eng.proc.pid))
    for proc, title in ((core, ENGINE_CORE), (worker, WORKER)):
        assert proc.name() == title  # psutil completes the 15-byte comm from the cmdline
        assert set(raw_environ(proc)) <= {0}, f"{title}: setproctitle must have wiped the environment"
        assert TAG_ENV not in proc.environ()
    assert trackers[0].environ().get(TAG_ENV) == engines.tag, "the tracker sets no title: environ intact"
    group = {(os.getpgid(p.pid), os.getsid(p.pid)) for p in (core, worker, trackers[0])}
    assert group == {(os.getpgid(eng.proc.pid), os.getsid(eng.proc.pid))}


def test_vllm_binds_before_loading_and_listens_only_when_ready(engines: Engines) -> None:
    eng = engines.vllm(boot_s=SLOW_BOOT_S)
    vllm_worker_of(eng)  # loading now
    with socket.socket() as plain:
        with pytest.raises(OSError) as taken:
            plain.bind(("127.0.0.1", eng.port))
        assert taken.value.errno == errno.EADDRINUSE, "the port is bound during the load"
    with socket.socket() as reuse:  # why a SO_REUSEADDR bind test calls a loading vLLM's port free
        reuse.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reuse.bind(("127.0.0.1", eng.port))
    assert refuses(eng.port), "bound but not listening: a connect is refused"
    assert eng.proc.poll() is None and "Application startup complete." not in eng.stdout()
    eng.wait_healthy("/health")
    assert "Application startup complete." in eng.stdout()
    assert "\rLoading safetensors checkpoint shards: 100% Completed | 5/5" in eng.stderr()
    models = httpx.get(eng.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["demo/model"]


def test_vllm_exits_at_once_when_the_port_is_listened_on(engines: Engines) -> None:
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        eng = engines.start("vllm_like", ["serve", "m", "--host", "127.0.0.1", "--port", str(port)], port)
        assert eng.proc.wait(timeout=START_TIMEOUT_S) == 1
    assert "Address already in use" in eng.stdout()


def test_vllm_sigterm_while_loading_exits_zero_and_stops_the_tree(engines: Engines) -> None:
    eng = engines.vllm(boot_s=5)
    core, worker = core_of(eng), vllm_worker_of(eng)
    eng.proc.terminate()
    assert eng.proc.wait(timeout=10) == 0
    wait_until("the loading EngineCore and Worker to be stopped", lambda: not alive(core) and not alive(worker), 10)


def test_vllm_orphans_survive_an_api_server_sigkill(engines: Engines) -> None:
    """Upstream vLLM issue 55510: EngineCore, Worker (holding the memory) and tracker live on."""
    eng = engines.vllm("--vram-mb", "64")
    eng.wait_healthy("/health")
    core, worker = core_of(eng), vllm_worker_of(eng)
    tracker = eng.worker(marked(TRACKER_MARK), "the resource tracker")
    if "holding 64 MiB on cpu" in eng.stdout():  # on a GPU box it is VRAM, not RSS
        assert worker.memory_info().rss >= 64 * MiB
    eng.proc.kill()
    assert eng.proc.wait(timeout=10) == -signal.SIGKILL
    for orphan in (core, worker, tracker):
        assert alive(orphan), f"{cmdline(orphan)} must outlive the API server, as in real vLLM"
    assert core.ppid() != eng.proc.pid and tracker.ppid() != eng.proc.pid
    assert worker.ppid() == core.pid
    for orphan in (core, worker, tracker):
        orphan.kill()
    psutil.wait_procs([core, worker, tracker], timeout=10)


def test_vllm_worker_ends_with_its_engine_core(engines: Engines) -> None:
    """vLLM's DeathPipeMonitor: a Worker exits once its EngineCore is gone; so does the server."""
    eng = engines.vllm()
    eng.wait_healthy("/health")
    core, worker = core_of(eng), vllm_worker_of(eng)
    core.kill()
    wait_until("the Worker to follow its EngineCore", lambda: not alive(worker), 10)
    assert eng.proc.wait(timeout=10) == 1
    assert "EngineDeadError" in eng.stderr()


def test_vllm_stream_chunks_arrive_separately(engines: Engines) -> None:
    delay_ms, n = 40, 8
    eng = engines.vllm("--token-delay-ms", str(delay_ms))
    eng.wait_healthy("/health")
    body = {"model": "demo/model", "prompt": "hi", "max_tokens": n, "stream": True}
    arrivals: list[float] = []
    text = ""
    with httpx.stream("POST", eng.url + "/v1/completions", json=body, timeout=10) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                piece = json.loads(line[len("data: ") :])["choices"][0]["text"]
                if piece:
                    arrivals.append(wall())
                    text += piece
    assert text == demo_text(n)
    assert len(arrivals) == n
    assert arrivals[-1] - arrivals[0] >= (n - 1) * delay_ms / 1000 * 0.5


def test_openai_client_against_vllm(engines: Engines) -> None:
    eng = engines.vllm("--served-model-name", "served", "--token-delay-ms", "5")
    eng.wait_healthy("/health")
    client = openai.OpenAI(base_url=eng.url + "/v1", api_key="demo", max_retries=0)
    chat = client.chat.completions.create(model="served", messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    assert chat.choices[0].message.content == demo_text(6)
    assert chat.usage is not None and chat.usage.completion_tokens == 6
    stream = client.chat.completions.create(
        model="served",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == demo_text(5)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    completion = client.completions.create(model="served", prompt="x", max_tokens=3)
    assert completion.choices[0].text == demo_text(3)
    emb = client.embeddings.create(model="served", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 16
    assert [m.id for m in client.models.list()] == ["served"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    ("fail", "code", "serves_first"),
    [("exit-at-once", 3, False), ("crash-loading", 1, False), ("crash-ready", 1, True)],
)
def test_vllm_injected_crashes(engines: Engines, fail: str, code: int, serves_first: bool) -> None:
    eng = engines.vllm("--fail", fail)
    if serves_first:
        eng.wait_healthy("/health")
    else:
        eng.tree()
    wait_until(f"the engine to exit on {fail}", lambda: eng.proc.poll() is not None)
    assert eng.proc.returncode == code, eng.stderr()
    if fail != "exit-at-once":
        assert "Traceback (most recent call last):" in eng.stderr()
    wait_until("a crashed engine to leave no process behind", lambda: not engines.leftovers())


def test_vllm_hang_ready_accepts_but_never_answers(engines: Engines) -> None:
    eng = engines.vllm("--fail", "hang-ready")
    eng.wait_healthy("/health")
    wait_until("the engine to wedge", lambda: get(eng.url + "/health", timeout=0.3) is None)
    assert not refuses(eng.port), "a hung engine still accepts connections"
    assert eng.proc.poll() is None


# --------------------------------------------------------------------------- Ollama-like


def test_ollama_answers_at_once_and_loads_on_preload(engines: Engines) -> None:
    port = free_port()
    eng = engines.start(
        "ollama_like",
        ["serve", "--load-seconds", str(BOOT_S), "--ollama-version", "0.32.7"],
        port,
        env={"OLLAMA_HOST": f"127.0.0.1:{port}"},
    )
    eng.wait_healthy("/api/version")
    assert httpx.get(eng.url + "/api/version").json() == {"version": "0.32.7"}
    assert httpx.get(eng.url + "/").text == "Ollama is running"
    assert ps_names(eng) == []
    assert not eng.tree(), "serve must not load anything by itself"
    assert preload(eng)["done_reason"] == "load"
    runner_of(eng)
    loaded = httpx.get(eng.url + "/api/ps").json()["models"]
    assert [m["name"] for m in loaded] == ["gemma2:9b"]
    assert loaded[0]["size_vram"] > 0 and loaded[0]["expires_at"].startswith("23")
    missing = httpx.post(eng.url + "/api/generate", json={"model": "nope", "prompt": "x"})
    assert missing.status_code == 404
    assert missing.json() == {"error": 'model "nope" not found, try pulling it first'}


def test_ollama_runner_is_llama_server_in_serves_group(engines: Engines, tmp_path: Path) -> None:
    """v0.30+: <prefix>/lib/ollama/llama-server --model <blob> --port N --host 127.0.0.1."""
    models = tmp_path / "models"
    eng = engines.ollama(env={"OLLAMA_MODELS": str(models)})
    runner = ready(eng, "ollama")
    shown = runner.cmdline()
    assert shown[0].endswith("/lib/ollama/llama-server") and runner.name() == "llama-server"
    assert shown[1:3] == ["--model", str(models / "blobs") + "/sha256-" + shown[2].rsplit("-", 1)[1]]
    assert shown[3] == "--port" and shown[4].isdigit() and shown[5:] == ["--host", "127.0.0.1"]
    assert not refuses(int(shown[4])), "the runner holds its own port"
    assert runner.ppid() == eng.proc.pid
    assert (os.getpgid(runner.pid), os.getsid(runner.pid)) == (os.getpgid(eng.proc.pid), os.getsid(eng.proc.pid))
    assert runner.environ().get(TAG_ENV) == engines.tag, "the environment is inherited and readable"
    assert runner.environ().get("OLLAMA_MODELS") == str(models)


@pytest.mark.parametrize(("version", "lists_while_loading"), [("0.32.3", True), ("0.32.4", False)])
def test_ollama_ps_follows_the_version(engines: Engines, version: str, lists_while_loading: bool) -> None:
    """Before 0.32.4 /api/ps lists a loading model (listed is not loaded); from it on, it blocks."""
    eng = engines.ollama("--ollama-version", version, load_s=SLOW_BOOT_S)
    eng.wait_healthy("/api/version")
    with post_and_hang_up(eng.port, "/api/generate", {"model": "gemma2:9b", "keep_alive": -1}) as loading:
        runner_of(eng)  # its runner has started, so the model is loading now
        if lists_while_loading:
            assert ps_names(eng) == ["gemma2:9b"]
            assert not answered(loading), "listed while the load is still going on"
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.get(eng.url + "/api/ps", timeout=SLOW_BOOT_S / 3)
            assert ps_names(eng, timeout=START_TIMEOUT_S) == ["gemma2:9b"], "answered once loaded"
        assert b'"done_reason": "load"' in read_until(loading, b'"done_reason"')


def test_ollama_load_is_aborted_when_its_client_hangs_up(engines: Engines) -> None:
    eng = engines.ollama(load_s=SLOW_BOOT_S)
    eng.wait_healthy("/api/version")
    with post_and_hang_up(eng.port, "/api/generate", {"model": "gemma2:9b", "keep_alive": -1}):
        runner = runner_of(eng)
    wait_until("the aborted load's runner to be killed", lambda: not alive(runner), 10)
    assert ps_names(eng) == []
    assert "context canceled" in eng.stdout()
    assert preload(eng)["done_reason"] == "load", "a later request loads again"


def test_ollama_request_keep_alive_overrides_the_environment(engines: Engines) -> None:
    eng = engines.ollama("--token-delay-ms", "1", env={"OLLAMA_KEEP_ALIVE": "-1"})
    eng.wait_healthy("/api/version")
    body = {"model": "gemma2:9b", "prompt": "x", "stream": False, "options": {"num_predict": 2}}
    assert httpx.post(eng.url + "/api/generate", json=body, timeout=START_TIMEOUT_S).status_code == 200
    runner = runner_of(eng)
    [entry] = httpx.get(eng.url + "/api/ps").json()["models"]
    assert entry["expires_at"].startswith("23"), "OLLAMA_KEEP_ALIVE=-1 keeps it forever"
    reply = httpx.post(eng.url + "/api/generate", json={**body, "keep_alive": 0}, timeout=START_TIMEOUT_S)
    assert reply.json()["response"] == demo_text(2), "the request itself is answered"
    wait_until("keep_alive 0 to unload the model after the request", lambda: ps_names(eng) == [])
    wait_until("its runner to be stopped", lambda: not alive(runner), 10)


def test_ollama_concurrent_requests_share_one_load(engines: Engines) -> None:
    eng = engines.ollama("--token-delay-ms", "1")
    eng.wait_healthy("/api/version")
    body = {"model": "gemma2:9b", "prompt": "x", "stream": False, "options": {"num_predict": 2}}

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=START_TIMEOUT_S) as client:
            return list(await asyncio.gather(*(client.post(eng.url + "/api/generate", json=body) for _ in range(3))))

    responses = asyncio.run(both())
    assert all(r.json()["response"] == demo_text(2) for r in responses)
    assert len(eng.children(program("llama-server"))) == 1


def test_ollama_client_chat_generate_list_ps(engines: Engines) -> None:
    eng = engines.ollama("--models", "gemma2:9b,llama3", "--token-delay-ms", "5")
    eng.wait_healthy("/api/version")
    client = ollama.Client(host=eng.url)
    assert {m.model for m in client.list().models} == {"gemma2:9b", "llama3:latest"}
    assert client.ps().models == []
    opts = {"num_predict": 4}
    msgs = [{"role": "user", "content": "hi"}]
    reply = client.chat(model="gemma2:9b", messages=msgs, stream=False, options=opts)
    assert reply.message.content == demo_text(4) and reply.done_reason == "stop"
    parts = list(client.chat(model="gemma2:9b", messages=msgs, stream=True, options=opts))
    assert "".join(p.message.content or "" for p in parts) == demo_text(4)
    assert [p.done for p in parts] == [False] * 4 + [True]
    gen = client.generate(model="gemma2:9b", prompt="x", options=opts)
    assert gen.response == demo_text(4) and gen.eval_count == 4
    assert [m.model for m in client.ps().models] == ["gemma2:9b"]
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="missing", messages=msgs)
    assert err.value.status_code == 404
    oai = openai.OpenAI(base_url=eng.url + "/v1", api_key="demo", max_retries=0)
    chat = oai.chat.completions.create(model="gemma2:9b", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.choices[0].message.content == demo_text(3)


def test_ollama_runner_crash_fails_the_load_but_serve_stays_up(engines: Engines) -> None:
    eng = engines.ollama("--fail", "crash-loading")
    eng.wait_healthy("/api/version")
    resp = httpx.post(eng.url + "/api/generate", json={"model": "gemma2:9b"}, timeout=10)
    assert resp.status_code == 500
    assert resp.json() == {"error": "llama runner process has terminated: exit status 1"}
    assert ps_names(eng) == []
    assert eng.proc.poll() is None


def test_ollama_runner_survives_parent_sigkill(engines: Engines) -> None:
    eng = engines.ollama()
    runner = ready(eng, "ollama")
    eng.proc.kill()
    eng.proc.wait(timeout=10)
    assert alive(runner) and runner.ppid() != eng.proc.pid


# --------------------------------------------------------------------------- both engines


@pytest.mark.parametrize("kind", ["vllm", "ollama"])
def test_worker_escapes_the_session_and_outlives_sigterm(engines: Engines, kind: str) -> None:
    eng = getattr(engines, kind)("--worker-escapes")
    worker = ready(eng, kind)
    assert os.getsid(worker.pid) != os.getsid(eng.proc.pid)
    eng.proc.terminate()
    assert eng.proc.wait(timeout=10) == 0
    assert alive(worker), "an escaped worker ignores the SIGTERM its parent sends"


@pytest.mark.parametrize("kind", ["vllm", "ollama"])
def test_sigterm_exits_cleanly_and_stops_the_worker(engines: Engines, kind: str) -> None:
    eng = getattr(engines, kind)()
    worker = ready(eng, kind)
    assert os.getsid(worker.pid) == os.getsid(eng.proc.pid)
    eng.proc.terminate()
    assert eng.proc.wait(timeout=10) == 0
    wait_until("the worker to be stopped by its parent", lambda: not alive(worker), 10)


def _stream_request(kind: str, port: int) -> bytes:
    if kind == "vllm":
        path, body = (
            "/v1/chat/completions",
            {
                "model": "demo/model",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 500,
                "stream": True,
            },
        )
    else:
        path, body = (
            "/api/generate",
            {
                "model": "gemma2:9b",
                "prompt": "hi",
                "options": {"num_predict": 500},
            },
        )
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


@pytest.mark.parametrize("kind", ["vllm", "ollama"])
def test_client_disconnect_mid_stream_counts_as_cancelled(engines: Engines, kind: str) -> None:
    eng = getattr(engines, kind)("--token-delay-ms", "20")
    ready(eng, kind)
    marker = b"data: {" if kind == "vllm" else b'"done": false'
    with socket.create_connection(("127.0.0.1", eng.port), timeout=10) as sock:
        sock.sendall(_stream_request(kind, eng.port))
        received = b""
        while received.count(marker) < 3:
            chunk = sock.recv(65536)
            assert chunk, "stream ended early"
            received += chunk
        assert wait_until("the stream to be active", lambda: eng.stats()["active_streams"] == 1)
    stats = wait_until("the cancel to be counted", lambda: (s := eng.stats())["requests_cancelled"] == 1 and s)
    assert stats == {
        "requests_started": 1,
        "requests_finished": 0,
        "requests_cancelled": 1,
        "active_streams": 0,
    }
