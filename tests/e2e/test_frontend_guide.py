"""README's frontend guide, run as printed: its JavaScript, in Node, against a real `ailayer up`.

The three snippets (the long-poll loop, the EventSource listener, the toggle from a backend)
are taken from README.md as they stand; only the gate's address is changed. Skips without
Node 20+ (EventSource needs --experimental-eventsource there).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from reconciler.kit.freeport import free_port
from tests.helpers import DEADLINE_S, PY, REPO, Stack, demo_engine, wait_until

pytestmark = pytest.mark.e2e

GATE_LINE = 'const GATE = "https://ai.example.org";'
TOKEN = "frontend-guide-token"


def _snippets() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Frontend guide", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```js\n(.*?)```", section, re.S)


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("needs Node.js")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=DEADLINE_S).stdout
    if int(version.lstrip("v").split(".")[0]) < 20:
        pytest.skip(f"needs Node 20+ (fetch, EventSource), found {version.strip()}")
    return node


def test_the_snippets_follow_a_toggle_to_ready(tmp_path: Path) -> None:
    node = _node()
    follow, events, toggle = _snippets()
    assert GATE_LINE in follow
    gate_port = free_port()
    stack = Stack(tmp_path, {"gemma2": demo_engine("ollama", free_port())},
                  top={"gate": {"listen": f"127.0.0.1:{gate_port}"}})
    script = tmp_path / "guide.mjs"
    script.write_text(f"""
const seen = {{ follow: [], events: [] }};
function show(phase, message, progress) {{ seen.events.push(phase); }}
{follow.replace(GATE_LINE, f'const GATE = "http://127.0.0.1:{gate_port}";')}
follow((doc) => seen.follow.push(doc.phase));
{events}
{toggle}
seen.revision = revision;
const ready = () => seen.follow.at(-1) === "READY" && seen.events.at(-1) === "READY";
const timer = setInterval(() => {{
  if (ready()) {{ console.log(JSON.stringify(seen)); process.exit(0); }}
}}, 50);
setTimeout(() => {{ console.log(JSON.stringify(seen)); process.exit(1); }}, {int(DEADLINE_S * 1000)});
""")
    with (tmp_path / "up.out").open("a") as out:
        up = subprocess.Popen([PY, "-m", "reconciler", "up", "--config", str(stack.config)], stdout=out,
                              stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, "AILAYER_TOKEN": TOKEN})
    try:
        wait_until("the reconciler's first state", lambda: stack.status().get("phase") == "IDLE")
        run = subprocess.run([node, "--experimental-eventsource", str(script)], capture_output=True, text=True,
                             timeout=DEADLINE_S * 2, env={**os.environ, "AILAYER_TOKEN": TOKEN}, cwd=tmp_path)
        assert run.returncode == 0, (run.stdout, run.stderr[-2000:])
        seen = json.loads(run.stdout.strip().splitlines()[-1])
        assert seen["follow"][0] == "IDLE" and seen["follow"][-1] == "READY"
        assert seen["events"][0] == "IDLE" and seen["events"][-1] == "READY"
        assert isinstance(seen["revision"], int)
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
