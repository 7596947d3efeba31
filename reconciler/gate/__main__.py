"""``python -m reconciler.gate [--config PATH]``: the gate alone (tests, benchmarks, systemd)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from reconciler import catalog as catalog_mod
from reconciler.gate.app import run
from reconciler.schemas import InvalidFile


def _print_listening(urls: list[str]) -> None:
    """One parseable stdout line, so a supervisor that asked for port 0 learns the port."""
    for url in urls:
        print(f"ailayer gate listening on {url}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconciler.gate", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="catalog (engines.yaml)")
    parser.add_argument("--demo", action="store_true", help="use the built-in demo catalog")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cat = catalog_mod.resolve(ns.config, use_demo=ns.demo)
    except InvalidFile as exc:
        print(f"ailayer gate: {exc}", file=sys.stderr)
        return 2
    run(cat, on_listening=_print_listening)
    return 0


if __name__ == "__main__":
    sys.exit(main())
