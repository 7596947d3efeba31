"""The engine catalog: which models exist, how to start each, and how to recognise its processes.

The catalog is the admin's file and the only source of commands: the desired state can
name an entry but never a command. What the reconciler may kill is decided in
reconciler/plan/ownership.py by the rules of docs/OWNERSHIP.md: its own recorded instances, and
strays that an entry recognises precisely (``strays``) and that get in the wanted engine's way.
"""

from __future__ import annotations

import os
import pwd
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from reconciler.kit import schemas, yamlfile
from reconciler.kit.schemas import InvalidFile

CONFIG_ENV = "AILAYER_CONFIG"
SYSTEM_CONFIG = Path("/etc/ailayer/engines.yaml")
LOCAL_CONFIG = Path("engines.yaml")

# The seed's 45 minutes: large models on slow disks take 30-40 minutes to load.
DEFAULT_BOOT_TIMEOUT_S = 2700.0
# One readiness request. Short on purpose: it bounds how long one pass waits on a hung
# engine, not how long a boot may take (that is boot_timeout_s).
DEFAULT_PROBE_TIMEOUT_S = 5.0
DEFAULT_PROBE_PERIOD_S = 1.0
# After READY: how often to check the engine is alive, how long one check may take, and
# how many failures in a row count as "stopped answering" (a busy engine may miss one).
# The phase leaves READY at the first failure; a hang is declared within
# period + threshold * timeout + (threshold - 1) * ready.period_s = 10 s by default.
DEFAULT_LIVENESS_PERIOD_S = 2.0
DEFAULT_LIVENESS_TIMEOUT_S = 2.0
DEFAULT_LIVENESS_FAILURES = 3
# CrashLoopBackOff-style restart delays, as in Kubernetes (10 s doubling to 5 min).
DEFAULT_BACKOFF_INITIAL_S = 10.0
DEFAULT_BACKOFF_MAX_S = 300.0
DEFAULT_RESYNC_INTERVAL_S = 5.0
DEFAULT_GATE_LISTEN = "127.0.0.1:8080"
DEFAULT_TOKEN_ENV = "AILAYER_TOKEN"  # noqa: S105 (a variable name, not a secret)
# Longest silence from an engine in the middle of a response. An hour: a generation may
# pause on a long prompt's prefill; what must never happen is a library default cutting it.
DEFAULT_GATE_READ_TIMEOUT_S = 3600.0
DEFAULT_GATE_CONNECT_TIMEOUT_S = 5.0
# From accepting a client's connection to its complete first request head: aiohttp has no
# header timeout, so a slowloris client held a connection for good (nginx's
# client_header_timeout is 60 s; a real client sends its head in one packet). After a
# response, aiohttp's keep-alive timer bounds the wait for the next head.
DEFAULT_CLIENT_HEADER_TIMEOUT_S = 15.0
# Longest silence inside a request body before the gate answers 408 (nginx's
# client_body_timeout is 60 s).
DEFAULT_CLIENT_BODY_IDLE_S = 30.0
# The reconciler writes a heartbeat every resync; three missed ones mean it is gone.
DEFAULT_STALE_AFTER_S = 30.0
# Wrong tokens one client address may send a minute before it gets 429 (reconciler/gate/auth.py):
# a person who mistypes is never stopped, a guesser gets 14,400 tries a day instead of ~1,000 a second.
DEFAULT_TOKEN_FAILURES_PER_MINUTE = 10
DEFAULT_LOG_FILE = Path("/var/log/ai_layer_activity.log")
# Engine output copied to the terminal and the activity log: an engine that floods its log
# (50 MB/s was seen in a review) must not fill the disk or hold the follower behind. A boot
# prints a few MB in bursts; steady serving, KB/s.
DEFAULT_ENGINE_LOG_BYTES_PER_S = 1 << 20
DEFAULT_ENGINE_LOG_BURST_BYTES = 32 << 20
# The activity log between two rotations (deploy/logrotate rotates daily).
DEFAULT_LOG_FILE_MAX_BYTES = 1 << 30
# Extra margin given to an engine's own load timeouts over our boot budget, so the
# engine never gives up before we do.
ENGINE_TIMEOUT_MARGIN_S = 300


