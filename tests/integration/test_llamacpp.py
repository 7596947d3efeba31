"""A real engine nobody on this team wrote: llama.cpp's server, through the reconciler and the gate.

The engine is ``python -m reconciler.engines.llamacpp serve`` (llama.cpp's HTTP server, in-process via
xllamacpp, on CPU) loading tiny random-weight GGUFs written by ``reconciler.engines.demomodel``. Two
such "models" share one port, so switching between them is a real switch of real engines.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip("xllamacpp")
pytest.importorskip("gguf")

import openai

from reconciler.engines.demomodel import write_tiny_gguf
from reconciler.kit.freeport import free_port
from tests.helpers import (
    DEADLINE_S,
    PY,
    TEST_RUN_ENV,
    GatedStack,
    demo_engine,
    engine_procs,
    http_status,
    wait_until,
)

pytestmark = pytest.mark.integration

LLAMA_MARK, VLLM_MARK = "reconciler.engines.llamacpp", "reconciler.engines.demo.vllm_like"
MODELS = {"tiny-a": "tiny-a.gguf", "tiny-b": "tiny-b.gguf"}  # catalog name -> file (its marker)
# Each sampler pass reads the process table; this gap keeps it from eating a CI core.
SAMPLE_GAP_S = 0.005
# A single chat request against a 0.4 MB model on CPU takes milliseconds; this is a ceiling.
REQUEST_TIMEOUT_S = 30.0
# A process's start time is kept in clock ticks (1/100 s on Linux): the slack when comparing it.
START_TIME_RESOLUTION_S = 0.01
# Tokens in the streamed completion: enough that generating them takes far longer than the
# first chunk's trip, so a buffered relay (every chunk at the end) would show.
STREAM_TOKENS = 600
# A streamed answer's chunks must arrive spread over at least this share of the generation.
STREAM_SPREAD_SHARE = 0.5
# Requests right after a stream: at the ~20 % failure rate seen, 100 rounds meet it for sure.
AFTER_STREAM_ROUNDS = 100


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two GGUF "models", written once for the module (different seeds, different weights)."""
    folder = tmp_path_factory.mktemp("gguf")
    return {name: write_tiny_gguf(folder / file, seed=i) for i, (name, file) in enumerate(MODELS.items())}


def llama_engine(path: Path, alias: str, port: int) -> dict[str, Any]:
    """A catalog entry of kind llamacpp, as a user writes it (see examples/llamacpp.yaml).

    Strays are recognised only by the entry's own command (model file and port included):
    the kind's machine-wide ``llama-server`` form would reach a concurrent test session.
    """
    return {"kind": "llamacpp", "port": port, "served_name": alias,
            "strays": {"argv": [], "titles": []},
            "command": ["{python}", "-m", "reconciler.engines.llamacpp", "serve", "--model", str(path),
                        "--host", "{host}", "--port", "{port}", "--alias", alias, "--ctx-size", "1024"],
            "ready": {"period_s": 0.1}, "liveness": {"period_s": 0.5},
            "restart_backoff": {"initial_s": 0.5, "max_s": 2}}


@pytest.fixture
def stack(tmp_path: Path, models: dict[str, Path]) -> Iterator[GatedStack]:
    """tiny-a and tiny-b on one port, a demo vLLM engine on the same port, the gate in front.

    Torn down *through the product*: toggle none and one ``reconcile --once`` pass.
    """
    port = free_port()
    engines = {name: llama_engine(path, name, port) for name, path in models.items()}
    engines["gpt-oss"] = demo_engine("vllm", port)
    s = GatedStack(tmp_path, engines, gate_port=free_port(), request_timeout_s=REQUEST_TIMEOUT_S)
    yield s
    s.tear_down()


