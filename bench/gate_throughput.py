"""The gate's request path against nginx and direct access, on upstreams that cannot be the limit.

    .venv/bin/python bench/gate_throughput.py [--rounds 3] [--seconds 3] [--json OUT]

Issue 14: bench/gate_bench.py put nginx and the gate in front of the demo engine, an aiohttp
server that capped nginx (6,369 req/s through nginx vs 9,012 direct), so it showed the gate
at 36 % of nginx when it was nearer 10 %. Here:

* **small requests** go to nginx answering a fixed JSON with ``return 200`` (one worker on the
  load core; tens of thousands of req/s, ≥ 10x the gate's rate, checked as "direct");
* **streams** come from bench/stream_upstream.py (uvloop + httptools; one ``write`` per token
  per stream, paced like a batching engine's steps), which counts the tokens it wrote;
* **the load** is wrk (C, one thread on the load core), installed with apt-get when missing;
* **the proxies** (nginx: one worker; the gate: one worker unless asked) are pinned to one core
  with taskset, the upstreams and wrk to the other;
* each measurement reads the proxy's CPU time (its whole process tree, from /proc) before and
  after, so CPU per request and per token are measured, not inferred from req/s. The proxy's
  core use (CPU seconds / wall seconds) is printed too: below ~95 % the proxy was not the
  limit, and the req/s ratio says less than the CPU ratio;
* every measurement runs ``--rounds`` times, the paths in a rotated order each round, and the
  report gives the median with the min-max spread.

Measured: wrk at 1 connection (p50/p99 latency) and 64 (req/s) for small requests; the 428
path (the gate with nothing selected) against nginx's static ``return 428``; streams at two
levels (tokens/s at the client side = tokens the upstream wrote during the run, and CPU per
token); with ``--workers 2``, the gate's throughput with 2 workers on both cores against one
worker on one core (on a machine with cores to spare, ``--proxy-cpu 0 --workers-cpu 0,1
--load-cpu 2-7`` keeps wrk and the upstreams off the gate's cores). ``--candidate NAME=ARGV``
adds a proxy to compare (argv with ``{port}``,
``{upstream}``, ``{catalog}`` (a gate catalog listening on that port) and ``{python}``),
measured like the gate on small requests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from gate_bench import Procs, ensure_tools, free_port, rotate, spread, wait_port, workdir, wrk  # noqa: E402

from reconciler.domain import status  # noqa: E402
from reconciler.kit import clock  # noqa: E402
from reconciler.store import state_file  # noqa: E402

SMALL_CONNECTIONS = 64
# (streams, ms between tokens): a realistic load, and one near the gate's ceiling.
STREAM_LEVELS = ((64, 20.0), (256, 10.0))
STREAM_TOKENS = 100
# Streams are measured in steady state: this long after wrk starts, until this long before it ends.
RAMP_S = 1.0
START_DEADLINE_S = 30.0
HEARTBEAT_S = 5.0

SMALL_BODY = json.dumps({"model": "small", "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 1})
STREAM_BODY = json.dumps({"model": "stream", "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": STREAM_TOKENS, "stream": True})
ANSWER = ('{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"small",'
          '"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
          '"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}')
ANSWER_428 = ('{"error":{"message":"no model is selected","type":"no_model_selected",'
              '"code":"no_model_selected"}}')

NGINX_HEAD = """\
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 75s;
{body}
}}
"""
NGINX_UPSTREAM = """\
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{ default_type application/json; return 200 '{answer}'; }}
  }}
