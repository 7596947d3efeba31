"""Who owns a process, from tables: records, cgroups, sessions, cookies, titles, bystanders.

The rules are docs/OWNERSHIP.md. Every case is a process table made by hand; nothing runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.domain import catalog
from reconciler.domain.facts import Cookie, Observation, Proc, Record
from reconciler.plan.ownership import View, argv_matches, classify, title_matches

NS = "0123456789ab"
OTHER_NS = "ba9876543210"
NOW = 1_800_000_000.0
REAL = catalog.load_file(Path(__file__).parents[2] / "examples" / "gpt-oss-gemma2.yaml", "test").engines
USER = 1000  # a local user who is not root


def proc(pid: int, *argv: str, ppid: int = 1, sid: int | None = None, pgid: int | None = None,
         uid: int = 0, born: float = NOW - 5, cookie: Cookie | None = None,
         cgroup: str | None = None, listens: frozenset[int] = frozenset()) -> Proc:
    return Proc(pid=pid, ppid=ppid, create_time=born, cmdline=" ".join(argv), name=argv[0].rsplit("/")[-1],
                pgid=pgid or pid, sid=sid or pid, cookie=cookie, uid=uid, argv=argv, cgroup=cgroup,
                listens=listens)


def record(instance: str = "aaaaaaaa", model: str = "gpt-oss", leader: int = 100, born: float = NOW - 10,
           cgroup: str | None = None) -> Record:
    return Record(model, instance, born, leader_pid=leader, leader_create_time=born, uid=0, cgroup=cgroup)


def view(*procs: Proc, records: tuple[Record, ...] = (), members: dict[str, frozenset[int]] | None = None,
         ) -> View:
    return classify(Observation(now=NOW, procs=procs, records=records, members=members or {}),
                    REAL, NS)


def owners(v: View) -> dict[int, tuple[str, str | None]]:
    return {p.pid: (u.model, u.instance) for u in v.units for p in u.procs}


# --- precise recognition -------------------------------------------------------------------

BYSTANDERS = [
    ("tail of a log named after the engine", ("tail", "-f", "/tmp/vllm serve.log")),
    ("grep for the engine", ("grep", "ollama serve")),
    ("a commit message", ("git", "commit", "-m", "fix vllm serve flags")),
    ("ssh to another box", ("ssh", "gpu2", "ollama", "serve")),
    ("man page", ("man", "vllm.entrypoints")),
    ("tmux session named after it", ("tmux", "new", "-s", "vllm serve")),
    ("a shell running it in a string", ("bash", "-c", "vllm serve x")),
    ("an editor on the catalog", ("vim", "/etc/ailayer/engines.yaml")),
    ("watch of nvidia-smi", ("watch", "nvidia-smi")),
    ("python script that mentions it", ("python3", "check_vllm serve.py")),
    ("pip installing it", ("pip", "install", "vllm")),
    ("a title that only starts alike", ("VLLM::EngineCoreDump",)),
    ("journalctl for the unit", ("journalctl", "-u", "ollama")),
    ("another llama-server path", ("/opt/llama.cpp/bin/ollama-helper",)),
]


@pytest.mark.parametrize("argv", [b[1] for b in BYSTANDERS], ids=[b[0] for b in BYSTANDERS])
@pytest.mark.parametrize("uid", [0, USER])
def test_bystanders_are_nobody(argv: tuple[str, ...], uid: int) -> None:
    bystander = proc(500, *argv, uid=uid)
    shell_inside = proc(501, "bash", ppid=500, pgid=500, sid=500, uid=uid)
    v = view(bystander, shell_inside)
    assert v.units == (), owners(v)


COPIES = [
    (("/usr/local/bin/vllm", "serve", "some/model", "--port", "9"), "gpt-oss"),
    (("python3.11", "-m", "vllm.entrypoints.openai.api_server", "--model", "x"), "gpt-oss"),
    (("VLLM::EngineCore",), "gpt-oss"),
    (("VLLM::Worker_TP1",), "gpt-oss"),
    (("/usr/bin/ollama", "serve"), "gemma2"),
    (("/usr/lib/ollama/llama-server", "--model", "/blob", "--port", "3"), "gemma2"),
    (("/usr/local/bin/ollama", "runner", "--model", "/blob"), "gemma2"),
]


@pytest.mark.parametrize(("argv", "model"), COPIES, ids=[" ".join(c[0]) for c in COPIES])
def test_real_engine_copies_are_strays(argv: tuple[str, ...], model: str) -> None:
    assert owners(view(proc(600, *argv))) == {600: (model, None)}


def test_argv_rules() -> None:
    assert argv_matches(("{python}", "-m", "x"), ("/opt/py/bin/python3.12", "-m", "x", "more"))
    assert not argv_matches(("{python}", "-m", "x"), ("/usr/bin/pythonista", "-m", "x"))
    assert argv_matches(("lib/ollama/llama-server",), ("/usr/lib/ollama/llama-server",))
    assert not argv_matches(("lib/ollama/llama-server",), ("/usr/xlib/ollama/llama-server",))
    assert not argv_matches(("vllm", "serve"), ("vllm",))
    assert not argv_matches((), ("vllm",))
    # a console script as the kernel runs it: the interpreter, then the script's path
    assert argv_matches(("vllm", "serve"), ("/venv/bin/python3", "/venv/bin/vllm", "serve", "m"))
    assert argv_matches(("/venv/bin/vllm", "serve"), ("/venv/bin/python3", "/venv/bin/vllm", "serve"))
    assert not argv_matches(("vllm", "serve"), ("python3", "-c", "vllm", "serve"))


def test_title_rules() -> None:
    assert title_matches("VLLM::Worker", proc(1, "VLLM::Worker_DP0_TP1"))
    assert not title_matches("VLLM::Worker", proc(1, "VLLM::Worker-x"))
    assert not title_matches("VLLM::Worker", proc(1, "VLLM::Workers"))


# --- our instances -------------------------------------------------------------------------


def test_record_mode_finds_wiped_workers_by_session_and_the_escaped_one_by_cookie() -> None:
    cookie = Cookie(NS, "gpt-oss", "aaaaaaaa", NOW - 10)
    api = proc(100, "vllm", "serve", "m", cookie=cookie, born=NOW - 10)
    core = proc(101, "VLLM::EngineCore", ppid=100, sid=100, pgid=100)  # environ wiped
    worker = proc(102, "VLLM::Worker", ppid=101, sid=100, pgid=100)
    escaped = proc(103, "python3", "worker.py", sid=103, pgid=103, cookie=cookie)  # setsid + double fork
    v = view(api, core, worker, escaped, records=(record(),))
    assert owners(v) == {pid: ("gpt-oss", "aaaaaaaa") for pid in (100, 101, 102, 103)}


def test_orphaned_engine_core_stays_ours_after_the_api_server_died() -> None:
    """The seed's zombie: vLLM's API server SIGKILLed; EngineCore re-parented to init."""
    core = proc(101, "VLLM::EngineCore", sid=100, pgid=100)
    worker = proc(102, "VLLM::Worker", ppid=101, sid=100, pgid=100)
    v = view(core, worker, records=(record(),))
    (unit,) = v.units
    assert unit.instance == "aaaaaaaa" and unit.pids == [101, 102] and unit.root_pid == 101


def test_cgroup_mode_membership_is_the_cgroup() -> None:
    cg = "/sys/fs/cgroup/ailayer-0123456789ab/aaaaaaaa"
    inside = proc(300, "anything", sid=300, uid=USER)  # setsid, another title, even another uid
    outside = proc(301, "vllm", "serve", "x", sid=100, pgid=100)  # same session id, not a member
    v = view(inside, outside, records=(record(cgroup=cg),), members={"aaaaaaaa": frozenset({300})})
    assert owners(v) == {300: ("gpt-oss", "aaaaaaaa"), 301: ("gpt-oss", None)}


def test_a_child_forked_between_the_two_reads_is_the_same_instance_not_a_duplicate() -> None:
    """cgroup.procs said [300]; the table, read next, also holds 302, forked in between. As a
    second unit it was killed as a "duplicate" and took the whole instance's cgroup with it."""
    cg = f"/sys/fs/cgroup/unified/tests/ailayer-{NS}/aaaaaaaa"
    leader = proc(300, "ollama", "serve", cgroup=f"/tests/ailayer-{NS}/aaaaaaaa")
    runner = proc(302, "llama-server", ppid=300, cgroup=f"/tests/ailayer-{NS}/aaaaaaaa")
    v = view(leader, runner, records=(record(cgroup=cg),), members={"aaaaaaaa": frozenset({300})})
    (unit,) = v.units
    assert unit.instance == "aaaaaaaa" and unit.pids == [300, 302]
    elsewhere = proc(303, "llama-server", cgroup=f"/tests/ailayer-{NS}/aaaaaaaab")  # a prefix is not enough
    other = owners(view(leader, elsewhere, records=(record(cgroup=cg),), members={"aaaaaaaa": frozenset({300})}))
    assert other[300] == ("gpt-oss", "aaaaaaaa") and other[303][1] == "aaaaaaaab"