def boottime() -> float:
    """Seconds since boot: the clock a process's start time is kept in, so the two compare."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def started_at(proc: psutil.Process) -> float:
    """When ``proc`` started, in boottime() seconds (exact to the kernel's clock tick)."""
    return proc.create_time() - psutil.boot_time()


@dataclass
class Sample:
    at: float  # boottime()
    alive: dict[str, int]  # marker -> live processes of this test session carrying it
    listening: bool  # something accepts connections on the engine port


class Sampler(threading.Thread):
    """Samples, every few ms, which engines' processes exist and whether the port accepts."""

    def __init__(self, markers: list[str], port: int) -> None:
        super().__init__(name="engine-sampler", daemon=True)
        self.markers, self.port = markers, port
        self.samples: list[Sample] = []
        self.done = threading.Event()
        self.run_id = os.environ.get(TEST_RUN_ENV)

    def run(self) -> None:
        while not self.done.is_set():
            at = boottime()
            alive = dict.fromkeys(self.markers, 0)
            for proc in psutil.process_iter(["cmdline", "status"]):
                try:
                    if proc.info["status"] == psutil.STATUS_ZOMBIE:
                        continue
                    cmd = " ".join(proc.info["cmdline"] or [])
                    hits = [m for m in self.markers if m in cmd]
                    if hits and proc.environ().get(TEST_RUN_ENV) == self.run_id:
                        for marker in hits:
                            alive[marker] += 1
                except psutil.Error:
                    continue
            with socket.socket() as sock:
                listening = sock.connect_ex(("127.0.0.1", self.port)) == 0
            self.samples.append(Sample(at, alive, listening))
            self.done.wait(SAMPLE_GAP_S)

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.join()


def assert_clean_handover(samples: list[Sample], old: str, new: str, new_start: float) -> None:
    """No sample saw both engines; the old engine and the port were gone before the new started."""
    both = [s for s in samples if s.alive[old] and s.alive[new]]
    assert not both, f"{old} and {new} processes alive at the same moment: {both[:3]}"
    first_new = next((i for i, s in enumerate(samples) if s.alive[new]), None)
    assert first_new is not None, f"the sampler never saw {new} running"
    before = samples[:first_new]
    busy = [s.at for s in before if s.alive[old] or s.listening]
    assert busy, f"the sampler never saw {old} before {new} started"
    assert new_start + START_TIME_RESOLUTION_S > max(busy), (
        f"{new} started {max(busy) - new_start:.3f} s before {old} (or its port) was gone")
    assert not samples[-1].alive[old]


def chat(stack: GatedStack, model: str, client: openai.OpenAI | None = None) -> Any:
    """One non-streamed chat completion through the gate with the official client."""
    return (client or stack.client()).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say something."}],
        max_tokens=8, extra_body={"ignore_eos": True})


