"""The engine catalog: defaults per kind, substitution, paths, resolution order, clear errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.domain import catalog
from reconciler.domain.catalog import Engine
from reconciler.kit import schemas
from reconciler.kit.schemas import InvalidFile

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted([*REPO.glob("examples/*.yaml"), *REPO.glob("examples/*.yml")])


def engine_doc(**extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"command": ["/bin/engine", "--port", "{port}"], "port": 9000}
    entry.update(extra)
    return entry


def write_catalog(path: Path, engines: dict[str, Any], **top: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"engines": engines, **top}), encoding="utf-8")
    return path


def build(raw: dict[str, Any], name: str = "m", base: Path = Path("/srv")) -> Engine:
    return catalog.from_document({"engines": {name: raw}}, "test", base).engines[name]


# --- the demo ------------------------------------------------------------------------------


def test_demo_catalog_loads_and_validates(tmp_path: Path) -> None:
    schemas.validate("catalog", catalog.demo_document(), "demo")
    demo = catalog.demo(tmp_path)
    assert demo.names() == ["gemma2", "gpt-oss"]
    assert demo.path is None
    assert demo.source == "built-in demo catalog"
    assert demo.desired_path == tmp_path / "run" / "desired_state.yaml"  # never the tracked one
    assert demo.state_dir == tmp_path / "run"
    assert demo.observed_path == tmp_path / "run" / "observed_state.json"
    assert demo.engines["gpt-oss"].command[0] == sys.executable
    assert demo.engines["gemma2"].served_name == "gemma2:9b"
    assert demo.engines["gpt-oss"].base_url == "http://127.0.0.1:18000"


def test_demo_ports_do_not_clash_with_real_engines() -> None:
    ports = {e.port for e in catalog.demo().engines.values()}
    assert ports.isdisjoint({8000, 11434, 8080})
    assert len(ports) == 2


# --- kind defaults -------------------------------------------------------------------------


def test_vllm_defaults() -> None:
    engine = build(engine_doc(kind="vllm", served_name="org/model"))
    assert engine.ready.url == "/health"
    assert engine.ready.warmup is None and engine.ready.json_check is None
    assert engine.strays.argv == (("/bin/engine", "--port", "9000"), ("vllm", "serve"),
                                  ("{python}", "-m", "vllm.entrypoints.openai.api_server"),
                                  ("{python}", "-m", "vllm.entrypoints.cli.main", "serve"))
    assert "VLLM::EngineCore" in engine.strays.titles and "VLLM::Worker" in engine.strays.titles
    assert int(engine.env["VLLM_ENGINE_READY_TIMEOUT_S"]) > engine.boot_timeout_s
    assert engine.url(engine.ready.url) == "http://127.0.0.1:9000/health"


def test_vllm_engine_timeout_follows_a_custom_boot_budget() -> None:
    engine = build(engine_doc(kind="vllm", boot_timeout_s=5000))
    assert engine.boot_timeout_s == 5000
    assert int(engine.env["VLLM_ENGINE_READY_TIMEOUT_S"]) > 5000


def test_ollama_defaults() -> None:
    engine = build(engine_doc(kind="ollama", served_name="gemma2:9b", host="0.0.0.0", port=11500))
    ready = engine.ready
    assert ready.warmup is not None
    assert ready.warmup.method == "POST"
    assert ready.warmup.json == {"model": "gemma2:9b", "keep_alive": -1}
    assert ready.json_check is not None
    assert ready.json_check.url == "/api/ps"
    assert ready.json_check.path == "models.*.name"
    assert ready.json_check.equals == "gemma2:9b"
    assert engine.env["OLLAMA_HOST"] == "0.0.0.0:11500"
    load_timeout = engine.env["OLLAMA_LOAD_TIMEOUT"]
    assert load_timeout.endswith("s")
    assert int(load_timeout[:-1]) > engine.boot_timeout_s
    assert engine.strays.argv == (("/bin/engine", "--port", "11500"), ("ollama", "serve"), ("ollama", "runner"),
                                  ("ollama_llama_server",), ("lib/ollama/llama-server",))


def test_ollama_served_name_defaults_to_the_catalog_name() -> None:
    engine = build(engine_doc(kind="ollama"), name="llama3:8b")
    assert engine.served_name == "llama3:8b"
    assert engine.ready.json_check is not None and engine.ready.json_check.equals == "llama3:8b"


def test_explicit_strays_replace_the_kind_patterns_but_keep_the_own_command() -> None:
    engine = build(engine_doc(kind="vllm", strays={"argv": [["my-wrapper.sh", "{port}"]], "titles": []}))
    assert engine.strays.argv == (("/bin/engine", "--port", "9000"), ("my-wrapper.sh", "9000"))
    assert engine.strays.titles == ()


def test_own_command_pattern_keeps_python_as_any_interpreter() -> None:
    engine = build(engine_doc(command=["{python}", "-m", "x", "--port", "{port}"]))
    assert engine.strays.argv == (("{python}", "-m", "x", "--port", "9000"),)


def test_match_is_refused_with_a_pointer_to_strays() -> None:
    with pytest.raises(InvalidFile, match=r"engines\.m\.match was replaced by engines\.m\.strays"):
        build(engine_doc(match=["vllm serve"]))


def test_strays_users_default_to_root_and_self_and_unknown_users_are_errors() -> None:
    engine = build(engine_doc())
    assert {0, os.geteuid()} <= engine.strays.uids
    assert build(engine_doc(strays={"users": [4242]})).strays.uids >= {4242}
    with pytest.raises(InvalidFile, match="no user named 'no-such-user-x'"):
        build(engine_doc(strays={"users": ["no-such-user-x"]}))


def test_identity_mode_and_cgroup_parent() -> None:
    doc = {"engines": {"m": engine_doc()}, "identity": {"mode": "record", "cgroup_parent": "/sys/fs/cgroup/x"}}
    built = catalog.from_document(doc, "test", Path("/srv"))
    assert built.identity == catalog.Identity("record", Path("/sys/fs/cgroup/x"))
    with pytest.raises(InvalidFile):
        catalog.from_document({**doc, "identity": {"mode": "sometimes"}}, "test", Path("/srv"))


def test_explicit_ready_overrides_only_what_it_names() -> None:
    engine = build(engine_doc(kind="ollama", ready={"url": "/api/tags", "timeout_s": 2}))
    assert engine.ready.url == "/api/tags"
    assert engine.ready.timeout_s == 2
    assert engine.ready.json_check is not None  # the kind's check stays


def test_explicit_env_wins_over_kind_env_and_is_substituted() -> None:
    engine = build(engine_doc(kind="vllm", env={"VLLM_ENGINE_READY_TIMEOUT_S": 1, "FLAG": True,
                                                "URL": "http://{host}:{port}"}))
    assert engine.env["VLLM_ENGINE_READY_TIMEOUT_S"] == "1"
    assert engine.env["FLAG"] == "true"
    assert engine.env["URL"] == "http://127.0.0.1:9000"


def test_generic_and_llamacpp_defaults() -> None:
    generic = build(engine_doc())
    assert generic.kind == "generic"
    assert generic.ready.url == "/health"
    assert generic.strays.argv == (("/bin/engine", "--port", "9000"),) and generic.strays.titles == ()
    assert dict(generic.env) == {}
    llama = build(engine_doc(kind="llamacpp"))
    assert ("llama-server",) in llama.strays.argv


def test_boot_timeout_defaults_to_45_minutes() -> None:
    assert build(engine_doc()).boot_timeout_s == 2700.0
    assert catalog.DEFAULT_BOOT_TIMEOUT_S == 2700.0


def test_liveness_and_backoff_settings() -> None:
    engine = build(engine_doc(liveness={"period_s": 2, "failure_threshold": 5},
                              restart_backoff={"initial_s": 1, "max_s": 8}))
    assert (engine.liveness_period_s, engine.liveness_failures) == (2.0, 5)
    assert (engine.backoff_initial_s, engine.backoff_max_s) == (1.0, 8.0)
    default = build(engine_doc())
    assert default.backoff_initial_s == catalog.DEFAULT_BACKOFF_INITIAL_S
    assert default.liveness_failures == catalog.DEFAULT_LIVENESS_FAILURES


# --- substitution --------------------------------------------------------------------------


def test_port_host_python_and_served_name_are_substituted_in_the_command() -> None:
    engine = build(engine_doc(
        command=["{python}", "-m", "srv", "--host", "{host}", "--port={port}", "{served_name}", "{other}"],
        host="10.0.0.5", port=8123, served_name="org/x"))
    assert engine.command == (sys.executable, "-m", "srv", "--host", "10.0.0.5", "--port=8123", "org/x",
                              "{other}")


def test_ipv6_host_is_bracketed_in_urls() -> None:
    engine = build(engine_doc(host="::1", port=8001))
    assert engine.base_url == "http://[::1]:8001"
    assert engine.url("http://elsewhere/x") == "http://elsewhere/x"


# --- paths ---------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_catalog(tmp_path / "conf" / "engines.yaml", {"m": engine_doc()},
                           desired_state="wish.yaml", state_dir="state", log_file="logs/a.log")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = catalog.load_file(Path("../conf/engines.yaml"), "--config")
    folder = config.parent.resolve()
    assert loaded.desired_path == folder / "wish.yaml"
    assert loaded.state_dir == folder / "state"
    assert loaded.log_file == folder / "logs" / "a.log"
    assert loaded.path == Path("../conf/engines.yaml")


def test_default_paths_sit_beside_the_config(tmp_path: Path) -> None:
    config = write_catalog(tmp_path / "engines.yaml", {"m": engine_doc()})
    loaded = catalog.load_file(config, "--config")
    assert loaded.desired_path == tmp_path.resolve() / "desired_state.yaml"
    assert loaded.state_dir == tmp_path.resolve() / "run"
    assert loaded.log_file == catalog.DEFAULT_LOG_FILE


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    config = write_catalog(tmp_path / "engines.yaml", {"m": engine_doc()},
                           state_dir=str(tmp_path / "abs-state"))
    assert catalog.load_file(config, "--config").state_dir == tmp_path / "abs-state"


# --- resolution order ----------------------------------------------------------------------


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """One catalog per source, each with a distinct engine name; cwd is a scratch folder."""
    cwd = tmp_path / "cwd"
    paths = {
        "flag": write_catalog(tmp_path / "flag.yaml", {"from-flag": engine_doc()}),
        "env": write_catalog(tmp_path / "env.yaml", {"from-env": engine_doc()}),
        "local": write_catalog(cwd / "engines.yaml", {"from-local": engine_doc()}),
        "system": write_catalog(tmp_path / "etc" / "engines.yaml", {"from-system": engine_doc()}),
    }
    monkeypatch.chdir(cwd)
    monkeypatch.setenv(catalog.CONFIG_ENV, str(paths["env"]))
    monkeypatch.setattr(catalog, "SYSTEM_CONFIG", paths["system"])
    return paths


def test_config_flag_wins(places: dict[str, Path]) -> None:
    loaded = catalog.resolve(places["flag"])
    assert loaded.names() == ["from-flag"]
    assert loaded.source == f"--config {places['flag']}"


def test_env_comes_second(places: dict[str, Path]) -> None:
    loaded = catalog.resolve(None)
    assert loaded.names() == ["from-env"]
    assert loaded.source.startswith(f"${catalog.CONFIG_ENV} ")


def test_local_engines_yaml_comes_third(places: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(catalog.CONFIG_ENV)
    loaded = catalog.resolve(None)
    assert loaded.names() == ["from-local"]
    assert loaded.source.startswith("./engines.yaml")


def test_empty_env_is_ignored(places: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(catalog.CONFIG_ENV, "")
    assert catalog.resolve(None).names() == ["from-local"]


def test_system_config_comes_fourth(places: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(catalog.CONFIG_ENV)
    places["local"].unlink()
    loaded = catalog.resolve(None)
    assert loaded.names() == ["from-system"]
    assert loaded.source.startswith("system config")


def test_demo_comes_last(places: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(catalog.CONFIG_ENV)
    places["local"].unlink()
    places["system"].unlink()
    loaded = catalog.resolve(None)
    assert loaded.source == "built-in demo catalog"
    assert loaded.names() == ["gemma2", "gpt-oss"]


def test_use_demo_overrides_everything(places: dict[str, Path]) -> None:
    assert catalog.resolve(places["flag"], use_demo=True).source == "built-in demo catalog"


def test_a_named_config_that_is_missing_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(InvalidFile, match="not found") as info:
        catalog.resolve(missing)
    assert str(missing) in str(info.value)


def test_env_config_that_is_missing_is_an_error_not_the_demo(places: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(catalog.CONFIG_ENV, str(places["env"].with_name("gone.yaml")))
    with pytest.raises(InvalidFile, match="not found"):
        catalog.resolve(None)


# --- errors --------------------------------------------------------------------------------


def load_error(tmp_path: Path, text: str) -> tuple[Path, str]:
    path = tmp_path / "engines.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InvalidFile) as info:
        catalog.load_file(path, "--config")
    return path, str(info.value)


@pytest.mark.parametrize(
    ("text", "field", "hint"),
    [
        ("engines:\n  x:\n    command: 'vllm serve m --port 1'\n    port: 1\n",
         "engines.x.command", "expected array, found a string"),
        ("engines:\n  x:\n    command: [a]\n", "engines.x", "missing required field 'port'"),
        ("engines:\n  x:\n    command: [a]\n    port: 70000\n", "engines.x.port", "must be <= 65535"),
        ("engines:\n  x:\n    command: [a]\n    port: 1\nbogus: 1\n", "(top level)", "'bogus'"),
        ("engines:\n  '../x':\n    command: [a]\n    port: 1\n", "engines", "must match ^[A-Za-z0-9]"),
        ("engines:\n  'a b':\n    command: [a]\n    port: 1\n", "engines", "must match ^[A-Za-z0-9]"),
        ("engines:\n  x:\n    command: [a]\n    port: 1\n    shell: true\n", "engines.x", "'shell'"),
        ("engines:\n  x:\n    command: []\n    port: 1\n", "engines.x.command", "violates minItems 1"),
        ("engines:\n  x:\n    command: [a]\n    port: 1\n    kind: docker\n", "engines.x.kind", "must be one of"),
        ("engines:\n  x:\n    command: [a]\n    port: 1\n    ready: {url: health}\n",
         "engines.x.ready.url", "must match ^(https?://|/)"),
        ("engines: {}\n", "engines", "violates minProperties 1"),
        ("engines:\n  x:\n    command: [a]\n    port: 1\ngate: {listen: 'nohost'}\n",
         "gate.listen", "gate.listen': must match"),
    ],
    ids=["shell-string", "no-port", "port-range", "top-level-key", "path-name", "space-name",
         "engine-key", "empty-command", "unknown-kind", "relative-url", "no-engines", "bad-listen"],
)
def test_errors_name_the_file_and_the_field(tmp_path: Path, text: str, field: str, hint: str) -> None:
    path, message = load_error(tmp_path, text)
    assert str(path) in message
    assert f"field '{field}'" in message
    assert hint in message


@pytest.mark.parametrize("text", ["", "null\n", "- a\n- b\n", "engines: [a]\n"])
def test_documents_of_the_wrong_shape_are_refused(tmp_path: Path, text: str) -> None:
    path, message = load_error(tmp_path, text)
    assert str(path) in message


def test_yaml_errors_surface_as_invalid_file_with_the_path(tmp_path: Path) -> None:
    path, message = load_error(tmp_path, "engines:\n  x: [unclosed\n")
    assert str(path) in message
    assert "line" in message


def test_gate_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_TOKEN", "t" * 20)
    config = write_catalog(tmp_path / "engines.yaml", {"m": engine_doc()},
                           gate={"listen": "[::1]:9090", "token_env": "MY_TOKEN", "read_timeout_s": None})
    gate = catalog.load_file(config, "--config").gate
    assert (gate.host, gate.port) == ("::1", 9090)
    assert gate.token == "t" * 20
    assert gate.read_timeout_s is None


def test_gate_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(catalog.DEFAULT_TOKEN_ENV, raising=False)
    gate = catalog.demo().gate
    assert (gate.host, gate.port) == ("127.0.0.1", 8080)
    assert gate.token is None
    assert gate.read_timeout_s == catalog.DEFAULT_GATE_READ_TIMEOUT_S


# --- shipped examples ----------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES or [None], ids=[p.name for p in EXAMPLES] or ["none-yet"])
def test_every_example_catalog_loads(path: Path | None) -> None:
    if path is None:
        pytest.skip("no examples/*.yaml yet")
    loaded = catalog.load_file(path, "example")
    assert loaded.engines
    for engine in loaded.engines.values():
        assert engine.command
        assert 1 <= engine.port <= 65535


@pytest.mark.parametrize(("field", "value"), [
    ("boot_timeout_s", 1e12),  # raised "year out of range" on every pass
    ("env", {"A": "x\x00y"}),  # raised "embedded null byte" on every pass
    ("command", ["/bin/engine", "--port", "{port}", "a\x00b"]),
    ("liveness", {"period_s": 1e9}),
])
def test_values_that_would_fail_every_pass_are_rejected_at_validation(field: str, value: object) -> None:
    with pytest.raises(InvalidFile, match=f"field 'engines.m.{field}"):
        build(engine_doc(**{field: value}))
