"""The "Empty Request": a prompt before the toggle gets an error at once, never a hang."""

from __future__ import annotations

import json

from reconciler.simulate.harness import Scenario, demo_engines, http, scratch_dir
from reconciler.simulate.report import Report

PROMPT = {"model": "gpt-oss", "messages": [{"role": "user", "content": "hello?"}], "max_tokens": 4}
# The seed's bar for "returns an error instead of hanging".
IDLE_ANSWER_LIMIT_S = 0.1
# Scenario seconds the demo engine takes to load: long enough to be seen loading.
BOOT_S = 3.0
# Real seconds: bounds a broken run only.
LIMIT_S = 120.0
# A hung gate must fail this scenario, not hang it.
REQUEST_LIMIT_S = 30.0


def run() -> Report:
    """Each request is sent once the gate itself has read the phase it tests (``wait_phase``):
    the gate follows the state file milliseconds behind, and a request sent as soon as the file
    changes could still meet the phase before."""
    report = Report("empty-request")
    with Scenario(scratch_dir(), demo_engines(BOOT_S)) as sim:
        url = sim.gate_url + "/v1/chat/completions"
        sim.wait_phase("IDLE", None, LIMIT_S)
        http("POST", url, PROMPT, REQUEST_LIMIT_S)  # a first request warms the connection path
        status, headers, body, seconds = http("POST", url, PROMPT, REQUEST_LIMIT_S)
        message = json.loads(body).get("error", {}).get("message", "") if body else ""
        report.evidence["idle"] = {"status": status, "seconds": round(seconds, 4), "body": message}
        report.check("before the toggle: 428 Precondition Required", status == 428, f"HTTP {status}")
        report.check(f"answered within {IDLE_ANSWER_LIMIT_S * 1000:.0f} ms",
                     seconds < IDLE_ANSWER_LIMIT_S, f"{seconds * 1000:.1f} ms")
        report.check("the body explains how to select a model",
                     "no model" in message and "toggle" in message, message[:160])

        sim.toggle("gpt-oss")
        sim.wait_phase("LOADING", None, LIMIT_S)
        status, headers, body, seconds = http("POST", url, PROMPT, REQUEST_LIMIT_S)
        report.evidence["loading"] = {"status": status, "retry_after": headers.get("Retry-After"),
                                      "body": body[:300].decode("utf-8", "replace")}
        report.check("while loading: 503 with Retry-After", status == 503 and
                     bool(headers.get("Retry-After")),
                     f"HTTP {status}, Retry-After {headers.get('Retry-After')}")

        sim.wait_phase("READY", "gpt-oss", LIMIT_S)
        status, headers, body, seconds = http("POST", url, PROMPT, REQUEST_LIMIT_S)
        answer = json.loads(body) if status == 200 else {}
        content = answer.get("choices", [{}])[0].get("message", {}).get("content", "")
        report.evidence["ready"] = {"status": status, "content": content}
        report.check("after READY: 200 with a completion", status == 200 and bool(content),
                     f"HTTP {status}: {content[:60]!r}")
        left = sim.close()
        report.check("nothing left behind", not left, f"leftover: {left}" if left else "none")
    return report
