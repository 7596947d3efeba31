"""The Ollama-like engine's per-model child, shown as ``<prefix>/lib/ollama/llama-server``.

Real Ollama (v0.30+) runs ``<prefix>/lib/ollama/llama-server --model <blob> --port N
--host 127.0.0.1`` for each loaded model, in serve's process group and session, with
serve's environment. A Python program cannot be exec'd with that argv: the interpreter
comes first and would parse ``--model`` as its own flag. So serve starts
``python -c <BOOT>``, padded to the byte length of the argv to show, and the child
rewrites its own argv area in place before anything else: ``/proc/PID/cmdline``, ps and
psutil then read exactly the real argv. Unlike setproctitle (vLLM's way), this leaves
``/proc/PID/environ`` intact, as it is on the real llama-server. The name (comm) is set to
``llama-server`` too; only ``/proc/PID/exe`` still names the Python interpreter.

This module imports only what the rewrite needs, so the ``python -c`` command line is
visible for milliseconds, not for the time the demo engine's imports take.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import setproctitle

ENV_SPEC = "AILAYER_DEMO_LLAMA_SERVER"
"""JSON the child is started with: the argv to show, and the worker settings that real
llama-server reads from its model file and flags (how long to load, memory, faults)."""
BOOT = "import sys, reconciler.engines.demo.llama_server as s; sys.exit(s.main())"
SHOWN_NAME = "llama-server"
# /proc/PID/stat fields 48 and 49 (arg_start, arg_end), counted from field 3, the first
# one after the parenthesised command name.
_ARG_START, _ARG_END = 48 - 3, 49 - 3


def shown_argv(prefix: str, blob: str, port: int, host: str) -> list[str]:
    """What Ollama v0.30+ runs for one model."""
    return [f"{prefix}/lib/ollama/llama-server", "--model", blob, "--port", str(port), "--host", host]


def _nbytes(argv: list[str]) -> int:
    return sum(len(os.fsencode(arg)) + 1 for arg in argv)


def boot_argv(shown: list[str]) -> list[str]:
    """``python -c BOOT``, with BOOT padded so the argv area is exactly as long as ``shown``.

    A Python path so long that even the bare command is longer leaves trailing NULs instead.
    """
    bare = [sys.executable, "-c", BOOT]
    return [sys.executable, "-c", BOOT + " " * max(0, _nbytes(shown) - _nbytes(bare))]


def environment(shown: list[str], settings: Mapping[str, Any]) -> dict[str, str]:
    """serve's environment, inherited, plus the spec the child reads at start."""
    return {**os.environ, ENV_SPEC: json.dumps({"argv": shown, **settings})}


def present_argv(argv: list[str]) -> None:
    """Overwrite this process's argv area with ``argv`` (NUL-separated, NUL-padded)."""
    with open("/proc/self/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    start, end = int(fields[_ARG_START]), int(fields[_ARG_END])
    data = b"\0".join(os.fsencode(arg) for arg in argv) + b"\0"
    if len(data) > end - start:
        raise ValueError(f"argv of {len(data)} bytes does not fit the {end - start} bytes of the argv area")
    fd = os.open("/proc/self/mem", os.O_RDWR)
    try:
        os.pwrite(fd, data + b"\0" * (end - start - len(data)), start)
    finally:
        os.close(fd)


def main() -> int:
    """Look like llama-server, then run the demo runner with the shown argv's flags."""
    spec = json.loads(os.environ[ENV_SPEC])
    present_argv(spec["argv"])
    setproctitle.setthreadtitle(SHOWN_NAME)  # the main thread's name is the process's comm
    from reconciler.engines.demo import ollama_runner  # after the rewrite: see the module docstring

    return ollama_runner.main(spec)
