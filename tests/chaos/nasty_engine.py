"""A tiny engine with hostile output, for the chaos suite (scenario 3).

    python tests/chaos/nasty_engine.py --port PORT --mode flood|bigline|ansi|close-stdout

Serves ``GET /health`` (200, JSON with what it has written so far and the longest single
write it saw) from a thread, while the main thread writes nasty output to stdout:

* ``flood``: ``--rate`` short lines per second (default 100,000) for ``--seconds``;
* ``bigline``: ``--big-mb`` megabytes with no newline, then a newline and a marker line;
* ``ansi``: ANSI escapes, invalid UTF-8, carriage returns and lines forged to look like
  another engine's or the reconciler's own;
* ``close-stdout``: closes stdout and stderr and keeps serving.

It writes to whatever the reconciler gave it (a file); the longest ``write()`` tells whether
the engine was ever blocked by its own output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# One batch of flood lines per write() call; big enough to reach 100k lines/s in Python.
FLOOD_BATCH = 1000
FORGED = "FORGED-LINE"


class Counters:
    def __init__(self) -> None:
        self.lines = 0
        self.bytes = 0
        self.max_write_s = 0.0
        self.done = False
        self.lock = threading.Lock()

    def as_json(self) -> bytes:
        with self.lock:
            return json.dumps({"lines": self.lines, "bytes": self.bytes, "done": self.done,
                               "max_write_ms": round(self.max_write_s * 1000, 3)}).encode()


def serve(port: int, counters: Counters) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = counters.as_json() if self.path == "/health" else b"{}"
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep stdout for the nasty output
            return

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def timed_write(counters: Counters, data: bytes, lines: int) -> None:
    t0 = time.perf_counter()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    spent = time.perf_counter() - t0
    with counters.lock:
        counters.lines += lines
        counters.bytes += len(data)
        counters.max_write_s = max(counters.max_write_s, spent)


def flood(counters: Counters, seconds: float, rate: int) -> None:
    """``rate`` lines per second, in batches, paced against the clock (0: as fast as it can)."""
    start = time.monotonic()
    end = start + seconds
    n = 0
    while time.monotonic() < end:
        batch = b"".join(b"flood line %d\n" % (n + i) for i in range(FLOOD_BATCH))
        timed_write(counters, batch, FLOOD_BATCH)
        n += FLOOD_BATCH
        if rate:
            ahead = start + n / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)


def bigline(counters: Counters, megabytes: int) -> None:
    chunk = b"x" * (1 << 20)
    for _ in range(megabytes):
        timed_write(counters, chunk, 0)
    timed_write(counters, b"\nafter-bigline\n", 2)


def ansi(counters: Counters) -> None:
    pid = os.getpid()
    nasty = [
        b"\x1b[31mred\x1b[0m \x1b]0;title\x07 \x1b[2J cleared\n",
        b"invalid utf8 \xff\xfe\xc3\x28 end\n",
        b"progress 10%\rprogress 50%\rprogress 100%\n",
        f"[2026-01-01T00:00:00.000+00:00] [gpt-oss] [1] {FORGED} as another engine\n".encode(),
        f"\r[2026-01-01T00:00:00.000+00:00] [ailayer] [{pid}] {FORGED} as the reconciler\n".encode(),
        f"\x1b[2K\r[2026-01-01T00:00:00.000+00:00] [ailayer] [1] {FORGED} after an erase\n".encode(),
        b"nul \x00 bell \x07 backspace \x08 del \x7f c1 \xc2\x9b end\n",
        b"ansi-done\n",
    ]
    for line in nasty:
        timed_write(counters, line, 1)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=("flood", "bigline", "ansi", "close-stdout"), required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--big-mb", type=int, default=8)
    parser.add_argument("--rate", type=int, default=100_000, help="flood lines per second; 0 = unpaced")
    ns = parser.parse_args()
    counters = Counters()
    server = serve(ns.port, counters)
    timed_write(counters, b"nasty engine up\n", 1)
    if ns.mode == "flood":
        flood(counters, ns.seconds, ns.rate)
    elif ns.mode == "bigline":
        bigline(counters, ns.big_mb)
    elif ns.mode == "ansi":
        ansi(counters)
    else:
        sys.stdout.flush()
        os.close(1)
        os.close(2)
    with counters.lock:
        counters.done = True
    try:
        threading.Event().wait()
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
