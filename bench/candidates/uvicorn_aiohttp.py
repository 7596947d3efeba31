"""Candidate: uvicorn (httptools, uvloop) serving asgi_aiohttp.app."""

from __future__ import annotations

import asgi_aiohttp
import uvicorn
from common import args

ns = args()
asgi_aiohttp.UP = f"http://{ns.upstream}"
uvicorn.run(asgi_aiohttp.app, host="127.0.0.1", port=ns.port, http="httptools", loop="uvloop",
            access_log=False, log_level="warning", backlog=4096, lifespan="on")
