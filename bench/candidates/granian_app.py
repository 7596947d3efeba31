"""granian imports the app by name: asgi_aiohttp.app with the upstream from the environment."""

from __future__ import annotations

import os

import asgi_aiohttp

asgi_aiohttp.UP = os.environ["BENCH_UPSTREAM"]
app = asgi_aiohttp.app
