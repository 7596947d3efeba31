"""yamlfile: every way a small YAML file can be wrong becomes one InvalidFile, quickly."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.kit import yamlfile
from reconciler.kit.schemas import InvalidFile


def write(tmp_path: Path, data: bytes | str, name: str = "f.yaml") -> Path:
    path = tmp_path / name
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def test_a_small_mapping_reads_back(tmp_path: Path) -> None:
    path = write(tmp_path, "model: gemma2\ngeneration: 3\n")
    assert yamlfile.read_yaml(path) == {"model": "gemma2", "generation": 3}


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n", "null\n", "~\n", "---\n"])
def test_empty_and_null_documents_are_none(tmp_path: Path, content: str) -> None:
    assert yamlfile.read_yaml(write(tmp_path, content)) is None


def test_nul_bytes_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, b"model: a\x00b\n")
    with pytest.raises(InvalidFile, match="NUL bytes") as info:
        yamlfile.read_yaml(path)
    assert info.value.path == str(path)


def test_binary_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, bytes(range(256)) * 4)
    with pytest.raises(InvalidFile, match="binary file"):
        yamlfile.read_yaml(path)


def test_invalid_utf8_names_the_byte(tmp_path: Path) -> None:
    path = write(tmp_path, b"model: caf\xe9\n")
    with pytest.raises(InvalidFile, match=r"not UTF-8 text \(byte 10\)"):
        yamlfile.read_yaml(path)


def test_file_over_the_size_limit_is_refused_unparsed(tmp_path: Path) -> None:
    # A valid YAML comment, so only the size check can refuse it.
    path = write(tmp_path, b"#" + b"x" * yamlfile.MAX_FILE_BYTES + b"\n")
    with pytest.raises(InvalidFile, match=f"larger than {yamlfile.MAX_FILE_BYTES} bytes"):
        yamlfile.read_yaml(path)


def test_file_exactly_at_the_size_limit_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, b"#" * (yamlfile.MAX_FILE_BYTES - 1) + b"\n")
    data = yamlfile.read_bytes(path)
    assert len(data) == yamlfile.MAX_FILE_BYTES
    assert data.endswith(b"#\n")


@pytest.mark.parametrize("style", ["flow-list", "flow-map", "block-map"])
def test_nesting_deeper_than_the_limit_is_refused(tmp_path: Path, style: str) -> None:
    levels = yamlfile.MAX_DEPTH + 2
    if style == "flow-list":
        text = "[" * levels + "1" + "]" * levels
    elif style == "flow-map":
        text = "{a: " * levels + "1" + "}" * levels
    else:
        text = "".join("  " * i + "a:\n" for i in range(levels)) + "  " * levels + "1\n"
    with pytest.raises(InvalidFile, match=f"nested deeper than {yamlfile.MAX_DEPTH} levels"):
        yamlfile.read_yaml(write(tmp_path, text))


def test_nesting_at_the_limit_is_fine(tmp_path: Path) -> None:
    levels = yamlfile.MAX_DEPTH
    text = "[" * levels + "1" + "]" * levels
    document = yamlfile.read_yaml(write(tmp_path, text))
    for _ in range(levels):
        assert isinstance(document, list)
        document = document[0]
    assert document == 1


def test_very_deep_nesting_does_not_escape_as_recursion_error(tmp_path: Path) -> None:
    text = "[" * 600 + "]" * 600
    with pytest.raises(InvalidFile, match="nested deeper"):
        yamlfile.read_yaml(write(tmp_path, text))


def test_self_referencing_alias_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidFile, match="nested deeper"):
        yamlfile.read_yaml(write(tmp_path, "&a [*a]\n"))


BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


@pytest.mark.timeout(10)
def test_billion_laughs_is_refused_quickly(tmp_path: Path) -> None:
    path = write(tmp_path, BILLION_LAUGHS)
    started = time.monotonic()
    with pytest.raises(InvalidFile, match="aliases") as info:
        yamlfile.read_yaml(path)
    assert time.monotonic() - started < 2.0
    assert str(yamlfile.MAX_ALIASES) in str(info.value)


def test_a_few_aliases_are_allowed(tmp_path: Path) -> None:
    text = "base: &b {port: 1}\n" + "".join(f"e{i}: *b\n" for i in range(yamlfile.MAX_ALIASES))
    document = yamlfile.read_yaml(write(tmp_path, text))
    assert isinstance(document, dict)
    assert document[f"e{yamlfile.MAX_ALIASES - 1}"] == {"port": 1}


def test_alias_count_is_per_document_not_per_process(tmp_path: Path) -> None:
    text = "base: &b 1\n" + "".join(f"e{i}: *b\n" for i in range(yamlfile.MAX_ALIASES))
    path = write(tmp_path, text)
    for _ in range(3):  # a class-level counter would trip on the second read
        assert isinstance(yamlfile.read_yaml(path), dict)


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("model: [unclosed\n", 2, 1),
        ("a: 1\nb: 2\n  c: 3\n", 3, 4),
        ("a: 1\n\tb: 2\n", 2, 1),
        ("key: 'unterminated\n", 2, 1),
    ],
)
def test_syntax_errors_report_line_and_column(tmp_path: Path, text: str, line: int, column: int) -> None:
    with pytest.raises(InvalidFile, match="YAML syntax error at line") as info:
        yamlfile.read_yaml(write(tmp_path, text))
    assert f"line {line}, column {column}:" in info.value.detail


@pytest.mark.parametrize(
    "text",
    ["a: 2001-02-30\n", "a: 2001-13-01\n", "!!int x\n", "!!float x\n", "!!timestamp x\n",
     "a: 2001-02-03 25:00:00\n", "!!int 0b\n", "a: " + "9" * 5000 + "\n"],
)
def test_bad_typed_scalars_are_invalid_files(tmp_path: Path, text: str) -> None:
    with pytest.raises(InvalidFile):
        yamlfile.read_yaml(write(tmp_path, text))


def test_python_tags_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidFile, match="constructor"):
        yamlfile.read_yaml(write(tmp_path, "!!python/object/apply:os.system ['true']\n"))


def test_directory_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "engines.yaml"
    folder.mkdir()
    with pytest.raises(InvalidFile, match="is a directory") as info:
        yamlfile.read_yaml(folder)
    assert info.value.path == str(folder)


@pytest.mark.timeout(10)
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "desired_state.yaml"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(InvalidFile, match="not a regular file"):
        yamlfile.read_yaml(fifo)
    assert time.monotonic() - started < 2.0


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "model: null\n")
    path.chmod(0)
    try:
        with pytest.raises(InvalidFile, match="permission denied"):
            yamlfile.read_yaml(path)
    finally:
        path.chmod(0o600)


def test_permission_error_is_an_invalid_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same path as above, simulated so it also runs as root."""
    path = write(tmp_path, "model: null\n")

    def denied(*_args: object, **_kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("reconciler.kit.yamlfile.os.open", denied)
    with pytest.raises(InvalidFile, match="permission denied"):
        yamlfile.read_yaml(path)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        yamlfile.read_yaml(tmp_path / "absent.yaml")


def test_missing_parent_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        yamlfile.read_yaml(tmp_path / "no" / "such" / "dir.yaml")


def test_invalid_file_is_a_value_error_with_path_and_detail() -> None:
    error = InvalidFile("/x/y.yaml", "broken")
    assert isinstance(error, ValueError)
    assert str(error) == "/x/y.yaml: broken"
    assert (error.path, error.detail) == ("/x/y.yaml", "broken")


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=4096))
def test_parse_of_any_bytes_returns_or_raises_invalid_file(data: bytes) -> None:
    try:
        yamlfile.parse(data, "fuzz.yaml")
    except InvalidFile as exc:
        assert exc.path == "fuzz.yaml"


YAMLISH = st.text(
    alphabet=st.sampled_from([*"ab01:-[]{},&*!?|>'\"#%@`\n\t .\\", "\x00", "\ufeff", "é"]),
    max_size=200,
)


@FAST
@given(st.one_of(st.text(max_size=2048), YAMLISH))
def test_parse_of_any_text_returns_or_raises_invalid_file(text: str) -> None:
    try:
        yamlfile.parse(text.encode("utf-8", "surrogatepass"), "fuzz.yaml")
    except InvalidFile as exc:
        assert exc.path == "fuzz.yaml"
