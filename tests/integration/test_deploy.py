"""The deployment files in deploy/, checked as far as a machine without systemd or a cluster
allows: systemd-analyze verify (units and the Ollama drop-in), logrotate (a dry run of the
shipped file, and a real rotation under a writing ActivityLog), and the Kubernetes example's
own consistency plus its catalog through ailayer's schema. nginx: tests/e2e/test_nginx.py.

Without systemd-analyze or logrotate these skip, except with CI=true (.ci/run installs
them), where they fail.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.domain.catalog import from_document
from reconciler.kit.logs import ROTATE_CHECK_S, ActivityLog
from tests.helpers import DEADLINE_S, PY, REPO, wait_until

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "ailayer.service"
OLLAMA_DROPIN = DEPLOY / "systemd" / "ollama.service.d" / "ailayer.conf"
LOGROTATE = DEPLOY / "logrotate" / "ailayer"
KUBE = DEPLOY / "kubernetes" / "ailayer.yaml"
INSTALLED_AT = "/opt/ailayer/.venv/bin/ailayer"
# One run of a checking tool.
TOOL_TIMEOUT_S = 60.0


def _tool(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}",) if Path(p).exists()), None)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed (.ci/run installs it with apt-get)")
        pytest.skip(f"{name} is not installed")
    return found


def _settings(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def _verify(unit: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("systemd-analyze"), "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                          env={**os.environ, **(env or {})})


def test_the_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify, with ExecStart at this checkout's ailayer (it checks the file).

    systemd-analyze reports bad settings as "…, ignoring" on stderr and still exits 0, so any
    output fails the test.
    """
    script = Path(PY).parent / "ailayer"
    if not script.is_file():
        pytest.skip(f"no installed ailayer script at {script}")
    text = UNIT.read_text()
    assert text.count(INSTALLED_AT) == 1
    unit = tmp_path / "ailayer.service"
    unit.write_text(text.replace(INSTALLED_AT, str(script)))
    result = _verify(unit)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    broken = tmp_path / "broken" / "ailayer.service"
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace("KillMode=process", "KillMode=sometimes"))
    assert "KillMode" in _verify(broken).stderr or "kill mode" in _verify(broken).stderr  # it does look


def test_the_unit_keeps_engines_across_a_restart_and_says_when_ready() -> None:
    """The settings docs/DEPLOY.md explains, and the command line they need."""
    settings = _settings(UNIT)
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    assert settings["KillMode"] == ["process"]  # control-group (the default) and mixed kill engines
    assert settings["Delegate"] == ["yes"]  # instance cgroups below the unit's (cgroup mode)
    assert int(settings["LimitNOFILE"][0]) >= 65536
    command = settings["ExecStart"][0].split()
    assert command[1:3] == ["up", "--config"] and "--no-stop-on-exit" in command
    help_text = subprocess.run([PY, "-m", "reconciler", "up", "--help"], capture_output=True, text=True,
                               timeout=TOOL_TIMEOUT_S, env={**os.environ, "COLUMNS": "200"}).stdout
    assert "--no-stop-on-exit" in help_text


def test_the_ollama_drop_in_verifies_against_a_packaged_unit(tmp_path: Path) -> None:
    """Against a unit of the packaged form (ollama serve as user ollama, Restart=always)."""
    units = tmp_path / "units"
    (units / "ollama.service.d").mkdir(parents=True)
    (units / "ollama.service").write_text(
        "[Unit]\nDescription=Ollama Service\nAfter=network-online.target\n\n"
        f"[Service]\nExecStart={shutil.which('true') or '/bin/true'} serve\nUser=root\nRestart=always\n"
        "RestartSec=3\n\n[Install]\nWantedBy=default.target\n")
    shutil.copy(OLLAMA_DROPIN, units / "ollama.service.d" / "ailayer.conf")
    result = _verify(units / "ollama.service", env={"SYSTEMD_UNIT_PATH": f"{units}:"})
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    settings = _settings(OLLAMA_DROPIN)
    assert settings["ConditionPathExists"] == ["!/etc/ailayer/engines.yaml"]
    assert settings["Restart"] == ["no"]
    # The drop-in is read: a bad line in it is reported.
    (units / "ollama.service.d" / "ailayer.conf").write_text(OLLAMA_DROPIN.read_text() + "Restart=bogus\n")
    assert "ailayer.conf" in _verify(units / "ollama.service", env={"SYSTEMD_UNIT_PATH": f"{units}:"}).stderr


