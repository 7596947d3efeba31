"""Start an engine: its own session, our cookie in its environment, output to a file."""

from __future__ import annotations

import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from reconciler.atomicfile import ensure_dir
from reconciler.catalog import Engine
from reconciler.facts import COOKIE_ENV, Cookie


@dataclass(frozen=True)
class Spawned:
    cookie: Cookie
    process: subprocess.Popen[bytes]
    log_path: Path


def raw_log_path(state_dir: Path, cookie: Cookie) -> Path:
    """Where an instance's stdout+stderr go; derivable from the cookie after a restart."""
    return state_dir / "engines" / f"{cookie.model}.{cookie.instance}.log"


def new_cookie(namespace: str, model: str, started_at: float) -> Cookie:
    return Cookie(namespace, model, secrets.token_hex(4), started_at)


def spawn(engine: Engine, cookie: Cookie, state_dir: Path) -> Spawned:
    """Raises OSError (e.g. FileNotFoundError for a missing binary) for the caller to report."""
    log_path = raw_log_path(state_dir, cookie)
    ensure_dir(log_path.parent)
    env = {k: v for k, v in os.environ.items() if k != COOKIE_ENV}
    env.update(engine.env)
    env[COOKIE_ENV] = cookie.encode()
    env.setdefault("PYTHONUNBUFFERED", "1")
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640)
    try:
        process = subprocess.Popen(
            list(engine.command),
            env=env,
            cwd=engine.cwd,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,  # no SIGHUP from our terminal; a group to kill
            close_fds=True,
        )
    finally:
        os.close(fd)
    return Spawned(cookie, process, log_path)
