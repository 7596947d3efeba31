"""Benchmark the gate against direct access and nginx, on one demo engine (issue 3).

    .venv/bin/python bench/gate_bench.py [--rounds 5] [--seconds 4] [--json OUT]

Its requests/s are not the gate's: the demo engine (an aiohttp server) caps nginx too, so the
ratio to nginx is meaningless (issue 14). bench/gate_throughput.py measures throughput and CPU
per request on upstreams that cannot be the limit; this one stays for latency, time to first
token and the long-poll figures.

What it measures, in one run, alternating the paths every round and reporting medians
with their spread (min-max over rounds):

* small requests (POST /v1/chat/completions, max_tokens 0, so the gate parses the body):
  latency p50/p99 at one connection and requests/s at 64, through the gate, directly,
  through nginx in front of the engine, and through nginx in front of the gate;
* the 428 path (phase IDLE) requests/s;
* streaming at 1, 64 and 256 concurrent streams: time to first token and tokens/s,
  through the gate vs directly;
* the gate's memory with 1,000 idle long-poll clients, and how long it takes for all of
  them to be answered after one state change.

The gate (and nginx, when measured) run on one core; the engine and the load generators
on the other (taskset), so the proxy under test never competes with what drives it.
nginx and wrk are Debian packages; the script installs them with apt-get when missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reconciler.domain import status  # noqa: E402
from reconciler.kit import clock  # noqa: E402
from reconciler.kit.freeport import free_port  # noqa: E402
from reconciler.store import state_file  # noqa: E402

SERVED = "openai/gpt-oss-20b"
# A big model streams ~20-100 tokens/s; 20 ms per token sits in that range.
TOKEN_DELAY_MS = 20
STREAM_TOKENS = 100
STREAM_LEVELS = (1, 64, 256)
LONG_POLLERS = 1000
THROUGHPUT_CONNECTIONS = 64
START_DEADLINE_S = 30.0
# The reconciler's default resync: the bench plays the reconciler, heartbeat included, so
# the gate never sees a stale state (and the file changes as often as in production).
HEARTBEAT_S = 5.0

NGINX_CONF = """\
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  upstream backend {{
    server {upstream};
    keepalive 256;
    keepalive_timeout {upstream_keepalive};
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_timeout 75s;
    keepalive_requests 100000;
    client_max_body_size 64m;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_cache off;
      proxy_connect_timeout 5s;
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
    }}
  }}
}}
"""

WRK_POST = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{body}'
"""


# --------------------------------------------------------------------------- setup


def ensure_tools() -> None:
    """nginx and wrk from Debian; installed when missing (needs root)."""
    missing = [pkg for pkg in ("nginx", "wrk") if not shutil.which(pkg) and not Path(f"/usr/sbin/{pkg}").exists()]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"install {' '.join(missing)}: apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)




def wait_port(port: int, what: str) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not open port {port}")


