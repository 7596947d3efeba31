"""``python -m reconciler.gate [--config PATH]``: the gate alone (tests, benchmarks, systemd).

With ``gate.workers`` > 1 (or ``--workers N``) this process supervises N worker processes on
the one port (reconciler/gate/workers.py); each is this same command with ``--worker-port``
and ``--ready-fd``, which the supervisor adds.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from reconciler.domain import catalog as catalog_mod
from reconciler.gate.app import run
from reconciler.gate.workers import serve_gate
from reconciler.kit.schemas import InvalidFile

log = logging.getLogger("ailayer.gate")


def _print_listening(urls: list[str]) -> None:
    """One parseable stdout line, so a supervisor that asked for port 0 learns the port."""
    for url in urls:
        print(f"ailayer gate listening on {url}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconciler.gate", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="catalog (engines.yaml)")
    parser.add_argument("--demo", action="store_true", help="use the built-in demo catalog")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: gate.workers)")
    parser.add_argument("--worker-port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cat = catalog_mod.resolve(ns.config, use_demo=ns.demo)
    except InvalidFile as exc:
        print(f"ailayer gate: {exc}", file=sys.stderr)
        return 2
    if ns.ready_fd is not None and ns.worker_port is not None:  # one of a supervisor's workers
        cat = dataclasses.replace(cat, gate=dataclasses.replace(cat.gate, port=ns.worker_port))
        fd = ns.ready_fd

        def listening(urls: list[str]) -> None:
            log.info("gate worker %d listening on %s", os.getpid(), ", ".join(urls))
            os.write(fd, b"1")
            os.close(fd)

        run(cat, on_listening=listening, reuse_port=True)
        return 0
    where = ["--config", str(cat.path)] if cat.path is not None else ["--demo"]
    return serve_gate(cat, where, _print_listening, ns.workers)


if __name__ == "__main__":
    sys.exit(main())
