"""Shared by the request-path candidates (bench/gate_throughput.py --candidate): argv and loop."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Coroutine
from typing import Any


def args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="host:port")
    parser.add_argument("--uvloop", action="store_true")
    return parser.parse_args()


def run(main: Coroutine[Any, Any, None], use_uvloop: bool) -> None:
    if use_uvloop:
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)