@dataclass(frozen=True)
class Warmup:
    """A request that makes the engine actually load its model (Ollama loads lazily)."""

    url: str
    method: str = "POST"
    json: Any = None


@dataclass(frozen=True)
class JsonCheck:
    """Readiness also needs ``path`` in the JSON at ``url`` to contain ``equals``."""

    url: str
    path: str
    equals: str | int | float | bool


@dataclass(frozen=True)
class ReadyProbe:
    url: str
    status: int = 200
    timeout_s: float = DEFAULT_PROBE_TIMEOUT_S
    period_s: float = DEFAULT_PROBE_PERIOD_S
    warmup: Warmup | None = None
    json_check: JsonCheck | None = None


@dataclass(frozen=True)
class Strays:
    """How to recognise copies of an engine that ailayer did not start, and whose may die.

    ``argv``: argv prefixes. Element 0 is compared with the program: its basename, or the
    end of its path when the pattern has a '/', and ``{python}`` stands for any Python
    interpreter. Every other element must be equal. ``titles``: exact process titles
    (setproctitle), where ``T`` also matches ``T_<rank suffix>`` (``VLLM::Worker_TP1``).
    Never a substring of the command line: that made root kill ``tail -f 'vllm serve.log'``.
    ``uids``: only strays running as one of these users are ever killed.
    """

    argv: tuple[tuple[str, ...], ...] = ()
    titles: tuple[str, ...] = ()
    uids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Engine:
    name: str
    kind: str
    command: tuple[str, ...]
    env: Mapping[str, str]
    port: int
    host: str
    served_name: str
    boot_timeout_s: float
    ready: ReadyProbe
    strays: Strays = field(default_factory=Strays)
    cwd: str | None = None
    liveness_period_s: float = DEFAULT_LIVENESS_PERIOD_S
    liveness_timeout_s: float = DEFAULT_LIVENESS_TIMEOUT_S
    liveness_failures: int = DEFAULT_LIVENESS_FAILURES
    backoff_initial_s: float = DEFAULT_BACKOFF_INITIAL_S
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_S

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def url(self, path_or_url: str) -> str:
        return path_or_url if "://" in path_or_url else self.base_url + path_or_url

    @property
    def probe_paths(self) -> frozenset[str]:
        """The URL paths our readiness and liveness checks GET (their access lines are ours)."""
        urls = [self.ready.url] + ([self.ready.json_check.url] if self.ready.json_check else [])
        return frozenset(urlsplit(u).path or "/" for u in urls)


@dataclass(frozen=True)
class GateConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    token_env: str = DEFAULT_TOKEN_ENV  # never handed on to an engine (reconciler/act/spawn.py)
    # Host header names the gate answers besides loopback and its listen address ("*": any).
    allowed_hosts: tuple[str, ...] = ()
    token: str | None = None
    read_timeout_s: float | None = DEFAULT_GATE_READ_TIMEOUT_S
    connect_timeout_s: float = DEFAULT_GATE_CONNECT_TIMEOUT_S
    stale_after_s: float = DEFAULT_STALE_AFTER_S
    client_header_timeout_s: float = DEFAULT_CLIENT_HEADER_TIMEOUT_S
    client_body_idle_s: float = DEFAULT_CLIENT_BODY_IDLE_S
    workers: int | None = None  # gate worker processes; None: reconciler.gate.workers.default_workers()
    token_failures_per_minute: int = DEFAULT_TOKEN_FAILURES_PER_MINUTE


IDENTITY_MODES = ("auto", "cgroup", "record")


