"""desired_state.yaml: read strictly (it can only name a catalog entry), written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from reconciler.domain import catalog
from reconciler.domain.catalog import Catalog
from reconciler.domain.desired import Desired, UnknownModel
from reconciler.kit.bootid import current_boot_id
from reconciler.kit.schemas import InvalidFile
from reconciler.store import desired_file


@pytest.fixture
def cat(tmp_path: Path) -> Catalog:
    cat = catalog.demo(tmp_path)
    cat.desired_path.parent.mkdir(parents=True, exist_ok=True)  # run/, where the demo keeps it
    return cat


def put(cat: Catalog, text: str) -> Path:
    cat.desired_path.write_text(text, encoding="utf-8")
    return cat.desired_path


def test_missing_file_is_idle(cat: Catalog) -> None:
    assert not cat.desired_path.exists()
    assert desired_file.read(cat) == Desired(None, explicit=False)


@pytest.mark.parametrize(("text", "explicit"), [("", False), ("null\n", False), ("{}\n", False),
                                               ("model: null\n", True), ("model:\n", True)])
def test_only_an_explicit_null_is_explicit(cat: Catalog, text: str, explicit: bool) -> None:
    """The loop waits a moment before stopping a model for an empty file, not for `model: null`."""
    cat.desired_path.write_text(text)
    assert desired_file.read(cat).explicit is explicit


@pytest.mark.parametrize("text", ["", "# nothing chosen\n", "null\n", "model: null\n", "model:\n"])
def test_null_and_empty_are_idle(cat: Catalog, text: str) -> None:
    put(cat, text)
    assert desired_file.read(cat).model is None


def test_a_known_model_is_read_with_its_generation(cat: Catalog) -> None:
    put(cat, "model: gpt-oss\ngeneration: 7\nrequested_by: alice\n")
    assert desired_file.read(cat) == Desired("gpt-oss", 7)


def test_unknown_model_lists_the_known_ones(cat: Catalog) -> None:
    path = put(cat, "model: llama-99\n")
    with pytest.raises(UnknownModel) as info:
        desired_file.read(cat)
    error = info.value
    assert isinstance(error, InvalidFile)
    assert error.model == "llama-99"
    assert error.known == ["gemma2", "gpt-oss"]
    assert str(path) in str(error)
    assert "field 'model'" in str(error)
    assert "gemma2, gpt-oss" in str(error)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('model: "rm -rf /"\n', "model"),
        ("model: ../../etc/passwd\n", "model"),
        ("model: /usr/bin/python\n", "model"),
        ("model: 'gpt-oss; reboot'\n", "model"),
        ("model: gpt-oss\ncommand: [sh, -c, 'rm -rf /']\n", "(top level)"),
        ("model: gpt-oss\nport: 1\n", "(top level)"),
        ("model: [gpt-oss]\n", "model"),
        ("model: 3\n", "model"),
        ("model: gpt-oss\ngeneration: -1\n", "generation"),
        ("model: gpt-oss\ngeneration: one\n", "generation"),
        ("- gpt-oss\n", "(top level)"),
        ("gpt-oss\n", "(top level)"),
    ],
    ids=["command", "path-traversal", "abs-path", "shell-meta", "extra-command", "extra-port",
         "list", "number", "negative-generation", "string-generation", "top-list", "top-string"],
)
def test_schema_refuses_anything_but_a_name(cat: Catalog, text: str, field: str) -> None:
    path = put(cat, text)
    with pytest.raises(InvalidFile) as info:
        desired_file.read(cat)
    assert not isinstance(info.value, UnknownModel)
    assert str(path) in str(info.value)
    assert f"field '{field}'" in str(info.value)


def test_broken_yaml_is_an_invalid_file(cat: Catalog) -> None:
    put(cat, "model: [gpt-oss\n")
    with pytest.raises(InvalidFile, match="YAML syntax error"):
        desired_file.read(cat)


def test_write_bumps_the_generation_each_time(cat: Catalog) -> None:
    first = desired_file.write(cat, "gpt-oss", requested_by="test")
    second = desired_file.write(cat, None, requested_by="test")
    third = desired_file.write(cat, "gemma2", requested_by="test")
    assert [first.generation, second.generation, third.generation] == [1, 2, 3]
    assert desired_file.read(cat) == Desired("gemma2", 3)


def test_write_continues_from_a_hand_written_generation(cat: Catalog) -> None:
    put(cat, "model: gemma2\ngeneration: 41\n")
    assert desired_file.write(cat, "gpt-oss", requested_by="test").generation == 42


def test_write_over_a_broken_file_starts_again_at_one(cat: Catalog) -> None:
    put(cat, "model: [\n")
    assert desired_file.write(cat, "gpt-oss", requested_by="test") == Desired("gpt-oss", 1)
    assert desired_file.read(cat) == Desired("gpt-oss", 1)


def test_written_file_reads_back_and_validates(cat: Catalog) -> None:
    result = desired_file.write(cat, "gpt-oss", requested_by="alice@ui")
    assert result == Desired("gpt-oss", 1)
    assert desired_file.read(cat) == result
    document = yaml.safe_load(cat.desired_path.read_text(encoding="utf-8"))
    assert document["model"] == "gpt-oss"
    assert document["requested_by"] == "alice@ui"
    assert isinstance(document["requested_at"], str)
    assert cat.desired_path.read_text(encoding="utf-8").startswith("# ")


def test_write_names_the_requester_by_default(cat: Catalog) -> None:
    desired_file.write(cat, None)
    document = yaml.safe_load(cat.desired_path.read_text(encoding="utf-8"))
    assert str(os.getpid()) in document["requested_by"] or "uid" in document["requested_by"]


def test_write_is_atomic_and_leaves_no_temp_files(cat: Catalog) -> None:
    for model in ["gpt-oss", "gemma2", None, "gpt-oss"]:
        desired_file.write(cat, model, requested_by="test")
    name = cat.desired_path.name
    assert sorted(os.listdir(cat.desired_path.parent)) == sorted([name, f".{name}.lock"])


def test_write_creates_the_folder(tmp_path: Path) -> None:
    cat = catalog.from_document({**catalog.demo_document(), "desired_state": "deep/er/wish.yaml"},
                                "test", tmp_path)
    desired_file.write(cat, "gemma2", requested_by="test")
    assert (tmp_path / "deep" / "er" / "wish.yaml").is_file()
    assert desired_file.read(cat).model == "gemma2"


def test_write_replaces_a_planted_symlink_instead_of_following_it(cat: Catalog, tmp_path: Path) -> None:
    target = tmp_path / "victim.txt"
    target.write_text("precious\n", encoding="utf-8")
    cat.desired_path.symlink_to(target)
    desired_file.write(cat, "gemma2", requested_by="test")
    assert target.read_text(encoding="utf-8") == "precious\n"
    assert not cat.desired_path.is_symlink()
    assert desired_file.read(cat).model == "gemma2"


def test_write_refuses_an_unknown_model_without_touching_the_file(cat: Catalog) -> None:
    path = put(cat, "model: gemma2\ngeneration: 5\n")
    before = (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_ino)
    with pytest.raises(UnknownModel, match="gemma2, gpt-oss"):
        desired_file.write(cat, "not-a-model", requested_by="test")
    assert (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_ino) == before
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_write_refuses_an_unknown_model_when_no_file_exists(cat: Catalog) -> None:
    with pytest.raises(UnknownModel):
        desired_file.write(cat, "rm -rf /", requested_by="test")
    assert not cat.desired_path.exists()


def test_write_refuses_an_overlong_requester(cat: Catalog) -> None:
    with pytest.raises(InvalidFile, match="requested_by"):
        desired_file.write(cat, "gemma2", requested_by="x" * 500)
    assert not cat.desired_path.exists()


def test_concurrent_toggles_never_share_a_generation(cat: Catalog) -> None:
    """200 writers at once, as the gate's threads are: strictly increasing, no collision."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        generations = list(pool.map(lambda i: desired_file.write(cat, "gpt-oss" if i % 2 else None).generation,
                                    range(200)))
    assert sorted(g for g in generations if g is not None) == list(range(1, 201))


