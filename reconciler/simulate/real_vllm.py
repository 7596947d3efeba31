"""The real vLLM (its CPU build) as a catalog entry, for ``ailayer simulate`` and the tests.

Why one place: the simulation and tests/integration/test_vllm_real.py must run the same
command with the same environment that examples/vllm-cpu.yaml documents, and find the same
installation (``bin/setup-vllm-cpu`` puts it in its own venv, as a user installs vLLM).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

VLLM_ENV = "AILAYER_VLLM"
"""The ``vllm`` executable to use; unset: the default venv of bin/setup-vllm-cpu."""
VLLM_VERSION = "0.32.0"
SERVED_NAME = "tiny-vllm"
# vLLM sizes its KV cache from this, and it bounds one request: small keeps memory small.
MAX_MODEL_LEN = 512
# What the CPU build needs to start, and what keeps it from reaching out (docs/VLLM.md).
ENV = {
    "VLLM_TARGET_DEVICE": "cpu",  # platform detection: the CPU build, never CUDA
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; the CPU default takes far more
    "VLLM_NO_USAGE_STATS": "1",  # no usage report posted from a thread at boot
    "HF_HUB_OFFLINE": "1",  # the model is a local folder: never ask a hub
}
TITLES = ("VLLM::EngineCore", "VLLM::Worker")
"""The process titles vLLM gives its engine core and worker (vllm/utils/system_utils.py)."""


def default_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ailayer" / f"vllm-cpu-{VLLM_VERSION}" / "bin" / "vllm"


def executable() -> Path:
    """Where the vllm executable should be: ``$AILAYER_VLLM``, else the default venv's."""
    given = os.environ.get(VLLM_ENV)
    return Path(given) if given else default_path()


def installed(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def entry(exe: Path, model: Path, port: int) -> dict[str, Any]:
    """A catalog entry of kind vllm serving ``model`` on ``port``, strays per instance.

    Strays are only the entry's own command up to its port (which also matches it run as
    ``python3 <venv>/bin/vllm serve ...``, as a console script runs), and no titles: a
    machine-wide ``VLLM::`` title would take any vLLM on the machine for this one. The
    orphans of a killed API server must be found as members of the instance instead.
    """
    head = [str(exe), "serve", str(model), "--host", "{host}", "--port", "{port}"]
    return {"kind": "vllm", "port": port, "served_name": SERVED_NAME,
            "command": [*head, "--served-model-name", "{served_name}", "--enforce-eager",
                        "--max-model-len", str(MAX_MODEL_LEN)],
            "env": dict(ENV), "strays": {"argv": [], "titles": []}}
