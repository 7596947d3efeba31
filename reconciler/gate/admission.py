"""Whether a request may reach an engine right now, decided from the followed state alone.

The gate never waits for a model and never queues: anything but a fresh READY is answered
at once — 428 when nothing is selected (retrying cannot help until someone selects a
model), 503 with Retry-After while converging, loading, failed or without a live
reconciler (retrying later can help).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from reconciler.domain.status import Phase
from reconciler.gate.errors import Code, Refusal
from reconciler.gate.statefollow import StateFollower, Target
from reconciler.kit import clock

# How soon a client should retry while a model converges or loads. Short, because a boot
# can finish at any moment; a UI should long-poll /status instead of retrying anyway.
RETRY_CONVERGING_S = 5.0
# How soon to retry when no live reconciler stands behind the state (it may be restarting).
RETRY_NO_RECONCILER_S = 5.0
# When a FAILED state names no next retry time: the reconciler's first backoff step.
RETRY_FAILED_DEFAULT_S = 10.0

SELECT_HINT = (
    'select one with `ailayer toggle MODEL` or POST /toggle {"model": "MODEL"} '
    "(bearer token); follow progress at GET /status?wait=50&since=REVISION (the revision of the last /status answer)"
)


def _fmt(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 60}m{whole % 60:02d}s"


def _until(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return None
    return max(0.0, (when - clock.now()).total_seconds())


def _progress(follower: StateFollower, data: dict[str, Any]) -> dict[str, Any]:
    """Phase, model, elapsed and deadline; elapsed keeps counting between reconciler writes."""
    detail: dict[str, Any] = {
        "phase": data.get("phase"),
        "model": data.get("desired_model"),
        "active_model": data.get("active_model"),
        "phase_since": data.get("phase_since"),
        "state_message": data.get("message"),
        "revision": follower.revision,  # what GET /status?since= compares
    }
    boot = data.get("boot")
    if isinstance(boot, dict) and isinstance(boot.get("elapsed_s"), int | float):
        since_read = clock.monotonic() - follower.snapshot.loaded_mono
        elapsed = float(boot["elapsed_s"]) + max(0.0, since_read)
        budget = float(boot.get("budget_s") or 0.0)
        detail.update(
            elapsed_s=round(elapsed, 1),
            budget_s=budget,
            remaining_s=round(max(0.0, budget - elapsed), 1),
            deadline=boot.get("deadline"),
            attempt=boot.get("attempt"),
        )
        if isinstance(boot.get("progress"), dict):
            detail["progress"] = boot["progress"]  # {"percent", "stage"} from the engine's output
    # Never the engine's last line: anyone may send a prompt, and that line may be another
    # user's prompt (issue 25, 5); /status shows it to a token holder.
    return detail


def _stage_text(progress: object) -> str:
    """``; stage: loading checkpoint shards (2/5), 40%`` from boot.progress, or nothing."""
    if not isinstance(progress, dict) or not progress.get("stage"):
        return ""
    percent = progress.get("percent")
    shown = f", {percent:g}%" if isinstance(percent, int | float) else ""
    return f"; stage: {progress['stage']}{shown}"


def _not_running(follower: StateFollower) -> Refusal:
    snap = follower.snapshot
    detail: dict[str, Any] = {"state_file": str(follower.path), "stale": True}
    if snap.data is None:
        message = (
            f"reconciler not running: no observed state at {follower.path} yet "
            "(start it with `ailayer up` or `ailayer reconcile`)"
        )
    else:
        age = follower.heartbeat_age()
        detail.update(
            heartbeat_age_s=None if age == float("inf") else round(age, 1),
            stale_after_s=follower.stale_after_s,
            last_phase=snap.phase,
            last_active_model=snap.data.get("active_model"),
        )
        age_text = "missing" if age == float("inf") else f"{_fmt(age)} old"
        message = (
            f"reconciler not running: its heartbeat is {age_text} (limit "
            f"{follower.stale_after_s:g} s); last reported phase {snap.phase}"
        )
        if snap.stopped:
            message = f"reconciler not running: {snap.data.get('message')}"
    return Refusal(503, Code.RECONCILER_NOT_RUNNING, message, RETRY_NO_RECONCILER_S, detail)


def _converging(follower: StateFollower, data: dict[str, Any], phase: str) -> Refusal:
    detail = _progress(follower, data)
    model = detail["model"] or detail["active_model"]
    if phase == Phase.LOADING and "elapsed_s" in detail:
        what = (
            f"model {model!r} is loading: {_fmt(detail['elapsed_s'])} of "
            f"{_fmt(detail['budget_s'])} elapsed, deadline {detail['deadline']}"
        ) + _stage_text(detail.get("progress"))
    elif phase == Phase.STOPPING:
        what = f"switching models: stopping the previous engine before starting {model!r}"
    elif phase == Phase.WAITING_PORT:
        what = f"model {model!r} is waiting for its port to be released"
    elif phase == Phase.DEGRADED:
        what = f"model {model!r} stopped answering its health check; the reconciler is re-checking it"
    else:
        what = f"model {model!r} is not ready (phase {phase})"
    note = data.get("message")
    message = f"{what}" + (f" — {note}" if note else "") + "; retry later or long-poll /status"
    return Refusal(503, Code.MODEL_LOADING, message, RETRY_CONVERGING_S, detail)


def _failed(follower: StateFollower, data: dict[str, Any]) -> Refusal:
    detail = _progress(follower, data)
    error = data.get("last_error") if isinstance(data.get("last_error"), dict) else {}
    reason = (error or {}).get("reason") or "Failed"
    text = (error or {}).get("message") or data.get("message") or "no detail recorded"
    retry = _until(data.get("next_retry_at"))
    detail.update(last_error=error, next_retry_at=data.get("next_retry_at"),
                  restarts=data.get("restarts"))
    message = f"model {detail['model']!r} failed: {reason}: {text}"
    if data.get("next_retry_at"):
        message += f"; the reconciler retries at {data['next_retry_at']}"
    return Refusal(503, Code.MODEL_FAILED, message,
                   retry if retry is not None else RETRY_FAILED_DEFAULT_S, detail)


def admit(follower: StateFollower, known: list[str]) -> Target | Refusal:
    """The engine to proxy to, or the answer to give instead."""
    snap = follower.snapshot
    data = snap.data
    if data is None or follower.stale():
        return _not_running(follower)
    phase = snap.phase
    if phase == Phase.READY and snap.target is not None:
        return snap.target
    if phase == Phase.IDLE:
        detail = {"phase": phase, "known_models": known, "how_to_select": SELECT_HINT,
                  "revision": follower.revision}
        message = f"no model is selected (phase IDLE): {SELECT_HINT}; known models: " + (
            ", ".join(known))
        return Refusal(428, Code.NO_MODEL_SELECTED, message, None, detail)
    if phase == Phase.FAILED:
        return _failed(follower, data)
    return _converging(follower, data, str(phase))