def test_logrotate_dry_run_is_clean(tmp_path: Path) -> None:
    result = subprocess.run([_tool("logrotate"), "-d", "-s", str(tmp_path / "state"), str(LOGROTATE)],
                            capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower(), result.stderr
    assert "rotating pattern: /var/log/ai_layer_activity.log" in result.stderr


def test_a_real_rotation_moves_the_activity_log_and_ailayer_writes_a_new_one(tmp_path: Path) -> None:
    """The shipped stanza, pointed at a temp log: rotated while an ActivityLog writes to it."""
    log_path = tmp_path / "ai_layer_activity.log"
    text = LOGROTATE.read_text()
    first = text.split("\n}\n", 1)[0] + "\n}\n"
    head = "/var/log/ai_layer_activity.log /var/lib/ailayer/run/ai_layer_activity.log {"
    assert first.count(head) == 1
    config = tmp_path / "logrotate.conf"
    config.write_text(first.replace(head, f"{log_path} {{"))
    config.chmod(0o644)
    log = ActivityLog(log_path, tmp_path / "run", terminal=None)
    try:
        log.event("before the rotation")
        result = subprocess.run([_tool("logrotate"), "-f", "-s", str(tmp_path / "state"), str(config)],
                                capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
        assert result.returncode == 0, result.stderr
        rotated = tmp_path / "ai_layer_activity.log.1"
        assert "before the rotation" in rotated.read_text()  # delaycompress: the newest stays plain
        assert not log_path.exists()  # nocreate: ailayer makes the new one itself

        def written() -> bool:
            log.event("after the rotation")
            return log_path.exists() and "after the rotation" in log_path.read_text()

        wait_until("a new activity log", written, timeout=DEADLINE_S, interval=ROTATE_CHECK_S / 4)
        second = subprocess.run([_tool("logrotate"), "-f", "-s", str(tmp_path / "state"), str(config)],
                                capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
        assert second.returncode == 0, second.stderr
        assert "before the rotation" in gzip.decompress((tmp_path / "ai_layer_activity.log.2.gz").read_bytes()).decode()
    finally:
        log.close()


def _kube() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(KUBE.read_text()) if doc]


def test_the_kubernetes_daemonset_is_consistent() -> None:
    docs = _kube()
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    daemonset = kinds[("DaemonSet", "ailayer")]
    pod = daemonset["spec"]["template"]["spec"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= \
        daemonset["spec"]["template"]["metadata"]["labels"].items()
    assert pod["nodeSelector"] and pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    container = pod["containers"][0]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        assert mount["name"] in volumes, mount
        source = volumes[mount["name"]].get("configMap")
        if source:
            assert ("ConfigMap", source["name"]) in kinds
    ports = {p["name"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"  # the gate, never the engine's boot
        assert container[probe]["httpGet"]["port"] in ports
    secret_ref = container["env"][0]["valueFrom"]["secretKeyRef"]
    assert secret_ref["key"] in kinds[("Secret", secret_ref["name"])]["stringData"]
    service = kinds[("Service", "ailayer")]
    assert service["spec"]["selector"].items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["internalTrafficPolicy"] == "Local"  # each node's backend, its own agent
    # The catalog's paths are the ones mounted.
    catalog_doc = yaml.safe_load(kinds[("ConfigMap", "ailayer-catalog")]["data"]["engines.yaml"])
    mounted = [m["mountPath"] for m in container["volumeMounts"]]
    config_path = container["command"][container["command"].index("--config") + 1]
    for path in (config_path, catalog_doc["desired_state"], catalog_doc["state_dir"], catalog_doc["log_file"]):
        assert any(path.startswith(m + "/") for m in mounted), path


def test_the_kubernetes_catalogs_pass_ailayers_schema() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in _kube()}
    raw = yaml.safe_load(kinds[("ConfigMap", "ailayer-catalog")]["data"]["engines.yaml"])
    catalog = from_document(raw, "the Kubernetes example", Path("/etc/ailayer/catalog"))
    assert catalog.names() == ["gemma2", "gpt-oss"]
    assert catalog.gate.host == "0.0.0.0" and catalog.gate.allowed_hosts  # the pod's address
    desired = yaml.safe_load(kinds[("ConfigMap", "ailayer-desired")]["data"]["desired_state.yaml"])
    assert desired == {"model": None}
