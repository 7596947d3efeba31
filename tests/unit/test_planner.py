"""The planner from tables of cases: no processes, no sockets, no clock.

Each case pins the whole plan: the verdict's phase and reason, and every action with its
targets (pids and the instance keys to re-scan), its port or its model, the way pyinfra's
operation fixtures pin exact commands. A case named "kills the duplicate" fails if the
wrong instance is killed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from reconciler.domain.catalog import demo
from reconciler.domain.facts import (
    Cookie,
    Gpu,
    GpuProc,
    Observation,
    Probe,
    Proc,
    Reason,
    Record,
    WarmupPhase,
    WarmupState,
)
from reconciler.domain.status import Phase, SpareReason
from reconciler.plan.planner import (
    LISTEN_WATCH_S,
    RESPAWN_LIMIT,
    Action,
    AwaitPort,
    Kill,
    Memory,
    Start,
    Warmup,
    backoff_delay,
    plan,
)

NS = "0123456789ab"
NOW = 1_800_000_000.0
ENGINES = demo().engines
VLLM, OLLAMA = ENGINES["gpt-oss"], ENGINES["gemma2"]
VLLM_ARGV = ("/usr/bin/python3", "-m", "reconciler.engines.demo.vllm_like", "serve", "openai/gpt-oss-20b",
             "--host", "127.0.0.1", "--port", "18000")
OLLAMA_ARGV = ("/usr/bin/python3", "-m", "reconciler.engines.demo.ollama_like", "serve", "--host", "127.0.0.1",
               "--port", "18434", "--models", "gemma2:9b")
USER = 1000


def proc(pid: int, argv: tuple[str, ...], started: float = NOW - 10, **kw: Any) -> Proc:
    fields: dict[str, Any] = {"ppid": 1, "pgid": pid, "sid": pid, "uid": 0}
    fields.update(kw)
    return Proc(pid=pid, create_time=started, cmdline=" ".join(argv), name=argv[0].rsplit("/")[-1],
                argv=argv, **fields)


def vllm(pid: int, started: float = NOW - 10, **kw: Any) -> Proc:
    return proc(pid, VLLM_ARGV, started, **kw)


def ollama(pid: int, started: float = NOW - 10, **kw: Any) -> Proc:
    return proc(pid, OLLAMA_ARGV, started, **kw)


def rec(instance: str, model: str, leader: int, started: float = NOW - 10) -> Record:
    return Record(model, instance, started, leader_pid=leader, leader_create_time=started, uid=0)


A1, A2, B1 = rec("aaaaaaa1", "gpt-oss", 10), rec("aaaaaaa2", "gpt-oss", 20), rec("bbbbbbb1", "gemma2", 30)


def foreign(pid: int, port: int, uid: int = 33) -> Proc:
    return proc(pid, ("nginx: master process",), NOW - 99, listens=frozenset({port}), uid=uid)


def obs(*procs: Proc, records: tuple[Record, ...] = (), probe: Probe | None = None,
        port_free: bool = True, listening: dict[int, frozenset[int]] | None = None, **kw: Any) -> Observation:
    if listening is None:  # the engine processes that hold a port listen on it
        listening = {port: frozenset(p.pid for p in procs if port in p.listens) for port in (18000, 18434)}
    return Observation(now=NOW, procs=procs, records=records, probe=probe, listening=listening,
                       port_free={18000: port_free, 18434: port_free}, **kw)


ON_V = frozenset({18000})
ON_O = frozenset({18434})
READY = Probe(True, "HTTP 200")
DOWN = Probe(False, "connection refused")
KEY_A1 = ("gpt-oss", "aaaaaaa1")
KEY_A2 = ("gpt-oss", "aaaaaaa2")
STRAY_V = ("gpt-oss", None)
STRAY_O = ("gemma2", None)


def shape(action: Action) -> tuple[Any, ...]:
    if isinstance(action, Kill):
        return ("Kill", sorted(p.pid for p in action.targets), list(action.units), action.why)
    if isinstance(action, AwaitPort):
        return ("AwaitPort", action.port)
    if isinstance(action, Start):
        return ("Start", action.model, action.attempt)
    return ("Warmup", action.model, action.instance)


TRACK_A1 = Memory(model="gpt-oss", tracked="aaaaaaa1")
TRACK_B1 = Memory(model="gemma2", tracked="bbbbbbb1")
# (id, desired, observation, memory, phase, reason, actions)
CASES: list[tuple[str, str | None, Observation, Memory, Phase, str, list[tuple[Any, ...]]]] = [
    ("idle, nothing running", None, obs(), Memory(), Phase.IDLE, "NoModelSelected", []),
    ("idle kills our leftover", None, obs(vllm(10), records=(A1,)), Memory(), Phase.STOPPING, "Stopping",
     [("Kill", [10], [KEY_A1],
      "gpt-oss instance aaaaaaa1 is not wanted (desired: none)")]),
    ("idle spares a stray: it gets in nobody's way", None, obs(vllm(10, listens=ON_V)), Memory(),
     Phase.IDLE, "NoModelSelected", []),
    ("idle never kills a foreign process", None, obs(foreign(5, 18000)), Memory(), Phase.IDLE,
     "NoModelSelected", []),
    ("fresh start", "gpt-oss", obs(), Memory(), Phase.LOADING, "Starting", [("Start", "gpt-oss", 1)]),
    ("switch kills ours, waits for the port, starts", "gemma2", obs(vllm(10, listens=ON_V), records=(A1,)),
     TRACK_A1, Phase.STOPPING, "Switching",
     [("Kill", [10], [KEY_A1],
      "gpt-oss instance aaaaaaa1 is not wanted (desired: gemma2)"), ("AwaitPort", 18434), ("Start", "gemma2", 1)]),
    ("switch spares a stray of the old model on its own port", "gemma2", obs(vllm(10, listens=ON_V)),
     Memory(), Phase.LOADING, "Starting", [("Start", "gemma2", 1)]),
    ("loading while the port is bound, not listening", "gpt-oss",
     obs(vllm(10, listens=ON_V), records=(A1,), probe=DOWN, listening={18000: frozenset()}), TRACK_A1,
     Phase.LOADING, "Loading", []),
    ("ready when our listener answers", "gpt-oss", obs(vllm(10, listens=ON_V), records=(A1,), probe=READY),
     TRACK_A1, Phase.READY, "Ready", []),
    ("after a restart the recorded instance is kept", "gpt-oss",
     obs(vllm(10, listens=ON_V), records=(A1,), probe=READY), Memory(), Phase.READY, "Ready", []),
    ("adopt a healthy stray listening on the port", "gpt-oss", obs(vllm(10, listens=ON_V), probe=READY),
     Memory(), Phase.READY, "Ready", []),
    ("another user's healthy copy is never adopted, nor killed", "gpt-oss",
     obs(vllm(10, listens=ON_V, uid=USER), probe=READY, port_free=False), Memory(), Phase.WAITING_PORT,
     "PortHeldByForeignProcess", []),
    ("a stray not ready on the port is replaced", "gpt-oss",
     obs(vllm(10, listens=ON_V), probe=DOWN, port_free=False), Memory(), Phase.STOPPING, "Switching",
     [("Kill", [10], [STRAY_V],
      "stray gpt-oss is a duplicate of the wanted engine"), ("AwaitPort", 18000), ("Start", "gpt-oss", 1)]),
    ("a stray of another model on the wanted port is killed", "gemma2",
     obs(vllm(10, listens=ON_O), port_free=False), Memory(), Phase.STOPPING, "Switching",
     [("Kill", [10], [STRAY_V],
      "stray gpt-oss is not wanted (desired: gemma2)"), ("AwaitPort", 18434), ("Start", "gemma2", 1)]),
    ("the tracked duplicate is kept, the other killed", "gpt-oss",
     obs(vllm(10, listens=ON_V), vllm(20), records=(A1, A2), probe=READY), TRACK_A1, Phase.READY, "Ready",
     [("Kill", [20], [KEY_A2],
      "gpt-oss instance aaaaaaa2 is a duplicate of the wanted engine")]),
    ("untracked duplicates: the later record is kept", "gpt-oss",
     obs(vllm(10), vllm(20, started=NOW - 5, listens=ON_V), records=(A1, replace(A2, started_at=NOW - 5,
                                                                                  leader_create_time=NOW - 5)),
         probe=READY), Memory(), Phase.READY, "Ready", [("Kill", [10], [KEY_A1],
      "gpt-oss instance aaaaaaa1 is a duplicate of the wanted engine")]),
    ("foreign process on the port: wait, never kill", "gpt-oss", obs(foreign(5, 18000), port_free=False),
     Memory(), Phase.WAITING_PORT, "PortHeldByForeignProcess", []),
    ("busy port with an invisible holder", "gpt-oss", obs(port_free=False), Memory(), Phase.WAITING_PORT,
     "PortBusy", []),
    ("crash while loading backs off", "gpt-oss", obs(exits={"aaaaaaa1": "exited with code 1"}), TRACK_A1,
     Phase.FAILED, "CrashLoopBackOff", []),
    ("orphaned workers of a dead leader are killed, then a restart", "gpt-oss",
     obs(proc(11, ("VLLM::EngineCore",), sid=10, pgid=10), records=(A1,)), TRACK_A1, Phase.FAILED,
     "EngineExited", [("Kill", [11], [KEY_A1],
      "EngineExited: main process pid 10 is gone; its workers are killed too")]),
    ("a squatter on our port is never READY", "gpt-oss",
     obs(vllm(10), foreign(66, 18000, uid=USER), records=(A1,), probe=DOWN), TRACK_A1, Phase.LOADING,
     "PortSquatted", []),
    ("the squatter won the bind and ours died: failed", "gpt-oss",
     obs(foreign(66, 18000, uid=USER), records=(A1,), exits={"aaaaaaa1": "exited with code 1"}), TRACK_A1,
     Phase.FAILED, "CrashLoopBackOff", []),
    ("boot budget exhausted", "gpt-oss", obs(vllm(10, started=NOW - 3000), records=(rec("aaaaaaa1", "gpt-oss", 10,
                                                                                       NOW - 3000),), probe=DOWN),
     TRACK_A1, Phase.FAILED, "BootTimeout", [("Kill", [10], [KEY_A1],
      "BootTimeout: not ready after 2700 s boot budget (connection refused)")]),
    ("35-minute boot is still loading", "gpt-oss",
     obs(vllm(10, started=NOW - 2100), records=(rec("aaaaaaa1", "gpt-oss", 10, NOW - 2100),), probe=DOWN),
     TRACK_A1, Phase.LOADING, "Loading", []),
    ("ollama up but model not loaded: warm up", "gemma2",
     obs(ollama(30, listens=ON_O), records=(B1,), probe=Probe(True, "HTTP 200", json_ok=False)), TRACK_B1,
     Phase.LOADING, "Loading", [("Warmup", "gemma2", "bbbbbbb1")]),
    ("ollama warm-up pending: no second request", "gemma2",
     obs(ollama(30, listens=ON_O), records=(B1,), probe=Probe(True, "HTTP 200", json_ok=False),
         warmup=WarmupState(WarmupPhase.PENDING)), TRACK_B1, Phase.LOADING, "Loading", []),
    ("ollama ready once the model is listed and the warm-up answered", "gemma2",
     obs(ollama(30, listens=ON_O), records=(B1,), probe=Probe(True, "HTTP 200", json_ok=True),
         warmup=WarmupState(WarmupPhase.DONE)),
     TRACK_B1, Phase.READY, "Ready", []),
    ("old ollama lists a model still loading: not ready before the warm-up answers", "gemma2",
     obs(ollama(30, listens=ON_O), records=(B1,), probe=Probe(True, "HTTP 200", json_ok=True),
         warmup=WarmupState(WarmupPhase.PENDING)), TRACK_B1, Phase.LOADING, "Loading", []),
    ("adopted ollama already listing the model: one warm-up to be sure", "gemma2",
     obs(ollama(30, listens=ON_O), records=(B1,), probe=Probe(True, "HTTP 200", json_ok=True)), TRACK_B1,
     Phase.LOADING, "Loading", [("Warmup", "gemma2", "bbbbbbb1")]),
    ("ready engine missing one probe leaves READY at once, not killed yet", "gpt-oss",
     obs(vllm(10, listens=ON_V), records=(A1,), probe=DOWN), replace(TRACK_A1, ready_since=NOW - 60),
     Phase.DEGRADED, "ProbeFailing", []),
    ("a stray holding GPU memory is killed when a model is wanted", "gemma2",
     obs(vllm(10), gpu=Gpu(True, "ok", (GpuProc(10, 900.0),))), Memory(), Phase.STOPPING, "Switching",
     [("Kill", [10], [STRAY_V],
      "stray gpt-oss is not wanted (desired: gemma2)"), ("AwaitPort", 18434), ("Start", "gemma2", 1)]),
    ("a zombie is dead, not surplus", "gemma2", obs(vllm(10, zombie=True), records=(A1,)), Memory(),
     Phase.LOADING, "Starting", [("Start", "gemma2", 1)]),
]


@pytest.mark.parametrize(("desired", "observation", "memory", "phase", "reason", "actions"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_table(desired: str | None, observation: Observation, memory: Memory, phase: Phase,
                    reason: str, actions: list[tuple[Any, ...]]) -> None:
    result = plan(desired, ENGINES, observation, memory, NS)
    assert (result.verdict.phase, result.verdict.reason) == (phase, reason), result.verdict
    assert [shape(a) for a in result.actions] == actions


def test_spared_strays_are_reported_with_the_reason() -> None:
    result = plan(None, ENGINES, obs(vllm(10, listens=ON_V)), Memory(), NS)
    (spared,) = result.spared
    assert spared.unit.pids == [10] and "does not hold the wanted engine's port" in spared.why
    assert spared.reason is SpareReason.NO_CONFLICT
    other = plan("gpt-oss", ENGINES, obs(vllm(10, listens=ON_V, uid=USER), port_free=False), Memory(), NS)
    assert "runs as uid 1000" in other.spared[0].why
    assert other.spared[0].reason is SpareReason.OTHER_USER


def test_forged_cookie_is_reported_never_killed_nor_kept() -> None:
    forged = proc(70, ("sleep", "1000"), uid=USER, listens=ON_V,
                  cookie=Cookie(NS, "gpt-oss", "aaaaaaa1", NOW + 3600))
    result = plan("gpt-oss", ENGINES, obs(vllm(10), forged, records=(A1,), probe=READY), Memory(), NS)
    assert result.actions == ()
    assert (result.verdict.phase, result.verdict.reason) == (Phase.LOADING, "PortSquatted")
    assert [s.unit.pids for s in result.spared] == [[70]] and "forged" in result.spared[0].why
    assert result.spared[0].reason is SpareReason.FORGED_COOKIE


def test_squatter_is_named_and_not_probed_into_ready() -> None:
    squatter = foreign(66, 18000, uid=USER)
    result = plan("gpt-oss", ENGINES, obs(vllm(10), squatter, records=(A1,), probe=READY), TRACK_A1, NS)
    assert result.verdict.phase is Phase.LOADING
    assert "pid 66 (uid 1000" in result.verdict.message
    assert result.port_holders == (squatter,)


def test_never_targets_self() -> None:
    result = plan(None, ENGINES, replace(obs(vllm(10), records=(A1,)), self_pids=frozenset({10})), Memory(), NS)
    assert result.actions == ()


def test_kill_takes_the_whole_instance_including_the_escaped_worker() -> None:
    cookie = Cookie(NS, "gpt-oss", "aaaaaaa1", NOW - 10)
    parent = vllm(10, cookie=cookie)
    core = proc(11, ("VLLM::EngineCore",), ppid=10, pgid=10, sid=10)
    escaped = proc(12, ("python3", "w.py"), cookie=cookie)
    group_member = proc(13, ("helper",), pgid=10, sid=10)
    result = plan("gemma2", ENGINES, obs(parent, core, escaped, group_member, records=(A1,)), Memory(), NS)
    assert [shape(a) for a in result.actions] == [
        ("Kill", [10, 11, 12, 13], [KEY_A1], "gpt-oss instance aaaaaaa1 is not wanted (desired: gemma2)"),
        ("AwaitPort", 18434), ("Start", "gemma2", 1)]


def test_backoff_doubles_and_caps() -> None:
    delays = [backoff_delay(VLLM, n) for n in range(1, 8)]
    assert delays == [10, 20, 40, 80, 160, 300, 300]


def test_crash_records_failure_and_waits_for_backoff() -> None:
    crashed = plan("gpt-oss", ENGINES, obs(exits={"aaaaaaa1": "exited with code 1"}), TRACK_A1, NS)
    assert crashed.memory.restarts == 1
    assert crashed.memory.backoff_until == NOW + 10
    assert crashed.memory.last_failure is not None
    assert crashed.memory.last_failure.reason is Reason.ENGINE_EXITED
    assert "exited with code 1" in crashed.memory.last_failure.message
    later = plan("gpt-oss", ENGINES, replace(obs(), now=NOW + 10.5), crashed.memory, NS)
    assert [shape(a) for a in later.actions] == [("Start", "gpt-oss", 2)]


def test_ready_engine_is_watched_between_passes() -> None:
    result = plan("gpt-oss", ENGINES, obs(vllm(10, listens=ON_V), records=(A1,), probe=READY), TRACK_A1, NS)
    assert (result.verdict.phase, result.watch) == (Phase.READY, "aaaaaaa1")
    loading = plan("gpt-oss", ENGINES, obs(vllm(10, listens=ON_V), records=(A1,), probe=DOWN), TRACK_A1, NS)
    assert loading.verdict.phase is Phase.LOADING and loading.watch is None


def test_liveness_failures_restart_after_threshold() -> None:
    memory = replace(TRACK_A1, ready_since=NOW - 60)
    failing = obs(vllm(10, listens=ON_V), records=(A1,), probe=DOWN)
    for _ in range(VLLM.liveness_failures - 1):
        result = plan("gpt-oss", ENGINES, failing, memory, NS)
        assert result.verdict.phase is Phase.DEGRADED and result.watch is None
        assert result.requeue_after == VLLM.ready.period_s  # re-checked at the boot probe's pace
        memory = result.memory
    result = plan("gpt-oss", ENGINES, failing, memory, NS)
    assert (result.verdict.phase, result.verdict.reason) == (Phase.FAILED, "EngineUnresponsive")
    assert [shape(a) for a in result.actions] == [
        ("Kill", [10], [KEY_A1], "EngineUnresponsive: engine stopped answering after READY: connection refused")]


def test_respawning_stray_on_the_port_is_reported_not_killed_forever() -> None:
    memory = Memory()
    for round_ in range(RESPAWN_LIMIT):
        stray = vllm(50 + round_, listens=ON_O)
        result = plan("gemma2", ENGINES, replace(obs(stray, port_free=False), now=NOW + round_), memory, NS)
        assert [shape(a) for a in result.actions] == [
            ("Kill", [50 + round_], [STRAY_V], "stray gpt-oss is not wanted (desired: gemma2)"),
            ("AwaitPort", 18434), ("Start", "gemma2", 1)]
        memory = result.memory
    result = plan("gemma2", ENGINES, replace(obs(vllm(60, listens=ON_O), port_free=False), now=NOW + 5),
                  memory, NS)
    assert result.actions == ()
    assert result.verdict.reason == "EngineRespawning"
    assert "keep coming back" in result.verdict.message and "systemctl disable" in result.verdict.message
    # The verdict holds past the window, while the other supervisor keeps it alive...
    later = plan("gemma2", ENGINES, replace(obs(vllm(61, listens=ON_O), port_free=False), now=NOW + 1000),
                 result.memory, NS)
    assert later.actions == () and later.verdict.reason == "EngineRespawning"
    # ...and ends once it is gone: then ours starts.
    gone = plan("gemma2", ENGINES, replace(obs(), now=NOW + 1001), later.memory, NS)
    assert [shape(a) for a in gone.actions] == [("Start", "gemma2", 1)]
    assert gone.memory.respawning == frozenset()


def test_switch_then_verdict_is_loading() -> None:
    result = plan("gemma2", ENGINES, obs(vllm(10), records=(A1,)), TRACK_A1, NS)
    assert result.then is not None and result.then.phase is Phase.LOADING


def test_warmup_action_names_the_instance() -> None:
    result = plan("gemma2", ENGINES, obs(ollama(30, listens=ON_O), records=(B1,),
                                         probe=Probe(True, "200", json_ok=False)), TRACK_B1, NS)
    assert result.actions == (Warmup("gemma2", "bbbbbbb1", result.actions[0].why),)


def test_crash_count_is_forgiven_only_after_a_healthy_stretch() -> None:
    from reconciler.plan.planner import BACKOFF_RESET_AFTER_S

    memory = replace(TRACK_A1, restarts=3)
    ready = obs(vllm(10, listens=ON_V), records=(A1,), probe=READY)
    fresh = plan("gpt-oss", ENGINES, ready, memory, NS)
    assert fresh.verdict.phase is Phase.READY and fresh.memory.restarts == 3
    later = plan("gpt-oss", ENGINES, replace(ready, now=NOW + BACKOFF_RESET_AFTER_S), fresh.memory, NS)
    assert later.memory.restarts == 0


def test_a_fresh_engine_that_does_not_listen_yet_is_watched_for_its_listen() -> None:
    def loading(started: float, **kw: Any) -> Any:
        record = rec("aaaaaaa1", "gpt-oss", 10, started=NOW - started)
        return plan("gpt-oss", ENGINES, obs(vllm(10, started=NOW - started, **kw), records=(record,),
                                            probe=DOWN), TRACK_A1, NS)

    fresh = loading(1.0)
    assert fresh.verdict.phase is Phase.LOADING and fresh.await_listen == VLLM.port
    listening = loading(1.0, listens=ON_V)
    assert listening.verdict.phase is Phase.LOADING and listening.await_listen is None
    long_boot = loading(LISTEN_WATCH_S + 1)
    assert long_boot.verdict.phase is Phase.LOADING and long_boot.await_listen is None