class Procs:
    """Started processes; all of them (and their children) stopped at the end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], cpu: str | None) -> subprocess.Popen[bytes]:
        full = ["taskset", "-c", cpu, *argv] if cpu is not None else argv
        with (self.logdir / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        tree: list[psutil.Process] = []
        for proc in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                parent = psutil.Process(proc.pid)
                tree += [parent, *parent.children(recursive=True)]
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


class Stack:
    """The engine, the gate and two nginx instances, plus the state the gate follows."""

    def __init__(self, work: Path, gate_cpu: str, load_cpu: str) -> None:
        self.work = work
        self.gate_cpu = gate_cpu
        self.load_cpu = load_cpu
        self.procs = Procs(work)
        self.revision = 0
        self.engine_port = free_port()
        self.gate_port = free_port()
        self.nginx_engine_port = free_port()
        self.nginx_gate_port = free_port()
        self.state_path = work / "run" / "observed_state.json"
        self.gate_pid = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._status: status.Status | None = None
        threading.Thread(target=self._heartbeat, daemon=True).start()

    def urls(self) -> dict[str, str]:
        return {
            "direct": f"http://127.0.0.1:{self.engine_port}",
            "gate": f"http://127.0.0.1:{self.gate_port}",
            "nginx": f"http://127.0.0.1:{self.nginx_engine_port}",
            "nginx+gate": f"http://127.0.0.1:{self.nginx_gate_port}",
        }

    def start(self) -> None:
        py = sys.executable
        self.procs.start("engine", [
            py, "-m", "reconciler.engines.demo.vllm_like", "serve", SERVED, "--host", "127.0.0.1",
            "--port", str(self.engine_port), "--boot-seconds", "0",
            "--token-delay-ms", str(TOKEN_DELAY_MS), "--vram-mb", "1",
        ], self.load_cpu)  # fmt: skip
        catalog = {
            "state_dir": str(self.work / "run"),
            "desired_state": str(self.work / "desired_state.yaml"),
            "log_file": str(self.work / "activity.log"),
            "gate": {"listen": f"127.0.0.1:{self.gate_port}"},
            "engines": {"gpt-oss": {"kind": "vllm", "command": ["true"], "port": self.engine_port,
                                    "served_name": SERVED}},
        }
        (self.work / "engines.yaml").write_text(yaml.safe_dump(catalog))
        gate = self.procs.start("gate", [py, "-m", "reconciler.gate", "--config",
                                         str(self.work / "engines.yaml")], self.gate_cpu)
        self.gate_pid = gate.pid
        self._nginx("nginx-engine", self.nginx_engine_port, self.engine_port, "4s")
        self._nginx("nginx-gate", self.nginx_gate_port, self.gate_port, "60s")
        for port, what in ((self.engine_port, "engine"), (self.gate_port, "gate"),
                           (self.nginx_engine_port, "nginx"), (self.nginx_gate_port, "nginx")):
            wait_port(port, what)
        self.ready()

    def _nginx(self, name: str, port: int, upstream: int, keepalive: str) -> None:
        prefix = self.work / name
        prefix.mkdir()
        conf = NGINX_CONF.format(prefix=prefix, port=port, upstream=f"127.0.0.1:{upstream}",
                                 upstream_keepalive=keepalive,
                                 user="user root;" if os.geteuid() == 0 else "")
        (prefix / "nginx.conf").write_text(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.procs.start(name, [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                "-g", "daemon off;"], self.gate_cpu)

    def write(self, phase: status.Phase, **fields: Any) -> None:
        with self._lock:
            self.revision += 1
            now = clock.iso()
            self._status = status.Status(
                phase=phase, phase_since=now, desired_model="gpt-oss", active_model=None,
                message="bench", revision=self.revision,
                reconciler={"pid": os.getpid(), "heartbeat": now}, **fields)
            state_file.write(self.state_path, self._status)

    def _heartbeat(self) -> None:
        """Rewrite the state with a fresh heartbeat, as the reconciler does every resync."""
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                if self._status is not None:
                    beat = {"pid": os.getpid(), "heartbeat": clock.iso()}
                    self._status = dataclasses.replace(self._status, reconciler=beat)
                    state_file.write(self.state_path, self._status)

    def ready(self, wait: bool = True) -> None:
        info = status.EngineInfo(model="gpt-oss", served_name=SERVED, instance="bench", pid=None,
                                 pids=[], port=self.engine_port,
                                 url=f"http://127.0.0.1:{self.engine_port}",
                                 started_at=clock.iso(), adopted=False)
        self.write(status.Phase.READY, engine=info)
        if wait:
            self.wait_phase("READY")

    def idle(self) -> None:
        self.write(status.Phase.IDLE)
        self.wait_phase("IDLE")

    def wait_phase(self, phase: str) -> None:
        import httpx

        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                got = httpx.get(self.urls()["gate"] + "/status", timeout=2).json()
                if got.get("phase") == phase and not got.get("stale"):
                    return
            time.sleep(0.02)
        raise SystemExit(f"the gate never showed phase {phase}")

    def gate_rss_mb(self) -> float:
        return float(psutil.Process(self.gate_pid).memory_info().rss) / 2**20


# --------------------------------------------------------------------------- wrk

def wrk(url: str, connections: int, seconds: float, script: Path, cpu: str | None,
        threads: int = 1, timeout: str | None = None) -> dict[str, float]:
    """One wrk run (pinned to ``cpu`` when given): its parsed figures (``wrk_parse``)."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            *(["--timeout", timeout] if timeout else []), "--latency", "-s", str(script), url]
    if cpu:
        argv = ["taskset", "-c", cpu, *argv]
    return wrk_parse(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


def wrk_parse(out: str) -> dict[str, float]:
    units = {"us": 1e-3, "ms": 1.0, "s": 1000.0}

    def ms(text: str) -> float:
        m = re.match(r"([\d.]+)(us|ms|s)", text)
        return float(m.group(1)) * units[m.group(2)] if m else float("nan")

    done = re.search(r"(\d+) requests in ([\d.]+)(ms|s)", out)
    if not done:
        raise SystemExit(f"wrk said: {out}")
    res = {"requests": float(done.group(1)),
           "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        line = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        res[f"p{pct}_ms"] = ms(line.group(1)) if line else float("nan")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    res["non2xx"] = float(bad.group(1)) if bad else 0.0
    errors = re.search(r"Socket errors:.*", out)
    res["socket_errors"] = float(sum(int(n) for n in re.findall(r"\d+", errors.group(0)))) if errors else 0.0
    return res


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def rotate(items: list[str], k: int) -> list[str]:
    k %= len(items)
    return items[k:] + items[:k]


def bench_small(stack: Stack, rounds: int, seconds: float) -> dict[str, Any]:
    body = json.dumps({"model": SERVED, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 0})
    script = stack.work / "post.lua"
    script.write_text(WRK_POST.format(body=body))
    urls = stack.urls()
    raw: dict[str, dict[str, list[float]]] = {p: {"p50": [], "p99": [], "rps": [], "rps_c1": []}
                                              for p in urls}
    for r in range(rounds):
        for path in rotate(list(urls), r):
            url = urls[path] + "/v1/chat/completions"
            lat = wrk(url, 1, seconds, script, stack.load_cpu)
            thr = wrk(url, THROUGHPUT_CONNECTIONS, seconds, script, stack.load_cpu)
            if lat["non2xx"] or thr["non2xx"]:
                raise SystemExit(f"{path}: non-2xx answers during the benchmark")
            raw[path]["p50"].append(lat["p50_ms"])
            raw[path]["p99"].append(lat["p99_ms"])
            raw[path]["rps_c1"].append(lat["rps"])
            raw[path]["rps"].append(thr["rps"])
            print(f"  round {r + 1} {path:11s} p50 {lat['p50_ms']:.3f} ms  p99 "
                  f"{lat['p99_ms']:.3f} ms  {thr['rps']:.0f} req/s @{THROUGHPUT_CONNECTIONS}",
                  flush=True)
    out: dict[str, Any] = {p: {k: spread(v) for k, v in m.items()} for p, m in raw.items()}
    for path in ("gate", "nginx", "nginx+gate"):
        added50 = [a - b for a, b in zip(raw[path]["p50"], raw["direct"]["p50"], strict=True)]
        added99 = [a - b for a, b in zip(raw[path]["p99"], raw["direct"]["p99"], strict=True)]
        out[path]["added_p50_ms"] = spread(added50)
        out[path]["added_p99_ms"] = spread(added99)
    return out


def bench_428(stack: Stack, rounds: int, seconds: float) -> dict[str, Any]:
    stack.idle()
    script = stack.work / "post.lua"
    url = stack.urls()["gate"] + "/v1/chat/completions"
    rps = []
    for r in range(rounds):
        result = wrk(url, THROUGHPUT_CONNECTIONS, seconds, script, stack.load_cpu)
        rps.append(result["rps"])
        print(f"  round {r + 1} 428 path {result['rps']:.0f} req/s", flush=True)
    stack.ready()
    return {"rps": spread(rps)}


# --------------------------------------------------------------------------- streams


async def _one_stream(session: Any, url: str, tokens: int) -> tuple[float, float, int]:
    body = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": tokens, "stream": True}
    started = time.perf_counter()
    first = last = 0.0
    count = 0
    buf = b""
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, resp.status
        async for chunk in resp.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if event.startswith(b"data: {") and b'"content"' in event:
                    now = time.perf_counter()
                    if count == 0:
                        first = now
                    last = now
                    count += 1
    ttft = first - started
    rate = (count - 1) / (last - first) if count > 1 and last > first else 0.0
    return ttft, rate, count


async def _streams(url: str, concurrency: int, tokens: int) -> dict[str, float]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(_one_stream(session, url, tokens)
                                         for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ttfts = sorted(r[0] for r in results)
    return {
        "ttft_p50_ms": statistics.median(ttfts) * 1000,
        "ttft_max_ms": ttfts[-1] * 1000,
        "per_stream_tok_s": statistics.median(r[1] for r in results),
        "aggregate_tok_s": sum(r[2] for r in results) / wall,
        "tokens": float(sum(r[2] for r in results)),
    }


def run_child(stack: Stack, *args: str) -> dict[str, Any]:
    """Run a load generator in a child pinned to the load core; it prints one JSON line."""
    argv = ["taskset", "-c", stack.load_cpu, sys.executable, __file__, *args]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def bench_streams(stack: Stack, rounds: int) -> dict[str, Any]:
    urls = stack.urls()
    out: dict[str, Any] = {}
    for level in STREAM_LEVELS:
        raw: dict[str, dict[str, list[float]]] = {"direct": {}, "gate": {}}
        for r in range(rounds):
            for path in rotate(["direct", "gate"], r):
                got = run_child(stack, "_streams", urls[path], str(level), str(STREAM_TOKENS))
                expected = level * STREAM_TOKENS
                if got["tokens"] != expected:
                    raise SystemExit(f"{path}: {got['tokens']} tokens, expected {expected}")
                for key, value in got.items():
                    raw[path].setdefault(key, []).append(value)
                print(f"  {level:3d} streams round {r + 1} {path:6s} ttft p50 "
                      f"{got['ttft_p50_ms']:.2f} ms  {got['per_stream_tok_s']:.1f} tok/s/stream"
                      f"  {got['aggregate_tok_s']:.0f} tok/s total", flush=True)
        level_out: dict[str, Any] = {p: {k: spread(v) for k, v in m.items()}
                                     for p, m in raw.items()}
        level_out["added_ttft_p50_ms"] = spread(
            [a - b for a, b in zip(raw["gate"]["ttft_p50_ms"], raw["direct"]["ttft_p50_ms"],
                                   strict=True)])
        level_out["aggregate_ratio"] = spread(
            [a / b for a, b in zip(raw["gate"]["aggregate_tok_s"],
                                   raw["direct"]["aggregate_tok_s"], strict=True)])
        out[str(level)] = level_out
    return out


# --------------------------------------------------------------------------- long-poll


async def _pollers(url: str, count: int, revision: int) -> dict[str, float]:
    """Open ``count`` long-polls; say when all wait; report when their answers arrived.

    Times are ``perf_counter`` values (CLOCK_MONOTONIC, shared by all processes), so the
    parent, which makes the state change, can subtract its own timestamp.
    """
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    arrivals: list[float] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def poll() -> None:
            async with session.get(url + "/status",
                                   params={"wait": "90", "since": str(revision)}) as resp:
                await resp.read()
                arrivals.append(time.perf_counter())

        tasks = [asyncio.create_task(poll()) for _ in range(count)]
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            async with session.get(url + "/metrics") as resp:
                text = await resp.text()
            match = re.search(r"^ailayer_gate_watchers ([\d.]+)", text, re.M)
            if match and float(match.group(1)) >= count:
                break
            if time.monotonic() > deadline:
                raise SystemExit("long-pollers never all waited")
            await asyncio.sleep(0.05)
        print(json.dumps({"waiting": count}), flush=True)
        await asyncio.gather(*tasks)
    return {"last": max(arrivals), "median": statistics.median(arrivals)}


def bench_longpoll(stack: Stack, rounds: int) -> dict[str, Any]:
    url = stack.urls()["gate"]
    raw: dict[str, list[float]] = {"rss_idle_mb": [], "rss_with_pollers_mb": [],
                                   "all_woken_ms": [], "median_woken_ms": []}
    for r in range(rounds):
        stack.ready()
        rss_before = stack.gate_rss_mb()
        argv = ["taskset", "-c", stack.load_cpu, sys.executable, __file__, "_pollers", url,
                str(LONG_POLLERS), str(stack.revision)]
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert child.stdout is not None
        json.loads(child.stdout.readline())  # {"waiting": N}
        rss = stack.gate_rss_mb()
        changed = time.perf_counter()
        stack.ready(wait=False)  # one state change wakes them all
        result = json.loads(child.stdout.read().strip().splitlines()[-1])
        child.wait()
        woken = (result["last"] - changed) * 1000
        raw["rss_idle_mb"].append(rss_before)
        raw["rss_with_pollers_mb"].append(rss)
        raw["all_woken_ms"].append(woken)
        raw["median_woken_ms"].append((result["median"] - changed) * 1000)
        print(f"  round {r + 1} gate RSS {rss_before:.1f} -> {rss:.1f} MiB with "
              f"{LONG_POLLERS} pollers; all woken in {woken:.1f} ms", flush=True)
    return {k: spread(v) for k, v in raw.items()}


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def workdir(keep: bool, prefix: str = "gate-bench-") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_streams":
        url, level, tokens = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(asyncio.run(_streams(url, level, tokens))))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_pollers":
        url, count, rev = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(asyncio.run(_pollers(url, count, rev))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stream-rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="per wrk run")
    parser.add_argument("--gate-cpu", default="0")
    parser.add_argument("--load-cpu", default="1", help="engine and load generators")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="subset: small 428 streams longpoll")
    ns = parser.parse_args()
    ensure_tools()
    os.environ["AILAYER_TOKEN"] = ""
    only = set(ns.only or ["small", "428", "streams", "longpoll"])
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "gate_cpu": ns.gate_cpu, "load_cpu": ns.load_cpu,
                    "python": sys.version.split()[0]},
        "settings": {"rounds": ns.rounds, "seconds": ns.seconds,
                     "token_delay_ms": TOKEN_DELAY_MS, "stream_tokens": STREAM_TOKENS},
    }
    with workdir(ns.keep) as work:
        stack = Stack(work, ns.gate_cpu, ns.load_cpu)
        try:
            stack.start()
            if "small" in only:
                print("small requests (latency @1 connection, throughput @64):", flush=True)
                results["small"] = bench_small(stack, ns.rounds, ns.seconds)
            if "428" in only:
                print("428 path:", flush=True)
                results["idle_428"] = bench_428(stack, ns.rounds, ns.seconds)
            if "streams" in only:
                print("streaming:", flush=True)
                results["streams"] = bench_streams(stack, ns.stream_rounds)
            if "longpoll" in only:
                print(f"{LONG_POLLERS} long-pollers:", flush=True)
                results["longpoll"] = bench_longpoll(stack, ns.stream_rounds)
        finally:
            stack.procs.stop()
            if ns.keep:
                print(f"logs in {work}")
    text = json.dumps(results, indent=2)
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