"""
NGINX_PROXY = """\
  upstream small {{ server 127.0.0.1:{small}; keepalive 256; keepalive_timeout 60s; }}
  upstream stream {{ server 127.0.0.1:{stream}; keepalive 512; keepalive_timeout 60s; }}
  server {{
    listen 127.0.0.1:{small_port} backlog=4096;
    location / {{ proxy_pass http://small; {common} }}
  }}
  server {{
    listen 127.0.0.1:{stream_port} backlog=4096;
    location / {{ proxy_pass http://stream; {common} }}
  }}
  server {{
    listen 127.0.0.1:{static_port} backlog=4096;
    location / {{ default_type application/json; return 428 '{answer_428}'; }}
  }}
"""
# What docs/PERFORMANCE.md recommends in front of the gate.
PROXY_COMMON = ("proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host $host; "
                "proxy_buffering off; proxy_request_buffering off; proxy_cache off; "
                "proxy_read_timeout 3600s; proxy_send_timeout 3600s;")
# wrk's own timeout, above a stream's length (100 tokens x 20 ms = 2 s, wrk's default).
WRK_TIMEOUT = "30s"
WRK_POST = 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = \'{body}\'\n'


def nginx_path() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its live children."""
    total = 0.0
    with contextlib.suppress(psutil.NoSuchProcess):
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
    return total


def fmt(s: dict[str, float], digits: int = 0) -> str:
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


class Bench:
    def __init__(self, work: Path, proxy_cpu: str, load_cpu: str, seconds: float) -> None:
        self.work = work
        self.proxy_cpu = proxy_cpu
        self.load_cpu = load_cpu
        self.seconds = seconds
        self.procs = Procs(work)
        self.ports = {name: free_port() for name in (
            "small_up", "stream_up", "nginx_small", "nginx_stream", "nginx_428")}
        self.pids: dict[str, int] = {}
        self.gates: dict[str, int] = {}  # name -> port
        self.revision = 0
        self._state: status.Status | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.state_path = work / "run" / "observed_state.json"
        self.scripts = {}
        for name, body in (("small", SMALL_BODY), ("stream", STREAM_BODY)):
            path = work / f"{name}.lua"
            path.write_text(WRK_POST.format(body=body))
            self.scripts[name] = path

    # ------------------------------------------------------------------ processes

    def _nginx(self, name: str, body: str, cpu: str) -> int:
        prefix = self.work / name
        prefix.mkdir()
        conf = NGINX_HEAD.format(prefix=prefix, body=body, user="user root;" if os.geteuid() == 0 else "")
        (prefix / "nginx.conf").write_text(conf)
        proc = self.procs.start(name, [nginx_path(), "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                       "-g", "daemon off;"], cpu)
        return proc.pid

    def start(self, tokens_ms: float) -> None:
        p = self.ports
        self.pids["small_up"] = self._nginx("nginx-upstream", NGINX_UPSTREAM.format(port=p["small_up"], answer=ANSWER),
                                            self.load_cpu)
        self.pids["stream_up"] = self.procs.start("stream-upstream", [
            sys.executable, str(HERE / "stream_upstream.py"), "--port", str(p["stream_up"]),
            "--tokens", str(STREAM_TOKENS), "--token-ms", str(tokens_ms)], self.load_cpu).pid
        self.pids["nginx"] = self._nginx("nginx-proxy", NGINX_PROXY.format(
            small=p["small_up"], stream=p["stream_up"], small_port=p["nginx_small"],
            stream_port=p["nginx_stream"], static_port=p["nginx_428"], common=PROXY_COMMON,
            answer_428=ANSWER_428), self.proxy_cpu)
        for port in p.values():
            wait_port(port, "upstream/nginx")
        self.write_catalog()
        threading.Thread(target=self._heartbeat, daemon=True).start()
        self.ready("small")

    def restart_stream_upstream(self, token_ms: float) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(self.pids["stream_up"]).terminate()
            psutil.Process(self.pids["stream_up"]).wait(5)
        self.pids["stream_up"] = self.procs.start(f"stream-upstream-{token_ms:g}", [
            sys.executable, str(HERE / "stream_upstream.py"), "--port", str(self.ports["stream_up"]),
            "--tokens", str(STREAM_TOKENS), "--token-ms", str(token_ms)], self.load_cpu).pid
        wait_port(self.ports["stream_up"], "stream upstream")

    def write_catalog(self, workers: int = 1, port: int = 0) -> Path:
        catalog = {
            "state_dir": str(self.work / "run"),
            "desired_state": str(self.work / "desired_state.yaml"),
            "log_file": str(self.work / "activity.log"),
            "gate": {"listen": f"127.0.0.1:{port}", "workers": workers},
            "engines": {
                "small": {"kind": "vllm", "command": ["true"], "port": self.ports["small_up"], "served_name": "small"},
                "stream": {"kind": "vllm", "command": ["true"], "port": self.ports["stream_up"],
                           "served_name": "stream"},
            },
        }
        path = self.work / f"engines-{workers}-{port}.yaml"
        path.write_text(yaml.safe_dump(catalog))
        return path

    def start_gate(self, name: str, workers: int, cpu: str | None) -> int:
        """A gate on port 0; returns its port (parsed from its 'listening on' line)."""
        path = self.write_catalog(workers)
        log = self.work / f"{name}.log"
        argv = [sys.executable, "-m", "reconciler.gate", "--config", str(path)]
        full = ["taskset", "-c", cpu, *argv] if cpu is not None else argv
        out = log.open("wb")
        proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.procs.append(proc)
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            for line in log.read_text().splitlines():
                if "ailayer gate listening on http://" in line:
                    port = int(line.rsplit(":", 1)[1])
                    self.pids[name] = proc.pid
                    self.gates[name] = port
                    self.wait_phase(port, "READY" if self._state and self._state.phase == "READY" else None)
                    return port
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        raise SystemExit(f"{name} never listened")

    def stop_gate(self, name: str) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(self.pids.pop(name))
            proc.terminate()
            proc.wait(10)
        self.gates.pop(name, None)

    # ------------------------------------------------------------------ the state we play

    def _write(self, phase: status.Phase, **fields: Any) -> None:
        with self._lock:
            self.revision += 1
            now = clock.iso()
            self._state = status.Status(phase=phase, phase_since=now, desired_model=fields.pop("desired", None),
                                        active_model=None, message="bench", revision=self.revision,
                                        reconciler={"pid": os.getpid(), "heartbeat": now}, **fields)
            state_file.write(self.state_path, self._state)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                if self._state is not None:
                    beat = {"pid": os.getpid(), "heartbeat": clock.iso()}
                    self._state = dataclasses.replace(self._state, reconciler=beat)
                    state_file.write(self.state_path, self._state)

    def ready(self, model: str) -> None:
        port = self.ports["small_up" if model == "small" else "stream_up"]
        info = status.EngineInfo(model=model, served_name=model, instance="bench", pid=None, pids=[],
                                 port=port, url=f"http://127.0.0.1:{port}", started_at=clock.iso(),
                                 adopted=False)
        self._write(status.Phase.READY, desired=model, engine=info)
        for port in self.gates.values():
            self.wait_phase(port, "READY", model)

    def idle(self) -> None:
        self._write(status.Phase.IDLE)
        for port in self.gates.values():
            self.wait_phase(port, "IDLE")

    def wait_phase(self, port: int, phase: str | None, model: str | None = None) -> None:
        if phase is None:
            return
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                got = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2).read())
                engine = got.get("engine") or {}
                wanted = model is None or engine.get("model") == model
                if got.get("phase") == phase and not got.get("stale") and wanted:
                    return
            time.sleep(0.02)
        raise SystemExit(f"the gate on {port} never showed {phase} {model or ''}")

    def upstream_count(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.ports['stream_up']}/count"
        return dict(json.loads(urllib.request.urlopen(url, timeout=5).read()))

    # ------------------------------------------------------------------ one measurement

    def measure(self, url: str, connections: int, script: str, proxy_pid: int | None,
                threads: int = 1, load_cpu: str | None = "") -> dict[str, float]:
        """One wrk run; adds the proxy's CPU per request and its core use."""
        if script == "stream":
            return self._measure_streams(url, connections, proxy_pid)
        cpu_before = tree_cpu(proxy_pid) if proxy_pid else 0.0
        t0 = time.monotonic()
        result = wrk(url, connections, self.seconds, self.scripts[script],
                     self.load_cpu if load_cpu == "" else load_cpu, threads, timeout=WRK_TIMEOUT)
        wall = time.monotonic() - t0
        if proxy_pid:
            used = tree_cpu(proxy_pid) - cpu_before
            result["proxy_cpu_s"] = used
            result["proxy_core_use"] = used / wall
            result["cpu_us_per_req"] = used / max(1.0, result["requests"]) * 1e6
        return result


    def _measure_streams(self, url: str, connections: int, proxy_pid: int | None) -> dict[str, float]:
        """Streams in steady state: wrk runs RAMP_S longer on each side, and tokens (counted by the
        upstream as it writes them) and the proxy's CPU are read over the middle ``seconds`` only,
        so opening 256 connections through the proxy is not counted against its token rate."""
        got: dict[str, float] = {}

        def run() -> None:
            got.update(wrk(url, connections, self.seconds + 2 * RAMP_S, self.scripts["stream"], self.load_cpu,
                           timeout=WRK_TIMEOUT))

        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(RAMP_S)
        cpu0, count0, t0 = tree_cpu(proxy_pid) if proxy_pid else 0.0, self.upstream_count(), time.monotonic()
        time.sleep(self.seconds)
        cpu1, count1, t1 = tree_cpu(proxy_pid) if proxy_pid else 0.0, self.upstream_count(), time.monotonic()
        thread.join()
        wall = t1 - t0
        tokens = count1["tokens"] - count0["tokens"]
        got.update(tokens=tokens, tok_s=tokens / wall, upstream_core_use=(count1["cpu_s"] - count0["cpu_s"]) / wall)
        if proxy_pid:
            got.update(proxy_cpu_s=cpu1 - cpu0, proxy_core_use=(cpu1 - cpu0) / wall,
                       cpu_us_per_token=(cpu1 - cpu0) / max(1.0, tokens) * 1e6)
        return got


# ---------------------------------------------------------------------------- phases


def phase_small(b: Bench, rounds: int, candidates: dict[str, int]) -> dict[str, Any]:
    b.ready("small")
    paths: dict[str, tuple[str, int | None]] = {
        "direct": (f"http://127.0.0.1:{b.ports['small_up']}", None),
        "nginx": (f"http://127.0.0.1:{b.ports['nginx_small']}", b.pids["nginx"]),
        "gate": (f"http://127.0.0.1:{b.gates['gate']}", b.pids["gate"]),
        **{name: (f"http://127.0.0.1:{port}", b.pids[name]) for name, port in candidates.items()},
    }
    raw: dict[str, dict[str, list[float]]] = {p: {} for p in paths}
    for r in range(rounds):
        for path in rotate(list(paths), r):
            url, pid = paths[path]
            lat = b.measure(url + "/v1/chat/completions", 1, "small", pid)
            thr = b.measure(url + "/v1/chat/completions", SMALL_CONNECTIONS, "small", pid)
            if lat["non2xx"] or thr["non2xx"] or thr.get("socket_errors"):
                raise SystemExit(f"{path}: errors during the run: {thr}")
            row = {"p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"], "rps": thr["rps"]}
            if pid:
                row["cpu_us_per_req"] = thr["cpu_us_per_req"]
                row["core_use"] = thr["proxy_core_use"]
            for k, v in row.items():
                raw[path].setdefault(k, []).append(v)
            print(f"  small r{r + 1} {path:14s} p50 {lat['p50_ms']:.3f} ms  {thr['rps']:8.0f} req/s @64"
                  + (f"  {thr['cpu_us_per_req']:6.1f} µs CPU/req  core {thr['proxy_core_use']:.0%}" if pid else ""),
                  flush=True)
    out: dict[str, Any] = {p: {k: spread(v) for k, v in m.items()} for p, m in raw.items()}
    for path in paths:
        if path != "direct":
            out[path]["added_p50_ms"] = spread([a - d for a, d in zip(raw[path]["p50_ms"], raw["direct"]["p50_ms"],
                                                                       strict=True)])
            out[path]["rps_vs_nginx"] = spread([a / n for a, n in zip(raw[path]["rps"], raw["nginx"]["rps"],
                                                                       strict=True)])
            out[path]["cpu_vs_nginx"] = spread([a / n for a, n in zip(raw[path]["cpu_us_per_req"],
                                                                       raw["nginx"]["cpu_us_per_req"], strict=True)])
            out[path]["added_p50_vs_nginx"] = spread([
                (a - d) / max(1e-3, n - d) for a, n, d in zip(raw[path]["p50_ms"], raw["nginx"]["p50_ms"],
                                                              raw["direct"]["p50_ms"], strict=True)])
    return out


def phase_428(b: Bench, rounds: int) -> dict[str, Any]:
    b.idle()
    paths = {"nginx static 428": (f"http://127.0.0.1:{b.ports['nginx_428']}", b.pids["nginx"]),
             "gate 428": (f"http://127.0.0.1:{b.gates['gate']}", b.pids["gate"])}
    raw: dict[str, dict[str, list[float]]] = {p: {} for p in paths}
    for r in range(rounds):
        for path in rotate(list(paths), r):
            url, pid = paths[path]
            got = b.measure(url + "/v1/chat/completions", SMALL_CONNECTIONS, "small", pid)
            if got.get("socket_errors"):
                raise SystemExit(f"{path}: socket errors {got}")
            for k in ("rps", "cpu_us_per_req", "proxy_core_use"):
                raw[path].setdefault(k, []).append(got[k])
            print(f"  428 r{r + 1} {path:16s} {got['rps']:8.0f} req/s  {got['cpu_us_per_req']:6.1f} µs CPU/req",
                  flush=True)
    out: dict[str, Any] = {p: {k: spread(v) for k, v in m.items()} for p, m in raw.items()}
    out["gate 428"]["rps_vs_nginx"] = spread([g / n for g, n in zip(raw["gate 428"]["rps"],
                                                                     raw["nginx static 428"]["rps"], strict=True)])
    b.ready("small")
    return out


def phase_streams(b: Bench, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for streams, token_ms in STREAM_LEVELS:
        b.restart_stream_upstream(token_ms)
        b.ready("stream")
        nominal = streams * 1000 / token_ms
        paths = {"direct": (f"http://127.0.0.1:{b.ports['stream_up']}", None),
                 "nginx": (f"http://127.0.0.1:{b.ports['nginx_stream']}", b.pids["nginx"]),
                 "gate": (f"http://127.0.0.1:{b.gates['gate']}", b.pids["gate"])}
        raw: dict[str, dict[str, list[float]]] = {p: {} for p in paths}
        for r in range(rounds):
            for path in rotate(list(paths), r):
                url, pid = paths[path]
                got = b.measure(url + "/v1/chat/completions", streams, "stream", pid)
                if got.get("socket_errors") or got["non2xx"]:
                    raise SystemExit(f"{path}: errors in streams {got}")
                keys = ["tok_s", "upstream_core_use"] + (["cpu_us_per_token", "proxy_core_use"] if pid else [])
                for k in keys:
                    raw[path].setdefault(k, []).append(got[k])
                print(f"  {streams} streams @{token_ms:g} ms r{r + 1} {path:6s} {got['tok_s']:8.0f} tok/s "
                      f"(nominal {nominal:.0f})"
                      + (f"  {got['cpu_us_per_token']:5.1f} µs CPU/token  core {got['proxy_core_use']:.0%}"
                         if pid else ""), flush=True)
        level: dict[str, Any] = {p: {k: spread(v) for k, v in m.items()} for p, m in raw.items()}
        level["nominal_tok_s"] = nominal
        level["gate_vs_direct"] = spread([g / d for g, d in zip(raw["gate"]["tok_s"], raw["direct"]["tok_s"],
                                                                strict=True)])
        level["gate_cpu_vs_nginx"] = spread([g / n for g, n in zip(raw["gate"]["cpu_us_per_token"],
                                                                   raw["nginx"]["cpu_us_per_token"], strict=True)])
        out[f"{streams}x{token_ms:g}ms"] = level
    b.ready("small")
    return out


def phase_workers(b: Bench, rounds: int, workers: int, workers_cpu: str | None) -> dict[str, Any]:
    """One worker on one core vs ``workers`` on ``workers_cpu``. Without ``workers_cpu`` (a
    2-core box) the N workers and wrk float over all cores; with it (a machine with cores to
    spare) wrk stays on the load cores, so the gate's cores are its own."""
    b.ready("small")
    for name in list(b.gates):
        b.stop_gate(name)
    raw: dict[str, dict[str, list[float]]] = {"1 worker": {}, f"{workers} workers": {}}
    setups: dict[str, tuple[int, str | None]] = {"1 worker": (1, b.proxy_cpu),
                                                 f"{workers} workers": (workers, workers_cpu)}
    load_cpu = None if workers_cpu is None else b.load_cpu
    for r in range(rounds):
        for name in rotate(list(setups), r):
            count, cpu = setups[name]
            b.start_gate("scale", count, cpu)
            b.ready("small")
            got = b.measure(f"http://127.0.0.1:{b.gates['scale']}/v1/chat/completions", SMALL_CONNECTIONS,
                            "small", b.pids["scale"], threads=workers, load_cpu=load_cpu)
            b.stop_gate("scale")
            for k in ("rps", "cpu_us_per_req", "proxy_core_use"):
                raw[name].setdefault(k, []).append(got[k])
            print(f"  scale r{r + 1} {name:10s} {got['rps']:8.0f} req/s  {got['cpu_us_per_req']:6.1f} µs CPU/req  "
                  f"cores {got['proxy_core_use']:.2f}", flush=True)
    out: dict[str, Any] = {p: {k: spread(v) for k, v in m.items()} for p, m in raw.items()}
    out["speedup"] = spread([m / s for m, s in zip(raw[f"{workers} workers"]["rps"], raw["1 worker"]["rps"],
                                                   strict=True)])
    return out


# ---------------------------------------------------------------------------- report


def report(res: dict[str, Any]) -> str:
    lines = []
    small = res.get("small")
    if small:
        lines += ["", "small requests (wrk, POST /v1/chat/completions):", "",
                  "| path | p50 ms @1 | added p50 ms | req/s @64 | proxy CPU µs/req | proxy core use |",
                  "|---|---|---|---|---|---|"]
        for path, m in small.items():
            added = fmt(m['added_p50_ms'], 3) if 'added_p50_ms' in m else '-'
            lines.append(f"| {path} | {fmt(m['p50_ms'], 3)} | {added}"
                         f" | {fmt(m['rps'])} | {fmt(m['cpu_us_per_req'], 1) if 'cpu_us_per_req' in m else '-'}"
                         f" | {fmt(m['core_use'], 2) if 'core_use' in m else '-'} |")
    if "idle_428" in res:
        lines += ["", "| 428 path | req/s @64 | CPU µs/answer |", "|---|---|---|"]
        for path, m in res["idle_428"].items():
            lines.append(f"| {path} | {fmt(m['rps'])} | {fmt(m['cpu_us_per_req'], 1)} |")
    for level, m in res.get("streams", {}).items():
        lines += ["", f"streams {level} (nominal {m['nominal_tok_s']:,.0f} tok/s):", "",
                  "| path | tok/s | proxy CPU µs/token | upstream core use |", "|---|---|---|---|"]
        for path in ("direct", "nginx", "gate"):
            p = m[path]
            cpu = fmt(p['cpu_us_per_token'], 1) if 'cpu_us_per_token' in p else '-'
            lines.append(f"| {path} | {fmt(p['tok_s'])} | {cpu}"
                         f" | {fmt(p['upstream_core_use'], 2)} |")
    if "workers" in res:
        lines += ["", "| gate | req/s @64 | CPU µs/req | cores used |", "|---|---|---|---|"]
        for name, m in res["workers"].items():
            if name != "speedup":
                lines.append(f"| {name} | {fmt(m['rps'])} | {fmt(m['cpu_us_per_req'], 1)} "
                             f"| {fmt(m['proxy_core_use'], 2)} |")
    lines += ["", "targets (issue 14), medians of per-round ratios:", ""]
    lines += targets(res)
    return "\n".join(lines)


def targets(res: dict[str, Any]) -> list[str]:
    rows = []

    def row(what: str, value: dict[str, float] | None, ok: Callable[[float], bool], unit: str = "") -> None:
        if value is None:
            rows.append(f"- {what}: not measured")
            return
        rows.append(f"- {what}: {value['median']:.2f}{unit} ({value['min']:.2f}-{value['max']:.2f}) "
                    f"{'MET' if ok(value['median']) else 'NOT MET'}")

    small = res.get("small", {}).get("gate", {})
    row("small req/s @64, gate/nginx (≥ 0.50)", small.get("rps_vs_nginx"), lambda v: v >= 0.5)
    row("small CPU per request, gate/nginx (≤ 2.0 would be 50 % at equal cores)", small.get("cpu_vs_nginx"),
        lambda v: v <= 2.0)
    level = next(iter(res.get("streams", {}).values()), None)
    worst = res.get("streams", {})
    for name, m in worst.items():
        row(f"streams {name}: CPU per token gate/nginx (≤ 2.0)", m["gate_cpu_vs_nginx"], lambda v: v <= 2.0)
        row(f"streams {name}: tok/s gate/direct (≥ 0.98)", m["gate_vs_direct"], lambda v: v >= 0.98)
    del level
    g428 = res.get("idle_428", {}).get("gate 428", {})
    row("428 path req/s, gate/nginx static (≥ 0.25)", g428.get("rps_vs_nginx"), lambda v: v >= 0.25)
    row("2 workers on 2 cores / 1 worker on 1 (≥ 1.8)", res.get("workers", {}).get("speedup"), lambda v: v >= 1.8)
    row("added p50 @1 connection, gate/nginx (≤ 1.5)", small.get("added_p50_vs_nginx"), lambda v: v <= 1.5)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per wrk run")
    parser.add_argument("--proxy-cpu", default="0")
    parser.add_argument("--load-cpu", default="1", help="upstreams and wrk")
    parser.add_argument("--workers", type=int, default=2, help="gate workers for the scaling run (0: skip it)")
    parser.add_argument("--workers-cpu", default=None,
                        help="cores of the scaling run's N workers, e.g. 0,1 with --load-cpu 2-7 on a machine "
                             "with cores to spare (default: all cores, shared with wrk)")
    parser.add_argument("--only", nargs="*", default=None, help="subset: small 428 streams workers")
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=ARGV",
                        help="another proxy for the small-request table; ARGV with {port} and {upstream}")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    ns = parser.parse_args()
    ensure_tools()
    os.environ["AILAYER_TOKEN"] = ""
    only = set(ns.only or ["small", "428", "streams", "workers"])
    load = os.getloadavg()
    res: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                       "loadavg_at_start": load, "proxy_cpu": ns.proxy_cpu,
                                       "load_cpu": ns.load_cpu},
                           "settings": {"rounds": ns.rounds, "seconds": ns.seconds, "stream_tokens": STREAM_TOKENS}}
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    with workdir(ns.keep, "gate-throughput-") as work:
        b = Bench(work, ns.proxy_cpu, ns.load_cpu, ns.seconds)
        try:
            b.start(STREAM_LEVELS[0][1])
            b.start_gate("gate", 1, ns.proxy_cpu)
            candidates: dict[str, int] = {}
            for spec in ns.candidate:
                name, _, argv = spec.partition("=")
                port = free_port()
                catalog = b.write_catalog(1, port)
                cmd = [a.format(port=port, upstream=f"127.0.0.1:{b.ports['small_up']}", catalog=catalog,
                                python=sys.executable) for a in shlex.split(argv)]
                b.pids[name] = b.procs.start(name, cmd, ns.proxy_cpu).pid
                wait_port(port, name)
                candidates[name] = port
            if "small" in only:
                print("small requests:", flush=True)
                res["small"] = phase_small(b, ns.rounds, candidates)
            if "428" in only:
                print("428 path:", flush=True)
                res["idle_428"] = phase_428(b, ns.rounds)
            if "streams" in only:
                print("streams:", flush=True)
                res["streams"] = phase_streams(b, ns.rounds)
            if "workers" in only and ns.workers > 1:
                print("workers:", flush=True)
                res["workers"] = phase_workers(b, ns.rounds, ns.workers, ns.workers_cpu)
        finally:
            b._stop.set()
            b.procs.stop()
            if ns.keep:
                print(f"logs in {work}")
    res["machine"]["loadavg_at_end"] = os.getloadavg()
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(res, indent=2) + "\n")
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
