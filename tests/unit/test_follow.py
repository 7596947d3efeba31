"""The follower turns engines' raw output files into activity-log lines (poll() driven directly)."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.kit.logs import ActivityLog
from reconciler.observe import follow
from reconciler.observe.follow import CONTINUES, MAX_LINE_BYTES, Follower
from reconciler.observe.progress import BootProgress

LINE = re.compile(r"^\[[^\]]+\] \[(?P<model>[^\]]+)\] \[(?P<pid>[^\]]+)\] (?P<message>.*)$")


@dataclass
class Rig:
    state: Path
    term: io.StringIO
    log: ActivityLog

    @property
    def engines(self) -> Path:
        return self.state / "engines"

    def follower(self) -> Follower:
        return Follower(self.log, self.state)

    def lines(self, model: str | None = None, marked: bool = False) -> list[str]:
        """The messages logged (for ``model``); ``marked``: keep the (replayed) marks."""
        out = []
        for line in self.term.getvalue().splitlines():
            match = LINE.match(line)
            assert match, f"badly formatted line: {line!r}"
            if model is None or match["model"] == model:
                message = match["message"]
                out.append(message if marked else message.removeprefix(follow.REPLAYED))
        return out


@pytest.fixture(autouse=True)
def save_offsets_every_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follow, "OFFSETS_EVERY_S", 0.0)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    state = tmp_path / "state"
    (state / "engines").mkdir(parents=True)
    term = io.StringIO()
    log = ActivityLog(tmp_path / "activity.log", state, term)
    yield Rig(state, term, log)
    log.close()


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as handle:
        handle.write(data)


def test_lf_crlf_and_cr_each_end_a_line(rig: Rig) -> None:
    path = rig.engines / "m.a1.log"
    append(path, b"unix\nwindows\r\nprogress 10%\rprogress 20%\rprogress 100%\n")
    follower = rig.follower()
    follower.track(path, "m", 42)
    follower.poll()
    assert rig.lines("m") == ["unix", "windows", "progress 10%", "progress 20%", "progress 100%"]
    assert "[m] [42]" in rig.term.getvalue()
    assert follower.last_line(path) == "progress 100%"


def test_blank_lines_are_dropped(rig: Rig) -> None:
    path = rig.engines / "m.a1.log"
    append(path, b"one\n\n   \n\ttwo  \n")
    follower = rig.follower()
    follower.track(path, "m", 1)
    follower.poll()
    assert rig.lines("m") == ["one", "\ttwo"]


def test_a_partial_line_waits_for_its_newline(rig: Rig) -> None:
    path = rig.engines / "m.a1.log"
    append(path, b"Loading weights")
    follower = rig.follower()
    follower.track(path, "m", 1)
    follower.poll()
    assert rig.lines("m") == []
    append(path, b" 50%")
    follower.poll()
    assert rig.lines("m") == []
    append(path, b" done\nnext")
    follower.poll()
    assert rig.lines("m") == ["Loading weights 50% done"]


def test_a_crlf_split_across_reads_is_one_line_end(rig: Rig) -> None:
    path = rig.engines / "m.a1.log"
    append(path, b"first\r")
    follower = rig.follower()
    follower.track(path, "m", 1)
    follower.poll()
    append(path, b"\nsecond\n")
    follower.poll()
    assert rig.lines("m") == ["first", "second"]


def payload(messages: list[str]) -> str:
    return "".join(m.removesuffix(CONTINUES.decode()) for m in messages)


def test_an_overlong_line_is_split_and_nothing_is_lost(rig: Rig) -> None:
    path = rig.engines / "m.a1.log"
    body = "".join(chr(ord("a") + i % 26) for i in range(MAX_LINE_BYTES * 3 + 123))
    append(path, body.encode() + b"\nafter\n")
    follower = rig.follower()
    follower.track(path, "m", 1)
    follower.poll()
    lines = rig.lines("m")
    assert lines[-1] == "after"
    pieces = lines[:-1]
    assert len(pieces) == 4
    assert all(p.endswith(CONTINUES.decode()) for p in pieces[:-1])
    assert not pieces[-1].endswith(CONTINUES.decode())
    assert all(len(p.removesuffix(CONTINUES.decode())) <= MAX_LINE_BYTES for p in pieces)
    assert payload(pieces) == body


def test_an_overlong_line_without_newline_is_emitted_in_pieces_as_it_grows(rig: Rig) -> None:
    path = rig.engines / "m.a1.log"
    body = "x" * (MAX_LINE_BYTES * 2 + 10)
    append(path, body.encode())
    follower = rig.follower()
    follower.track(path, "m", 1)
    follower.poll()
    emitted = rig.lines("m")
    assert len(emitted) == 2  # the 10-byte tail waits for more
    assert all(m.endswith(CONTINUES.decode()) for m in emitted)
    append(path, b"yz\n")
    follower.poll()
    assert payload(rig.lines("m")) == body + "yz"


def test_invalid_utf8_and_ansi_are_neutralised(rig: Rig) -> None:
    path = rig.engines / "m.a1.log"
    append(path, b"\x1b[32mINFO\x1b[0m caf\xe9 \x07bell\n[fake] [ailayer] [1] \x00forged\n")
    follower = rig.follower()
    follower.track(path, "m", 1)
    follower.poll()
    assert rig.lines("m") == ["INFO caf\\xe9 \\x07bell", "[fake] [ailayer] [1] \\x00forged"]
    assert "\x1b" not in rig.term.getvalue()


def test_a_new_follower_resumes_from_the_saved_offset(rig: Rig) -> None:
    path = rig.engines / "m.a1.log"
    append(path, b"one\ntwo\npart")
    first = rig.follower()
    first.track(path, "m", 1)
    first.poll()
    saved = json.loads((rig.state / "log_offsets.json").read_text())
    assert saved == {str(path): len(b"one\ntwo\n")}  # the partial line is re-read later
    append(path, b"ial\nthree\n")
    second = rig.follower()  # a restarted reconciler
    second.track(path, "m", 1)
    second.poll()
    assert rig.lines("m") == ["one", "two", "partial", "three"]
    second.poll()
    assert rig.lines("m") == ["one", "two", "partial", "three"]


def test_a_corrupt_offsets_file_starts_from_zero(rig: Rig) -> None:
    (rig.state / "log_offsets.json").write_text("{not json")
    path = rig.engines / "m.a1.log"
    append(path, b"line\n")
    follower = rig.follower()
    follower.track(path, "m", 1)
    follower.poll()
    assert rig.lines("m") == ["line"]


def test_retain_empty_drains_and_deletes_a_finished_file(rig: Rig) -> None:
    path = rig.engines / "m.a1.log"
    append(path, b"running\n")
    follower = rig.follower()
    follower.track(path, "m", 7)
    follower.poll()
    append(path, b"last words\nno newline at exit")
    follower.retain(set())
    follower.poll()
    assert rig.lines("m") == ["running", "last words", "no newline at exit"]
    assert not path.exists()
    assert follower.last_line(path) is None
    follower.poll()
    assert str(path) not in json.loads((rig.state / "log_offsets.json").read_text())


def test_retain_keeps_live_files(rig: Rig) -> None:
    live, dead = rig.engines / "a.i1.log", rig.engines / "b.i2.log"
    append(live, b"alive\n")
    append(dead, b"dead\n")
    follower = rig.follower()
    follower.track(live, "a", 1)
    follower.track(dead, "b", 2)
    follower.retain({live})
    follower.poll()
    assert live.exists() and not dead.exists()
    append(live, b"still here\n")
    follower.poll()
    assert rig.lines("a") == ["alive", "still here"]
    assert rig.lines("b") == ["dead"]


def test_track_again_after_retain_revives_the_tail(rig: Rig) -> None:
    path = rig.engines / "m.a1.log"
    append(path, b"x\n")
    follower = rig.follower()
    follower.track(path, "m", 1)
    follower.retain(set())
    follower.track(path, "m", 2)  # the loop saw it alive again in the same pass
    follower.poll()
    assert path.exists()
    assert rig.lines("m") == ["x"]


def test_an_orphan_file_is_drained_and_deleted(rig: Rig) -> None:
    orphan = rig.engines / "qwen2.5.deadbeef.log"  # a dotted model name
    append(orphan, b"written while no reconciler ran\r\nfinal")
    follower = rig.follower()
    follower.retain(set())
    follower.poll()
    assert rig.lines("qwen2.5") == ["written while no reconciler ran", "final"]
    assert "[qwen2.5] [-]" in rig.term.getvalue()
    assert not orphan.exists()


def test_an_orphan_resumes_from_its_saved_offset(rig: Rig) -> None:
    orphan = rig.engines / "m.old.log"
    append(orphan, b"already logged\n")
    first = rig.follower()
    first.track(orphan, "m", 1)
    first.poll()
    append(orphan, b"logged after the reconciler died\n")
    second = rig.follower()
    second.retain(set())
    second.poll()
    assert rig.lines("m") == ["already logged", "logged after the reconciler died"]
    assert not orphan.exists()


def test_truncation_restarts_from_zero(rig: Rig) -> None:
    path = rig.engines / "m.a1.log"
    append(path, b"a long first generation of output\n")
    follower = rig.follower()
    follower.track(path, "m", 1)
    follower.poll()
    path.write_bytes(b"new\n")
    follower.poll()
    assert rig.lines("m") == ["a long first generation of output", "new"]


def test_a_missing_file_is_skipped_quietly(rig: Rig) -> None:
    follower = rig.follower()
    path = rig.engines / "m.not-yet.log"
    follower.track(path, "m", 1)
    follower.poll()
    assert rig.lines() == []
    append(path, b"appeared\n")
    follower.poll()
    assert rig.lines("m") == ["appeared"]


def test_a_poll_reads_every_file_in_turns_up_to_its_budget(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """One flooding engine cannot starve another: files are read a chunk each in turn, and a
    poll stops at its budget with both equally far; the next polls catch up (issue 25, 2)."""
    monkeypatch.setattr(follow, "READ_CHUNK", 90)
    monkeypatch.setattr(follow, "POLL_BUDGET_BYTES", 360)
    paths = [rig.engines / "a.a1.log", rig.engines / "b.b1.log"]
    follower = rig.follower()
    for path, model in zip(paths, "ab", strict=True):
        append(path, b"".join(b"line %03d\n" % i for i in range(50)))  # 450 bytes each
        follower.track(path, model, 1)
    follower.poll()
    assert len(rig.lines("a")) == len(rig.lines("b")) == 20  # 2 turns of 90 bytes each
    assert follower.behind()
    while follower.behind():
        follower.poll()
    assert rig.lines("a") == rig.lines("b") == [f"line {i:03d}" for i in range(50)]


def test_boot_progress_follows_a_bar_being_redrawn_before_its_line_ends(rig: Rig) -> None:
    path = rig.engines / "gpt.a1.log"
    follower = rig.follower()
    follower.track(path, "gpt", 7, "vllm")
    append(path, b"(Worker pid=7) INFO [cpu_model_runner.py:68] Starting to load model /m...\n")
    follower.poll()
    assert follower.progress(path) == BootProgress(None, "loading model")
    append(path, b"\rLoading safetensors checkpoint shards:  40% Completed | 2/5 [00:02<00:03,  1.0it/s]")
    follower.poll()  # no newline yet: the bar's state still counts
    assert follower.progress(path) == BootProgress(40.0, "loading checkpoint shards (2/5)")
    append(path, b"\rLoading safetensors checkpoint shards: 100% Completed | 5/5 [00:05<00:00,  1.0it/s]\n"
                 b"unrelated line\n")
    follower.poll()
    assert follower.progress(path) == BootProgress(100.0, "loading checkpoint shards (5/5)")


def test_llamacpp_dots_count_as_they_arrive(rig: Rig) -> None:
    path = rig.engines / "tiny.a1.log"
    follower = rig.follower()
    follower.track(path, "tiny", 7, "llamacpp")
    append(path, b"load_tensors: loading model tensors, this can take a while... (mmap = true)\n" + b"." * 30)
    follower.poll()
    assert follower.progress(path) == BootProgress(30.0, "loading model tensors")
    append(path, b"." * 70 + b"\n")
    follower.poll()
    assert follower.progress(path) == BootProgress(100.0, "loading model tensors")


def test_a_generic_engine_has_no_boot_progress(rig: Rig) -> None:
    path = rig.engines / "g.a1.log"
    follower = rig.follower()
    follower.track(path, "g", 7)
    append(path, b"Loading safetensors checkpoint shards:  40% Completed | 2/5\n")
    follower.poll()
    assert follower.progress(path) is None
    assert follower.progress(rig.engines / "untracked.log") is None


def test_lines_glued_to_an_unfinished_bar_or_dots_become_lines_of_their_own(rig: Rig) -> None:
    vllm, ollama = rig.engines / "gpt.a1.log", rig.engines / "gem.a1.log"
    follower = rig.follower()
    follower.track(vllm, "gpt", 7, "vllm")
    follower.track(ollama, "gem", 8, "ollama")
    append(vllm, b"\rLoading safetensors checkpoint shards:  40% Completed | 2/5 [00:02<00:03,  1.6it/s]"
                 b"(APIServer pid=7) INFO [x.py:1] waiting\n")
    append(ollama, b"load_tensors: loading model tensors, this can take a while... (mmap = true)\n"
                   b".........." b'[GIN] 200 | GET "/api/ps"\n' b"..........")
    follower.poll()
    assert rig.lines("gpt") == ["Loading safetensors checkpoint shards:  40% Completed | 2/5 [00:02<00:03,  1.6it/s]",
                                "(APIServer pid=7) INFO [x.py:1] waiting"]
    assert rig.lines("gem") == ["load_tensors: loading model tensors, this can take a while... (mmap = true)",
                                "..........", '[GIN] 200 | GET "/api/ps"']
    assert follower.progress(vllm) == BootProgress(40.0, "loading checkpoint shards (2/5)")
    assert follower.progress(ollama) == BootProgress(20.0, "loading model tensors")


PROBES = frozenset({"/health"})


def test_our_probes_access_lines_are_left_out_and_never_the_last_line(rig: Rig) -> None:
    path = rig.engines / "gpt.a1.log"
    follower = rig.follower()
    follower.track(path, "gpt", 7, "vllm", PROBES)
    append(path, b'INFO:     127.0.0.1:32974 - "POST /v1/chat/completions HTTP/1.1" 200 OK\n'
                 b'INFO:     127.0.0.1:32980 - "GET /health HTTP/1.1" 200 OK\n'
                 b'INFO:     127.0.0.1:32990 - "GET /health HTTP/1.1" 200 OK\n')
    follower.poll()
    assert rig.lines("gpt") == ['INFO:     127.0.0.1:32974 - "POST /v1/chat/completions HTTP/1.1" 200 OK']
    assert follower.last_line(path) == rig.lines("gpt")[0]
    follower.keep_probe_lines = True  # log_probe_lines: true (or log_level: debug)
    append(path, b'INFO:     127.0.0.1:33000 - "GET /health HTTP/1.1" 200 OK\n')
    follower.poll()
    assert rig.lines("gpt")[-1] == 'INFO:     127.0.0.1:33000 - "GET /health HTTP/1.1" 200 OK'
    assert follower.last_line(path) == rig.lines("gpt")[0]  # still not the state's last line


def test_lines_written_while_no_reconciler_followed_are_marked_replayed_with_their_pid(rig: Rig) -> None:
    live, orphan = rig.engines / "m.a1.log", rig.engines / "m.old.log"
    first = rig.follower()
    first.track(live, "m", 41)
    first.track(orphan, "m", 42)
    append(live, b"before\n")
    append(orphan, b"before\n")
    first.poll()
    append(live, b"while down\n")  # the reconciler is down now
    append(orphan, b"last words\n")
    second = rig.follower()  # restarted; the old instance died meanwhile
    second.track(live, "m", 41)
    second.retain({live})
    append(live, b"after\n")
    second.poll()
    second.poll()
    messages = rig.term.getvalue().splitlines()
    assert sum("replaying" in line for line in messages) == 2  # said once per file
    assert "[m] [41] (replayed) while down" in rig.term.getvalue()
    assert "[m] [42] (replayed) last words" in rig.term.getvalue()  # the dead instance's pid
    assert rig.lines("m", marked=True)[-1] == "after"  # written while followed: no mark
    assert "[-]" not in rig.term.getvalue()


def test_a_fresh_instance_is_never_replayed(rig: Rig) -> None:
    follower = rig.follower()
    path = rig.engines / "m.new.log"
    append(path, b"first words\n")  # written before the first track, as a fresh spawn does
    follower.track(path, "m", 5)
    follower.poll()
    assert rig.lines("m", marked=True) == ["first words"]
