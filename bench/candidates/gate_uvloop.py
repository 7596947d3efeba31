"""Candidate: the gate itself (python -m reconciler.gate) on uvloop's event loop."""

from __future__ import annotations

import asyncio
import sys

import uvloop

asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
from reconciler.gate.__main__ import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
