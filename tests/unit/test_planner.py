"""The planner from tables of cases: no processes, no sockets, no clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from reconciler.catalog import demo
from reconciler.facts import Cookie, Observation, Probe, Proc
from reconciler.planner import (
    RESPAWN_LIMIT,
    AwaitPort,
    Kill,
    Memory,
    Start,
    Warmup,
    backoff_delay,
    plan,
)
from reconciler.status import Phase

NS = "testns"
NOW = 1_800_000_000.0
ENGINES = demo().engines
VLLM, OLLAMA = ENGINES["gpt-oss"], ENGINES["gemma2"]


def vllm(pid: int, instance: str | None = "a1", started: float = NOW - 10, **kw: object) -> Proc:
    cookie = Cookie(NS, "gpt-oss", instance, started) if instance else None
    fields: dict[str, object] = {
        "ppid": 1, "create_time": started, "pgid": pid, "sid": pid, "cookie": cookie,
        "cmdline": "python -m reconciler.demo.vllm_like serve openai/gpt-oss-20b --port 18000",
    }
    fields.update(kw)
    return Proc(pid=pid, **fields)  # type: ignore[arg-type]


def ollama(pid: int, instance: str | None = "b1", started: float = NOW - 10, **kw: object) -> Proc:
    cookie = Cookie(NS, "gemma2", instance, started) if instance else None
    fields: dict[str, object] = {
        "ppid": 1, "create_time": started, "pgid": pid, "sid": pid, "cookie": cookie,
        "cmdline": "python -m reconciler.demo.ollama_like serve --port 18434",
    }
    fields.update(kw)
    return Proc(pid=pid, **fields)  # type: ignore[arg-type]


def foreign(pid: int, port: int) -> Proc:
    return Proc(pid=pid, ppid=1, create_time=NOW - 99, cmdline="nginx: master process",
                name="nginx", pgid=pid, sid=pid, listens=frozenset({port}))


def obs(*procs: Proc, probe: Probe | None = None, port_free: bool = True, **kw: object) -> Observation:
    return Observation(now=NOW, procs=procs, port_free={18000: port_free, 18434: port_free},
                       probe=probe, **kw)  # type: ignore[arg-type]


READY = Probe(True, "HTTP 200")
DOWN = Probe(False, "connection refused")


def kinds(actions: tuple[object, ...]) -> list[str]:
    return [type(a).__name__ for a in actions]


# (id, desired, observation, memory, expected phase, expected action kinds)
CASES = [
    ("idle, nothing running", None, obs(), Memory(), Phase.IDLE, []),
    ("idle kills our leftover", None, obs(vllm(10)), Memory(), Phase.STOPPING, ["Kill"]),
    ("idle kills a stray match", None, obs(vllm(10, instance=None)), Memory(), Phase.STOPPING, ["Kill"]),
    ("idle never kills a foreign process", None, obs(foreign(5, 18000)), Memory(), Phase.IDLE, []),
    ("fresh start", "gpt-oss", obs(), Memory(), Phase.LOADING, ["Start"]),
    ("switch kills, waits for the port, starts", "gemma2", obs(vllm(10)), Memory(model="gpt-oss", tracked="a1"),
     Phase.STOPPING, ["Kill", "AwaitPort", "Start"]),
    ("loading while probe refuses", "gpt-oss", obs(vllm(10), probe=DOWN), Memory(model="gpt-oss", tracked="a1"),
     Phase.LOADING, []),
    ("ready when probe answers", "gpt-oss", obs(vllm(10), probe=READY), Memory(model="gpt-oss", tracked="a1"),
     Phase.READY, []),
    ("adopt our own instance after restart", "gpt-oss", obs(vllm(10), probe=READY), Memory(),
     Phase.READY, []),
    ("adopt a healthy stray on the port", "gpt-oss",
     obs(vllm(10, instance=None, listens=frozenset({18000})), probe=READY), Memory(), Phase.READY, []),
    ("a stray not ready on the port is replaced", "gpt-oss",
     obs(vllm(10, instance=None, listens=frozenset({18000})), probe=DOWN, port_free=False),
     Memory(), Phase.STOPPING, ["Kill", "AwaitPort", "Start"]),
    ("duplicate instance of the wanted model is killed", "gpt-oss",
     obs(vllm(10, instance="a1"), vllm(20, instance="a2"), probe=READY), Memory(model="gpt-oss", tracked="a1"),
     Phase.READY, ["Kill"]),
    ("foreign process on the port: wait, never kill", "gpt-oss", obs(foreign(5, 18000), port_free=False),
     Memory(), Phase.WAITING_PORT, []),
    ("busy port with an invisible holder", "gpt-oss", obs(port_free=False), Memory(),
     Phase.WAITING_PORT, []),
    ("crash while loading backs off", "gpt-oss", obs(exits={"a1": "exited with code 1"}),
     Memory(model="gpt-oss", tracked="a1"), Phase.FAILED, []),
    ("boot budget exhausted", "gpt-oss",
     obs(vllm(10, started=NOW - VLLM.boot_timeout_s - 1), probe=DOWN), Memory(model="gpt-oss", tracked="a1"),
     Phase.FAILED, ["Kill"]),
    ("35-minute boot is still loading", "gpt-oss",
     obs(vllm(10, started=NOW - 35 * 60), probe=DOWN), Memory(model="gpt-oss", tracked="a1"), Phase.LOADING, []),
    ("ollama up but model not loaded: warm up", "gemma2",
     obs(ollama(30), probe=Probe(True, "HTTP 200", json_ok=False)), Memory(model="gemma2", tracked="b1"),
     Phase.LOADING, ["Warmup"]),
    ("ollama warm-up pending: no second request", "gemma2",
     obs(ollama(30), probe=Probe(True, "HTTP 200", json_ok=False), warmup="pending"),
     Memory(model="gemma2", tracked="b1"), Phase.LOADING, []),
    ("ollama ready once the model is listed", "gemma2",
     obs(ollama(30), probe=Probe(True, "HTTP 200", json_ok=True)), Memory(model="gemma2", tracked="b1"),
     Phase.READY, []),
    ("ready engine missing one probe stays ready", "gpt-oss", obs(vllm(10), probe=DOWN),
     Memory(model="gpt-oss", tracked="a1", ready_since=NOW - 60), Phase.READY, []),
]


@pytest.mark.parametrize(("desired", "observation", "memory", "phase", "actions"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_table(desired: str | None, observation: Observation, memory: Memory,
                    phase: Phase, actions: list[str]) -> None:
    result = plan(desired, ENGINES, observation, memory, NS)
    assert result.verdict.phase is phase, result.verdict
    assert kinds(result.actions) == actions


def test_never_targets_foreign_or_self() -> None:
    me = vllm(10, instance=None)
    result = plan(None, ENGINES, replace(obs(me, foreign(5, 18000)), self_pids=frozenset({10})),
                  Memory(), NS)
    assert result.actions == ()


def test_kill_takes_the_whole_tree_including_escaped_worker() -> None:
    parent = vllm(10)
    child = vllm(11, ppid=10, cmdline="python -m x VLLM::EngineCore", cookie=None, pgid=10)
    escaped = vllm(12, ppid=1, cmdline="VLLM::Worker", sid=12, pgid=12)  # cookie, own session
    group_member = Proc(pid=13, ppid=1, create_time=NOW, cmdline="helper", pgid=10, sid=10)
    result = plan("gemma2", ENGINES, obs(parent, child, escaped, group_member), Memory(), NS)
    kill = result.actions[0]
    assert isinstance(kill, Kill)
    assert sorted(p.pid for p in kill.targets) == [10, 11, 12, 13]
    assert isinstance(result.actions[1], AwaitPort) and result.actions[1].port == OLLAMA.port
    assert isinstance(result.actions[2], Start) and result.actions[2].model == "gemma2"


def test_other_namespace_without_pattern_is_never_ours() -> None:
    other = Proc(pid=40, ppid=1, create_time=NOW, cmdline="sleep 100", pgid=40, sid=40,
                 cookie=Cookie("otherns", "gpt-oss", "zz", NOW))
    assert plan(None, ENGINES, obs(other), Memory(), NS).actions == ()


def test_backoff_doubles_and_caps() -> None:
    delays = [backoff_delay(VLLM, n) for n in range(1, 8)]
    assert delays == [10, 20, 40, 80, 160, 300, 300]


def test_crash_records_failure_and_waits_for_backoff() -> None:
    crashed = plan("gpt-oss", ENGINES, obs(exits={"a1": "exited with code 1"}),
                   Memory(model="gpt-oss", tracked="a1"), NS)
    assert crashed.memory.restarts == 1
    assert crashed.memory.backoff_until == NOW + 10
    assert "exited with code 1" in (crashed.memory.last_failure or "")
    later = plan("gpt-oss", ENGINES, replace(obs(), now=NOW + 10.5), crashed.memory, NS)
    assert kinds(later.actions) == ["Start"] and later.actions[0].attempt == 2  # type: ignore[union-attr]


def test_liveness_failures_restart_after_threshold() -> None:
    memory = Memory(model="gpt-oss", tracked="a1", ready_since=NOW - 60)
    for _ in range(VLLM.liveness_failures - 1):
        result = plan("gpt-oss", ENGINES, obs(vllm(10), probe=DOWN), memory, NS)
        assert result.verdict.phase is Phase.READY
        memory = result.memory
    result = plan("gpt-oss", ENGINES, obs(vllm(10), probe=DOWN), memory, NS)
    assert result.verdict.phase is Phase.FAILED
    assert result.verdict.reason == "EngineUnresponsive"
    assert kinds(result.actions) == ["Kill"]


def test_respawning_stray_is_reported_not_killed_forever() -> None:
    memory = Memory()
    stray = vllm(50, instance=None, ppid=1)
    for round_ in range(RESPAWN_LIMIT):
        result = plan(None, ENGINES, replace(obs(replace(stray, pid=50 + round_)), now=NOW + round_),
                      memory, NS)
        assert kinds(result.actions) == ["Kill"]
        memory = result.memory
    result = plan(None, ENGINES, replace(obs(replace(stray, pid=60)), now=NOW + 5), memory, NS)
    assert result.actions == ()
    assert result.verdict.reason == "EngineRespawning"
    assert "keep coming back" in result.verdict.message


def test_warmup_action_names_the_instance() -> None:
    result = plan("gemma2", ENGINES, obs(ollama(30), probe=Probe(True, "200", json_ok=False)),
                  Memory(model="gemma2", tracked="b1"), NS)
    assert result.actions == (Warmup("gemma2", "b1", result.actions[0].why),)  # type: ignore[union-attr]


def test_switch_then_verdict_is_loading() -> None:
    result = plan("gemma2", ENGINES, obs(vllm(10)), Memory(model="gpt-oss", tracked="a1"), NS)
    assert result.then is not None and result.then.phase is Phase.LOADING


def test_zombies_are_dead_not_surplus() -> None:
    """An unreaped zombie (init in a container may never reap) must not be killed forever."""
    zombie = vllm(10, zombie=True)
    result = plan("gemma2", ENGINES, obs(zombie), Memory(), NS)
    assert kinds(result.actions) == ["Start"]


def test_crash_count_is_forgiven_only_after_a_healthy_stretch() -> None:
    from reconciler.planner import BACKOFF_RESET_AFTER_S

    memory = Memory(model="gpt-oss", tracked="a1", restarts=3)
    fresh = plan("gpt-oss", ENGINES, obs(vllm(10), probe=READY), memory, NS)
    assert fresh.verdict.phase is Phase.READY and fresh.memory.restarts == 3
    later = plan("gpt-oss", ENGINES, replace(obs(vllm(10), probe=READY), now=NOW + BACKOFF_RESET_AFTER_S),
                 fresh.memory, NS)
    assert later.memory.restarts == 0