@dataclass(frozen=True)
class Identity:
    """How engine instances are told apart: see reconciler/act/records.py and docs/OWNERSHIP.md."""

    mode: str = "auto"  # one of IDENTITY_MODES
    cgroup_parent: Path | None = None  # where instance cgroups go; default: beside our own


@dataclass(frozen=True)
class LogLimits:
    """Bounds on engine output copied to the terminal and the activity log (None: no bound)."""

    engine_bytes_per_s: int | None = DEFAULT_ENGINE_LOG_BYTES_PER_S
    engine_burst_bytes: int = DEFAULT_ENGINE_LOG_BURST_BYTES
    file_max_bytes: int | None = DEFAULT_LOG_FILE_MAX_BYTES


@dataclass(frozen=True)
class Catalog:
    source: str
    """Where it came from, e.g. '--config /etc/x.yaml' or 'built-in demo catalog'."""
    desired_path: Path
    state_dir: Path
    log_file: Path
    engines: Mapping[str, Engine]
    gate: GateConfig = field(default_factory=GateConfig)
    resync_interval_s: float = DEFAULT_RESYNC_INTERVAL_S
    identity: Identity = field(default_factory=Identity)
    log_level: str = "info"  # our own events below it are not logged (reconciler/kit/logs.py)
    log_probe_lines: bool = False  # keep the engines' access lines for our readiness probes
    log_limits: LogLimits = field(default_factory=LogLimits)
    resume_after_reboot: bool = False  # after a reboot, load the model chosen before it
    path: Path | None = None
    """The catalog file, re-read by the loop when it changes; None for the demo."""

    @property
    def observed_path(self) -> Path:
        return self.state_dir / "observed_state.json"

    def names(self) -> list[str]:
        return sorted(self.engines)


def _kind_defaults(kind: str, served_name: str, boot_timeout_s: float) -> dict[str, Any]:
    """What a kind supplies so a real catalog entry stays a few lines long."""
    engine_timeout = str(int(boot_timeout_s) + ENGINE_TIMEOUT_MARGIN_S)
    if kind == "vllm":
        return {
            "ready": {"url": "/health"},
            "strays": {
                "argv": [["vllm", "serve"], ["{python}", "-m", "vllm.entrypoints.openai.api_server"],
                         ["{python}", "-m", "vllm.entrypoints.cli.main", "serve"]],
                # vllm/utils/system_utils.py set_process_title: "VLLM::<name>[_<ranks>]"
                "titles": ["VLLM::EngineCore", "VLLM::Worker", "VLLM::APIServer", "VLLM::DPCoordinator"],
            },
            # vLLM gives up waiting for its engine core after 600 s by default.
            "env": {"VLLM_ENGINE_READY_TIMEOUT_S": engine_timeout},
        }
    if kind == "ollama":
        return {
            "ready": {
                "url": "/api/version",
                # Ollama loads a model only when asked; keep_alive -1 keeps it loaded.
                "warmup": {"url": "/api/generate", "json": {"model": served_name, "keep_alive": -1}},
                "json_check": {"url": "/api/ps", "path": "models.*.name", "equals": served_name},
            },
            # v0.30+ runs <prefix>/lib/ollama/llama-server per model; older: "ollama runner",
            # and before that ollama_llama_server.
            "strays": {"argv": [["ollama", "serve"], ["ollama", "runner"], ["ollama_llama_server"],
                                ["lib/ollama/llama-server"]], "users": ["ollama"]},
            # OLLAMA_LOAD_TIMEOUT (default 5 min) aborts a slow load; OLLAMA_HOST sets the port.
            "env": {"OLLAMA_LOAD_TIMEOUT": f"{engine_timeout}s", "OLLAMA_KEEP_ALIVE": "-1"},
        }
    if kind == "llamacpp":
        return {"ready": {"url": "/health"},
                "strays": {"argv": [["llama-server"], ["{python}", "-m", "reconciler.engines.llamacpp", "serve"]]}}
    return {"ready": {"url": "/health"}}


