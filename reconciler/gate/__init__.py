"""The gate: the AI layer's HTTP front door.

It follows the observed-state file the reconciler writes and decides, per request,
whether it may reach an engine (428 nothing selected, 503 + Retry-After while
converging or without a live reconciler, a streaming reverse proxy when READY), serves
that state to UIs (/status long-poll, /events), takes toggles (/toggle) and exports
metrics. It never starts, stops or picks an engine itself.

Entry points: :func:`reconciler.gate.app.run` (blocking), :func:`reconciler.gate.app.serve`
(async) and :func:`reconciler.gate.app.build_app`.
"""

from __future__ import annotations

from reconciler.gate.app import build_app, run, serve

__all__ = ["build_app", "run", "serve"]