def test_a_forged_cookie_from_another_uid_is_never_ours() -> None:
    forged = Cookie(NS, "gpt-oss", "aaaaaaaa", NOW + 3600)  # a start time in the future, too
    squatter = proc(400, "nc", "-l", "8000", uid=USER, cookie=forged, listens=frozenset({8000}))
    real = proc(100, "vllm", "serve", "m", born=NOW - 10)
    v = view(squatter, real, records=(record(),))
    assert owners(v) == {100: ("gpt-oss", "aaaaaaaa")}
    assert v.forged == (squatter,)
    assert v.foreign_listeners == {8000: (squatter,)}


def test_another_users_process_in_our_session_id_is_not_ours() -> None:
    """Session ids are just numbers: another user's process may carry ours after PID reuse."""
    stranger = proc(200, "bash", sid=100, pgid=100, uid=USER)
    assert view(stranger, records=(record(),)).units == ()


def test_a_reused_leader_pid_voids_the_session_rule() -> None:
    newcomer = proc(100, "sshd", born=NOW - 1)  # pid 100 again, but not our leader
    its_child = proc(150, "bash", ppid=1, sid=100, pgid=100, born=NOW - 0.5)
    v = view(newcomer, its_child, records=(record(),))
    assert v.units == ()


def test_processes_born_before_the_instance_are_not_its_members() -> None:
    old = proc(90, "bash", sid=100, pgid=100, born=NOW - 3600)
    assert view(old, records=(record(),)).units == ()