def _substitute(arg: str, values: Mapping[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


def _uid_of(user: str | int, source: str, explicit: bool) -> int | None:
    """A user name or uid; a kind's default user that does not exist here is skipped."""
    if isinstance(user, int):
        return user
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        if explicit:
            raise InvalidFile(source, f"strays.users: no user named {user!r} on this machine") from None
        return None


def _own_pattern(command: list[str], values: Mapping[str, str]) -> tuple[str, ...]:
    """The entry's command up to its ``{port}`` argument: a copy of this engine on this port,
    whatever tuning flags follow; the whole command when it names no port."""
    ends = [i for i, arg in enumerate(command) if "{port}" in arg]
    head = command[:ends[0] + 1] if ends else command
    return tuple(_substitute(a, values) for a in head)


def _strays(raw: Mapping[str, Any], defaults: Mapping[str, Any], own: tuple[str, ...],
            values: Mapping[str, str], source: str) -> Strays:
    """The entry's own command always recognises its copies; the kind adds known forms."""
    given = raw.get("strays", {})
    argv = [tuple(_substitute(a, values) for a in pattern)
            for pattern in given.get("argv", defaults.get("argv", []))]
    users: list[str | int] = ["root", os.geteuid(), *defaults.get("users", [])]
    uids = {_uid_of(u, source, explicit=False) for u in users}
    uids |= {_uid_of(u, source, explicit=True) for u in given.get("users", [])}
    return Strays(
        argv=tuple(dict.fromkeys([own, *argv])),
        titles=tuple(_substitute(t, values) for t in given.get("titles", defaults.get("titles", []))),
        uids=frozenset(u for u in uids if u is not None),
    )


def _engine(name: str, raw: Mapping[str, Any], source: str) -> Engine:
    kind = raw.get("kind", "generic")
    port = int(raw["port"])
    host = str(raw.get("host", "127.0.0.1"))
    served_name = str(raw.get("served_name", name))
    boot = float(raw.get("boot_timeout_s", DEFAULT_BOOT_TIMEOUT_S))
    defaults = _kind_defaults(kind, served_name, boot)
    values = {"port": str(port), "host": host, "python": sys.executable, "served_name": served_name}
    pattern_values = {k: v for k, v in values.items() if k != "python"}  # {python}: any interpreter
    env = {k: _substitute(str(v), values) for k, v in defaults.get("env", {}).items()}
    if kind == "ollama":
        env["OLLAMA_HOST"] = f"{host}:{port}"
    env.update({k: _substitute(str(v).lower() if isinstance(v, bool) else str(v), values)
                for k, v in raw.get("env", {}).items()})
    ready_raw = {**defaults["ready"], **raw.get("ready", {})}
    warm = ready_raw.get("warmup")
    check = ready_raw.get("json_check")
    ready = ReadyProbe(
        url=ready_raw["url"],
        status=int(ready_raw.get("status", 200)),
        timeout_s=float(ready_raw.get("timeout_s", DEFAULT_PROBE_TIMEOUT_S)),
        period_s=float(ready_raw.get("period_s", DEFAULT_PROBE_PERIOD_S)),
        warmup=Warmup(warm["url"], warm.get("method", "POST"), warm.get("json")) if warm else None,
        json_check=JsonCheck(check["url"], check["path"], check["equals"]) if check else None,
    )
    live = raw.get("liveness", {})
    backoff = raw.get("restart_backoff", {})
    return Engine(
        name=name,
        kind=kind,
        command=tuple(_substitute(a, values) for a in raw["command"]),
        env=env,
        port=port,
        host=host,
        served_name=served_name,
        boot_timeout_s=boot,
        ready=ready,
        strays=_strays(raw, defaults.get("strays", {}), _own_pattern(raw["command"], pattern_values),
                       pattern_values, source),
        cwd=raw.get("cwd"),
        liveness_period_s=float(live.get("period_s", DEFAULT_LIVENESS_PERIOD_S)),
        liveness_timeout_s=float(live.get("timeout_s", DEFAULT_LIVENESS_TIMEOUT_S)),
        liveness_failures=int(live.get("failure_threshold", DEFAULT_LIVENESS_FAILURES)),
        backoff_initial_s=float(backoff.get("initial_s", DEFAULT_BACKOFF_INITIAL_S)),
        backoff_max_s=float(backoff.get("max_s", DEFAULT_BACKOFF_MAX_S)),
    )


def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _gate(raw: Mapping[str, Any]) -> GateConfig:
    host, port = _split_listen(raw.get("listen", DEFAULT_GATE_LISTEN))
    token_env = str(raw.get("token_env", DEFAULT_TOKEN_ENV))
    token = raw.get("token") or os.environ.get(token_env) or None
    return GateConfig(
        host=host,
        token_env=token_env,
        port=port,
        token=token,
        read_timeout_s=raw.get("read_timeout_s", DEFAULT_GATE_READ_TIMEOUT_S),
        connect_timeout_s=float(raw.get("connect_timeout_s", DEFAULT_GATE_CONNECT_TIMEOUT_S)),
        stale_after_s=float(raw.get("stale_after_s", DEFAULT_STALE_AFTER_S)),
        client_header_timeout_s=float(raw.get("client_header_timeout_s", DEFAULT_CLIENT_HEADER_TIMEOUT_S)),
        client_body_idle_s=float(raw.get("client_body_idle_s", DEFAULT_CLIENT_BODY_IDLE_S)),
        allowed_hosts=tuple(str(h).lower() for h in raw.get("allowed_hosts", ())),
        workers=int(raw["workers"]) if "workers" in raw else None,
        token_failures_per_minute=int(raw.get("token_failures_per_minute", DEFAULT_TOKEN_FAILURES_PER_MINUTE)),
    )


def _refuse_match(document: object, source: str) -> None:
    """``match`` substrings are gone; say so plainly rather than "additional property"."""
    engines = document.get("engines") if isinstance(document, dict) else None
    for name, raw in (engines.items() if isinstance(engines, dict) else ()):
        if isinstance(raw, dict) and "match" in raw:
            raise InvalidFile(source, f"engines.{name}.match was replaced by engines.{name}.strays "
                              "(argv prefixes and exact process titles; a command-line substring "
                              "matched bystanders): see docs/OWNERSHIP.md")


def from_document(document: object, source: str, base: Path) -> Catalog:
    """Validate and build. Relative paths are relative to ``base`` (the config's folder)."""
    _refuse_match(document, source)
    schemas.validate("catalog", document, source)
    assert isinstance(document, dict)
    engines = {name: _engine(name, raw, source) for name, raw in document["engines"].items()}

    def path(key: str, default: Path) -> Path:
        try:
            value = Path(document.get(key, default)).expanduser()
        except RuntimeError as exc:  # "~nosuchuser/x": expanduser cannot find the home directory
            raise InvalidFile(source, f"field '{key}': {exc}") from None
        return value if value.is_absolute() else (base / value)

    return Catalog(
        source=source,
        desired_path=path("desired_state", Path("desired_state.yaml")),
        state_dir=path("state_dir", Path("run")),
        log_file=path("log_file", DEFAULT_LOG_FILE),
        engines=engines,
        gate=_gate(document.get("gate", {})),
        resync_interval_s=float(document.get("resync_interval_s", DEFAULT_RESYNC_INTERVAL_S)),
        log_level=str(document.get("log_level", "info")),
        log_probe_lines=bool(document.get("log_probe_lines", False)),
        log_limits=_log_limits(document.get("log_limits", {})),
        resume_after_reboot=bool(document.get("resume_after_reboot", False)),
        identity=_identity(document.get("identity", {})),
    )


def _log_limits(raw: Mapping[str, Any]) -> LogLimits:
    defaults = LogLimits()
    return LogLimits(engine_bytes_per_s=raw.get("engine_bytes_per_s", defaults.engine_bytes_per_s),
                     engine_burst_bytes=raw.get("engine_burst_bytes", defaults.engine_burst_bytes),
                     file_max_bytes=raw.get("file_max_bytes", defaults.file_max_bytes))


def _identity(raw: Mapping[str, Any]) -> Identity:
    parent = raw.get("cgroup_parent")
    return Identity(mode=str(raw.get("mode", "auto")), cgroup_parent=Path(parent) if parent else None)


def load_file(path: Path, how: str) -> Catalog:
    try:
        document = yamlfile.read_yaml(path)
    except FileNotFoundError:
        raise InvalidFile(path, "not found") from None
    catalog = from_document(document, f"{how} {path}", path.resolve().parent)
    return replace(catalog, path=path)


class CatalogSource:
    """The catalog file, re-read when it changes (the loop, the gate); a broken edit keeps the
    last good catalog."""

    def __init__(self, catalog: Catalog, path: Path | None) -> None:
        self.catalog = catalog
        self.path = path
        self._stamp = self._stat()
        self.error: str | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return (-1, -1, -1)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when a new good catalog is in place."""
        stamp = self._stat()
        if self.path is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            new = load_file(self.path, self.catalog.source.split(" ")[0])
        except InvalidFile as exc:
            self.error = f"{exc} (keeping the last good catalog)"
            return False
        # Where files live is fixed for the life of the loop; only engines may change.
        self.catalog = replace(self.catalog, engines=new.engines, gate=new.gate,
                               resync_interval_s=new.resync_interval_s, log_level=new.log_level,
                               log_probe_lines=new.log_probe_lines, log_limits=new.log_limits,
                               resume_after_reboot=new.resume_after_reboot)
        self.error = None
        return True



def demo_document() -> dict[str, Any]:
    """The embedded default: the demo engines, on ports that don't clash with real ones.

    Its desired state lives in the state dir (./run, ignored by git): `ailayer up` and
    `ailayer toggle` from a checkout never rewrite the tracked desired_state.yaml.
    """
    return {
        "desired_state": "run/desired_state.yaml",
        "engines": {
            "gpt-oss": {
                "kind": "vllm",
                "command": ["{python}", "-m", "reconciler.engines.demo.vllm_like", "serve",
                            "openai/gpt-oss-20b", "--host", "{host}", "--port", "{port}"],
                "port": 18000,
                "served_name": "openai/gpt-oss-20b",
                # Only the entry's own command (port included): two demos never touch each other.
                "strays": {"argv": [], "titles": []},
            },
            "gemma2": {
                "kind": "ollama",
                "command": ["{python}", "-m", "reconciler.engines.demo.ollama_like", "serve",
                            "--host", "{host}", "--port", "{port}", "--models", "gemma2:9b"],
                "port": 18434,
                "served_name": "gemma2:9b",
                "strays": {"argv": [], "titles": []},
            },
        }
    }


def demo(base: Path | None = None) -> Catalog:
    return from_document(demo_document(), "built-in demo catalog", base or Path.cwd())


def resolve(config: Path | None, use_demo: bool = False) -> Catalog:
    """--config, else $AILAYER_CONFIG, else ./engines.yaml, else /etc/ailayer, else the demo."""
    if use_demo:
        return demo()
    if config is not None:
        return load_file(config, "--config")
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return load_file(Path(from_env), f"${CONFIG_ENV}")
    if LOCAL_CONFIG.is_file():
        return load_file(LOCAL_CONFIG, "./engines.yaml")
    if SYSTEM_CONFIG.is_file():
        return load_file(SYSTEM_CONFIG, "system config")
    return demo()