def test_generation_never_falls_below_what_the_reconciler_reported(cat: Catalog) -> None:
    cat.observed_path.parent.mkdir(parents=True, exist_ok=True)
    cat.observed_path.write_text('{"phase": "IDLE", "desired_generation": 295}')
    cat.desired_path.write_text("model: gpt-oss\ngeneration: 3\n")  # a hand edit reset it
    assert desired_file.write(cat, None).generation == 296


def test_before_this_boot_by_boot_id_else_by_mtime() -> None:
    from reconciler.domain.desired import Desired, before_this_boot

    booted = 1_000_000.0
    assert before_this_boot(Desired("m", boot_id="old"), "new", booted)
    assert not before_this_boot(Desired("m", boot_id="new", written_at=1.0), "new", booted)
    assert before_this_boot(Desired("m", written_at=booted - 1), "new", booted)  # hand-written
    assert not before_this_boot(Desired("m", written_at=booted + 1), "new", booted)
    assert not before_this_boot(Desired("m"), None, booted)  # nothing to tell by


def test_the_writer_records_this_boot(tmp_path: Path) -> None:

    cat = catalog.demo(tmp_path)
    desired_file.write(cat, "gpt-oss")
    wish = desired_file.read(cat)
    assert wish.boot_id == current_boot_id() and wish.boot_id
    assert wish.written_at is not None
