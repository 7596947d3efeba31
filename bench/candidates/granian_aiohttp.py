"""Candidate: granian (Rust HTTP server, one worker) serving asgi_aiohttp.app."""

from __future__ import annotations

import os
import sys

from common import args

ns = args()
os.environ["BENCH_UPSTREAM"] = f"http://{ns.upstream}"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from granian import Granian  # noqa: E402
from granian.constants import Interfaces, Loops  # noqa: E402

Granian("granian_app:app", address="127.0.0.1", port=ns.port, interface=Interfaces.ASGI, workers=1,
        loop=Loops.uvloop, log_enabled=False, backlog=4096).serve()