def test_toggle_loads_then_serves_real_completions_through_the_gate(stack: GatedStack) -> None:
    stack.start()
    stack.start_gate()
    stack.wait_phase("IDLE")
    port = stack.engines["tiny-a"]["port"]
    health_url, gate_url = f"http://127.0.0.1:{port}/health", stack.gate_url + "/v1/chat/completions"
    body = {"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    seen: list[tuple[str | None, int | None, str | None]] = []  # (phase, gate status, Retry-After)
    while_loading: list[tuple[int, str | None]] = []  # the gate's answer while /health said 503
    done = threading.Event()

    def watch_gate() -> None:
        while not done.is_set():
            state = stack.status()
            # Only a state the gate has read (it follows the file milliseconds behind) and that
            # did not move during the request says what the gate should have answered.
            if stack.gate_revision() == state.get("revision"):
                gate = http_status(gate_url, body)
                if stack.status().get("revision") == state.get("revision"):
                    seen.append((state.get("phase"), gate[0] if gate else None,
                                 gate[1].get("Retry-After") if gate else None))
            done.wait(SAMPLE_GAP_S)

    def watch_health() -> None:
        # Tight on purpose: llama.cpp answers 503 "Loading model" only while it loads, which
        # for this model lasts milliseconds (before that the port is closed).
        while not done.is_set():
            health = http_status(health_url)
            if health is not None and health[0] == 503:
                gate = http_status(gate_url, body)
                if gate is not None:
                    while_loading.append((gate[0], gate[1].get("Retry-After")))
            elif health is not None and health[0] == 200:
                return

    watchers = [threading.Thread(target=watch_gate), threading.Thread(target=watch_health)]
    for watcher in watchers:
        watcher.start()
    try:
        stack.toggle("tiny-a")
        ready = stack.wait_phase("READY", "tiny-a")
        wait_until("the gate proxies", lambda: seen and seen[-1][1] == 200)
    finally:
        done.set()
        for watcher in watchers:
            watcher.join()
    phases = [phase for phase, _, _ in seen]
    assert "LOADING" in phases and phases.index("LOADING") < phases.index("READY"), phases
    assert while_loading, "never saw llama.cpp's /health say 503 (loading)"
    assert all(status == 503 and retry and int(retry) > 0 for status, retry in while_loading), while_loading
    refused = [s for s in seen if s[0] == "LOADING"]
    assert refused and all(status == 503 and retry for _, status, retry in refused), refused
    first_200 = next(i for i, s in enumerate(seen) if s[1] == 200)
    assert all(s[1] in (428, 503) for s in seen[:first_200]), f"before READY only 428/503: {seen}"
    assert ready["engine"]["pid"] in {p.pid for p in engine_procs(MODELS["tiny-a"])}

    # A non-streamed completion with the official client (which also warms its connection).
    client = stack.client()
    completion = chat(stack, "tiny-a", client)
    assert completion.model == "tiny-a"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    assert completion.choices[0].message.content

    # A streamed one arrives chunk by chunk: its chunks reach us spread over the engine's own
    # generation time (llama.cpp reports it in the last chunk), where a relay that buffers the
    # response would deliver them all at once at the end. The spread, not the first chunk's
    # arrival, is compared: on a loaded machine the trip to the first chunk can outlast this
    # tiny model's whole generation.
    sent = time.monotonic()
    stream = client.chat.completions.create(
        model="tiny-a", messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=STREAM_TOKENS, stream=True, extra_body={"ignore_eos": True})
    arrivals: list[float] = []
    pieces: list[str] = []
    timings: dict[str, float] = {}
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - sent)
            pieces.append(chunk.choices[0].delta.content)
        timings = getattr(chunk, "timings", None) or timings
    # Random bytes: llama.cpp holds back an incomplete UTF-8 sequence and sends it with the next.
    assert len(arrivals) >= STREAM_TOKENS // 4, len(arrivals)
    assert timings.get("predicted_n") == STREAM_TOKENS, timings
    generating_s = timings["predicted_ms"] / 1000
    spread = arrivals[-1] - arrivals[0]
    assert spread > STREAM_SPREAD_SHARE * generating_s, (
        f"chunks arrived within {spread:.3f} s while the engine generated for {generating_s:.3f} s:"
        " the response was buffered, not streamed")
    assert len({round(t, 3) for t in arrivals}) >= 10, "chunks arrived in a few bursts"
    assert "".join(pieces)


