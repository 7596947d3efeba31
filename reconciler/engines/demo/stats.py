"""Request accounting, read by the cancellation tests at ``GET /demo/stats``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from aiohttp import web


@dataclass
class Stats:
    """Request accounting for cancellation tests: started == finished + cancelled + active."""

    requests_started: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    active_streams: int = 0
    active_requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0

    def as_json(self) -> dict[str, int]:
        return {
            "requests_started": self.requests_started,
            "requests_finished": self.requests_finished,
            "requests_cancelled": self.requests_cancelled,
            "active_streams": self.active_streams,
        }

    @contextlib.contextmanager
    def track(self, *, streaming: bool) -> Iterator[None]:
        """Count one inference request; a client that hangs up counts as cancelled."""
        self.requests_started += 1
        self.active_requests += 1
        self.active_streams += int(streaming)
        try:
            yield
        except ConnectionResetError:  # the response is gone; swallow so the handler returns
            self.requests_cancelled += 1
        except asyncio.CancelledError:
            self.requests_cancelled += 1
            raise
        except BaseException:
            self.requests_finished += 1
            raise
        else:
            self.requests_finished += 1
        finally:
            self.active_requests -= 1
            self.active_streams -= int(streaming)


def add_stats_route(app: web.Application, stats: Stats) -> None:
    """``GET /demo/stats``: the counters tests read to see cancellations."""

    async def handler(_: web.Request) -> web.Response:
        return web.json_response(stats.as_json())

    app.router.add_get("/demo/stats", handler)
