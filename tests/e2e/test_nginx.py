"""deploy/nginx/ailayer.conf, as shipped, with the real nginx in front of the real gate.

The test starts nginx on a free loopback port with a temporary prefix (its own pid file,
logs and temp dirs), and stops it and its workers at the end. Long-poll, /events and a
streamed completion go through it. Without nginx it skips, except with CI=true (where
.ci/run installs it), where it fails.
"""

from __future__ import annotations

import grp
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from reconciler.gate.statusapi import EVENTS_HEARTBEAT_S, MAX_WAIT_S
from reconciler.kit.freeport import free_port
from tests.helpers import DEADLINE_S, PY, REPO, Stack, demo_engine, port_listening, wait_until

pytestmark = pytest.mark.e2e

CONF = REPO / "deploy" / "nginx" / "ailayer.conf"
# The demo engine's delay per token: long enough that a buffering proxy would show (all
# chunks at once at the end), short enough for a quick test.
TOKEN_DELAY_MS = 100
TOKENS = 10
# A long-poll that nothing answers is held for this long: proves nginx waits for it.
SHORT_WAIT_S = 2.0
# nginx and the gate may stop slowly on a loaded machine; deadlines, not sleeps.
NGINX_STOP_S = 20.0


def _nginx() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nginx is not installed (.ci/run installs it with apt-get)")
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    return found


def _timeouts(text: str, location: str) -> float:
    block = re.search(r"location\s+" + re.escape(location) + r"\s*\{(.*?)\}", text, re.S)
    assert block, f"no location {location} in {CONF}"
    found = re.search(r"proxy_read_timeout\s+(\d+)s;", block.group(1))
    assert found, f"no proxy_read_timeout in location {location}"
    return float(found.group(1))


def test_read_timeouts_are_above_the_longest_long_poll_and_the_heartbeat() -> None:
    text = CONF.read_text()
    for location in ("= /status", "= /events"):
        assert _timeouts(text, location) > max(MAX_WAIT_S, EVENTS_HEARTBEAT_S)
    assert "proxy_buffering off;" in text and "proxy_request_buffering off;" in text


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """(nginx port, gate port): the shipped config, pointed at a gate port and listening on loopback."""
    binary = _nginx()
    gate_port, port = free_port(), free_port()
    prefix = tmp_path / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    server = CONF.read_text()
    for old, new in (("server 127.0.0.1:8080;", f"server 127.0.0.1:{gate_port};"),
                     ("listen 80;", f"listen 127.0.0.1:{port};")):
        assert server.count(old) == 1, f"{CONF} changed shape: {old!r}"
        server = server.replace(old, new)
    (prefix / "ailayer.conf").write_text(server)
    user = ""
    if os.geteuid() == 0:  # workers drop to this user; "nobody"'s group has no one name
        user = f"user {pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name};"
    temps = "\n".join(f"    {kind}_temp_path {prefix}/tmp/{kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (prefix / "nginx.conf").write_text(f"""{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 128; }}
http {{
    access_log {prefix}/access.log;
{temps}
    include {prefix}/ailayer.conf;
}}
""")
    check = subprocess.run([binary, "-t", "-p", str(prefix), "-e", str(prefix / "error.log"),
                            "-c", str(prefix / "nginx.conf")], capture_output=True, text=True, timeout=DEADLINE_S)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([binary, "-p", str(prefix), "-e", str(prefix / "error.log"),
                             "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until("nginx listening", lambda: proc.poll() is not None or port_listening(port))
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield port, gate_port
    finally:
        workers = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
        try:
            proc.wait(timeout=NGINX_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert psutil.wait_procs(workers, timeout=NGINX_STOP_S)[1] == []
        if proc.stderr is not None:
            proc.stderr.close()


def _get(port: int, path: str, timeout: float = DEADLINE_S) -> tuple[int, dict[str, object], float]:
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read()), time.monotonic() - started
    finally:
        conn.close()


def test_long_poll_events_and_a_streamed_completion_through_nginx(tmp_path: Path,
                                                                   nginx: tuple[int, int]) -> None:
    port, gate_port = nginx
    engine = demo_engine("vllm", free_port(), args=["--token-delay-ms", str(TOKEN_DELAY_MS)])
    (tmp_path / "stack").mkdir()
    stack = Stack(tmp_path / "stack", {"gpt-oss": engine}, top={"gate": {"listen": f"127.0.0.1:{gate_port}"}})
    with (stack.root / "up.out").open("a") as out:
        up = subprocess.Popen([PY, "-m", "reconciler", "up", "--config", str(stack.config)],
                              stdout=out, stderr=subprocess.STDOUT, cwd=stack.root)
    events: list[tuple[float, str]] = []
    stream = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    try:
        wait_until("the gate through nginx", lambda: port_listening(gate_port) and _get(port, "/healthz")[0] == 200)

        # /events: the state at once, then one event per change, through nginx.
        stream.request("GET", "/events", headers={"Accept": "text/event-stream"})
        response = stream.getresponse()
        assert response.status == 200 and response.getheader("Content-Type", "").startswith("text/event-stream")

        def read_events() -> None:
            block = ""
            while True:
                try:
                    line = response.readline().decode()
                except (OSError, ValueError, AttributeError):  # closed at the end of the test
                    return
                if not line:
                    return
                block += line
                if line == "\n":
                    events.append((time.monotonic(), block))
                    block = ""

        threading.Thread(target=read_events, name="sse", daemon=True).start()
        wait_until("the first status event", lambda: any("event: status" in b for _, b in events))

        # A long-poll nothing answers is held (not cut by nginx), then answered 200.
        revision = wait_until("an observed state", lambda: _get(port, "/status")[1].get("revision"))
        status, held, took = _get(port, f"/status?wait={SHORT_WAIT_S:g}s&since={revision}")
        assert status == 200 and (took >= SHORT_WAIT_S * 0.9 or held["revision"] != revision), took

        # A long-poll is answered by the change it waits for.
        answers: list[tuple[int, dict[str, object], float]] = []
        poll = threading.Thread(target=lambda: answers.append(
            _get(port, f"/status?wait=50s&since={held['revision']}")))
        poll.start()
        stack.toggle("gpt-oss")
        poll.join(timeout=DEADLINE_S)
        assert answers and answers[0][0] == 200 and answers[0][2] < DEADLINE_S
        assert answers[0][1]["revision"] != held["revision"]

        stack.wait_phase("READY", "gpt-oss")
        wait_until("a READY status event", lambda: any('"phase":"READY"' in b for _, b in events))

        # A streamed completion arrives chunk by chunk, not in one burst at the end.
        body = json.dumps({"model": "gpt-oss", "stream": True, "max_tokens": TOKENS,
                           "messages": [{"role": "user", "content": "hi"}]})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
        try:
            conn.request("POST", "/v1/chat/completions", body=body,
                         headers={"Content-Type": "application/json"})
            completion = conn.getresponse()
            assert completion.status == 200
            arrivals = []
            while line := completion.readline():
                if line.startswith(b"data: {"):
                    arrivals.append(time.monotonic())
        finally:
            conn.close()
        assert len(arrivals) >= TOKENS // 2
        spread = arrivals[-1] - arrivals[0]
        assert spread >= (len(arrivals) - 1) * TOKEN_DELAY_MS / 1000 * 0.5, \
            f"{len(arrivals)} chunks within {spread:.3f} s: buffered"
    finally:
        stream.close()
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=DEADLINE_S * 2)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    assert up.returncode == 0, (stack.root / "up.out").read_text()[-2000:]