def test_switches_leave_nothing_of_the_previous_engine(stack: GatedStack, models: dict[str, Path]) -> None:
    markers = {"tiny-a": MODELS["tiny-a"], "tiny-b": MODELS["tiny-b"], "gpt-oss": VLLM_MARK}
    port = stack.engines["tiny-a"]["port"]
    stack.start()
    stack.start_gate()
    stack.toggle("tiny-a")
    stack.wait_phase("READY", "tiny-a")
    served = {"tiny-a": "tiny-a", "tiny-b": "tiny-b", "gpt-oss": "openai/gpt-oss-20b"}
    previous = "tiny-a"
    for model in ("tiny-b", "gpt-oss", "tiny-a"):
        old_procs = engine_procs(markers[previous])
        assert old_procs, f"{previous} has no process to replace"
        with Sampler(list(markers.values()), port) as sampler:
            stack.toggle(model)
            doc = stack.wait_phase("READY", model)
        new_procs = engine_procs(markers[model])
        assert doc["engine"]["pid"] in {p.pid for p in new_procs}
        new_start = min(started_at(p) for p in new_procs)
        assert_clean_handover(sampler.samples, markers[previous], markers[model], new_start)
        assert not engine_procs(markers[previous]), f"a {previous} process survived the switch"
        assert not [p for p in old_procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert chat(stack, model).model == served[model]
        previous = model


def test_killed_engine_is_noticed_and_restarted(stack: GatedStack) -> None:
    stack.start()
    stack.toggle("tiny-b")
    first = stack.wait_phase("READY", "tiny-b")
    victim = psutil.Process(first["engine"]["pid"])
    assert LLAMA_MARK in " ".join(victim.cmdline())
    victim.send_signal(signal.SIGKILL)
    second = wait_until("a new tiny-b ready", lambda: (
        (d := stack.status()).get("phase") == "READY" and d["engine"]["pid"] != victim.pid and d))
    assert not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE
    assert [p.pid for p in engine_procs(LLAMA_MARK)] == [second["engine"]["pid"]]
    health = http_status(f"http://127.0.0.1:{second['engine']['port']}/health")
    assert health is not None and health[0] == 200


def test_once_adopts_a_healthy_server_started_by_hand(stack: GatedStack, models: dict[str, Path]) -> None:
    port = stack.engines["tiny-a"]["port"]
    # Started by hand: no instance cookie, its own session; only the command line matches.
    with (stack.root / "by-hand.out").open("wb") as out:
        by_hand = subprocess.Popen(
            [PY, "-m", "reconciler.engines.llamacpp", "serve", "--model", str(models["tiny-a"]),
             "--host", "127.0.0.1", "--port", str(port), "--alias", "tiny-a"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until("hand-started server healthy",
                   lambda: (http_status(f"http://127.0.0.1:{port}/health") or (0,))[0] == 200)
        stack.toggle("tiny-a")
        result = stack.cli("reconcile", "--once")
        assert result.returncode == 0, result.stdout + result.stderr
        doc = stack.status()
        assert doc["phase"] == "READY" and doc["engine"]["adopted"] is True
        # An adopted engine has no log of ours to name its leader: its pids say who it is.
        assert doc["engine"]["pids"] == [by_hand.pid], doc["engine"]
        again = stack.cli("reconcile", "--once")
        assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout
        assert by_hand.poll() is None, "the adopted server was restarted or killed"
        assert [p.pid for p in engine_procs(LLAMA_MARK)] == [by_hand.pid]
    finally:
        stack.toggle(None)
        stack.cli("reconcile", "--once")
        with contextlib.suppress(subprocess.TimeoutExpired):
            by_hand.wait(timeout=DEADLINE_S)
        if by_hand.poll() is None:
            by_hand.kill()
            by_hand.wait()


def test_requests_right_after_a_stream_are_answered(stack: GatedStack) -> None:
    """llama.cpp closes the connection after a stream though it said keep-alive: no 502."""
    stack.start()
    stack.start_gate()
    stack.toggle("tiny-a")
    stack.wait_phase("READY", "tiny-a")
    url = stack.gate_url + "/v1/chat/completions"
    body = {"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": True}
    # Back to back, as concurrent users' requests arrive: a bare client adds no pause.
    answers = [http_status(url, body) for _ in range(AFTER_STREAM_ROUNDS)]
    failed = [a[0] if a else None for a in answers if a is None or a[0] != 200]
    assert not failed, f"{len(failed)}/{AFTER_STREAM_ROUNDS} requests right after a stream failed: {failed}"


def test_the_real_servers_output_gives_its_boot_stages(stack: GatedStack) -> None:
    """The tiny model loads in milliseconds, faster than a pass: read what llama.cpp itself
    printed (the instance's raw output file) through the parser the follower uses. (The file
    must outlive the first scan after the start: it was deleted there, output and all.)"""
    from reconciler.observe import progress

    stack.start()
    stack.toggle("tiny-a")
    ready = stack.wait_phase("READY", "tiny-a")
    raw = stack.state_dir / "engines" / f"tiny-a.{ready['engine']['instance']}.log"
    lines = wait_until("the server's lines", lambda: [
        line for line in raw.read_text(errors="replace").splitlines() if "listening on" in line
    ] and raw.read_text(errors="replace").splitlines())
    stages = [p.stage for p in (progress.parse("llamacpp", line) for line in lines) if p]
    assert "loading model" in stages and stages[-2:] == ["model loaded", "listening"], stages