def test_our_cookie_without_a_record_on_our_uid_is_an_orphan_of_ours() -> None:
    cookie = Cookie(NS, "gpt-oss", "bbbbbbbb", NOW - 10)
    leftover = proc(700, "sleep", "1000", cookie=cookie)
    (unit,) = view(leftover).units
    assert (unit.model, unit.instance, unit.record) == ("gpt-oss", "bbbbbbbb", None)


def test_another_installs_processes_are_never_strays_of_ours() -> None:
    by_cookie = proc(800, "vllm", "serve", "m", cookie=Cookie(OTHER_NS, "gpt-oss", "cccccccc", NOW))
    its_worker = proc(801, "VLLM::EngineCore", ppid=800, sid=800, pgid=800)
    by_cgroup = proc(802, "VLLM::EngineCore", cgroup=f"/ailayer-{OTHER_NS}/dddddddd")
    assert view(by_cookie, its_worker, by_cgroup).units == ()


def test_our_cgroup_without_a_record_is_ours() -> None:
    lost = proc(900, "VLLM::Worker", cgroup=f"/ailayer-{NS}/eeeeeeee")
    (unit,) = view(lost).units
    assert unit.instance == "eeeeeeee" and unit.record is None


def test_stray_children_and_group_go_with_it() -> None:
    server = proc(50, "/usr/bin/ollama", "serve", uid=USER)
    runner = proc(51, "/usr/lib/ollama/llama-server", "--model", "b", ppid=50, pgid=50, sid=50, uid=USER)
    helper = proc(52, "helper", ppid=1, pgid=50, sid=50, uid=USER)
    assert owners(view(server, runner, helper)) == {pid: ("gemma2", None) for pid in (50, 51, 52)}
