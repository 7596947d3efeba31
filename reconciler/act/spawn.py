"""Start an engine: its own session (and cgroup, in cgroup mode), our cookie, output to a file."""

from __future__ import annotations

import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from reconciler.act import cgroups
from reconciler.domain.catalog import Engine
from reconciler.domain.facts import COOKIE_ENV, Cookie
from reconciler.kit.atomicfile import ensure_dir, open_append


@dataclass(frozen=True)
class Spawned:
    cookie: Cookie
    process: subprocess.Popen[bytes]
    log_path: Path


def raw_log_path(state_dir: Path, model: str, instance: str) -> Path:
    """Where an instance's stdout+stderr go; derivable from its record after a restart."""
    return state_dir / "engines" / f"{model}.{instance}.log"


def new_cookie(namespace: str, model: str, started_at: float) -> Cookie:
    return Cookie(namespace, model, secrets.token_hex(4), started_at)


def spawn(engine: Engine, cookie: Cookie, state_dir: Path, cgroup: Path | None = None,
          withheld: tuple[str, ...] = ()) -> Spawned:
    """Raises OSError (e.g. FileNotFoundError for a missing binary) for the caller to report.

    With ``cgroup`` the child joins it between fork and exec, so the engine and everything
    it will ever fork are members from the first instruction. ``withheld`` names variables of
    ours an engine must not inherit (the gate's token: any engine could toggle models with it).
    """
    log_path = raw_log_path(state_dir, cookie.model, cookie.instance)
    ensure_dir(log_path.parent)
    env = {k: v for k, v in os.environ.items() if k != COOKIE_ENV and k not in withheld}
    env.update(engine.env)
    env[COOKIE_ENV] = cookie.encode()
    env.setdefault("PYTHONUNBUFFERED", "1")
    fd = open_append(log_path)
    try:
        process = subprocess.Popen(
            list(engine.command),
            env=env,
            cwd=engine.cwd,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,  # no SIGHUP from our terminal; a session and group of its own
            close_fds=True,
            preexec_fn=(lambda: cgroups.join_self(cgroup)) if cgroup is not None else None,
        )
    finally:
        os.close(fd)
    return Spawned(cookie, process, log_path)
