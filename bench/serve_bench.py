"""The serving row of `make bench`: `python -m finetune serve` of a workspace's production model
(or --serving-model), ``requests`` POSTs of one photo-sized JPEG at ``concurrency`` clients, each
on its own keep-alive connection; requests/s, p50/p95/p99 latency, the statuses, and the server's
resident memory before (after a warm-up of ``concurrency`` requests) and after.

The clients run on the same machine as the server (threads of this process): on a small machine
they take some of its CPU, so the numbers are a floor for a server on its own machine.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = (500, 375)  # a typical hot-dog photo (the dataset's images are about 500 px wide)


def photo() -> bytes:
    """A smooth, noisy 500x375 JPEG (about 40 KB): decodes and resizes like a photo."""
    rng = np.random.default_rng(0)
    width, height = IMAGE_SIZE
    ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3)) * [1.0, 0.6, 0.3]
    pixels = np.clip(ramp + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def start(ws: Path, port: int, model: str | None, log: Path) -> subprocess.Popen:
    """`python -m finetune serve` in ``ws``, once it answers /ping (its output in ``log``)."""
    from finetune.demo.workspace import stage_env
    from finetune.ports import wait_until_answers

    command = [sys.executable, "-m", "finetune", "serve", "--port", str(port), *(["--model", model] if model else [])]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ws, stdout=out, stderr=subprocess.STDOUT, env=stage_env())
    why = wait_until_answers(process, f"http://127.0.0.1:{port}/ping", 300)
    if why:
        sys.exit(f"bench: the server in {ws} {why}:\n{log.read_text()[-3000:]}")
    return process


def client(port: int, body: bytes, count: int, latencies: list, statuses: dict) -> None:
    """``count`` POSTs on one keep-alive connection (a new one after the server closes it)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for _ in range(count):
        tick = time.perf_counter()
        try:
            connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            connection.close()
            status = "error"
        latencies.append(time.perf_counter() - tick)
        statuses[status] = statuses.get(status, 0) + 1
    connection.close()


def load(port: int, body: bytes, requests: int, concurrency: int) -> tuple[list[float], dict, float]:
    """``requests`` POSTs spread over ``concurrency`` threads: latencies, statuses, wall seconds."""
    latencies: list[float] = []
    statuses: dict = {}
    shares = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    threads = [threading.Thread(target=client, args=(port, body, n, latencies, statuses)) for n in shares]
    tick = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, statuses, time.perf_counter() - tick


def serving_timings(ws: Path, requests: int = 2000, concurrency: int = 16, model: str | None = None) -> dict:
    """The serving row: see the module's docstring."""
    body = json.dumps({"dataframe_records": [{"image": base64.b64encode(photo()).decode()}]}).encode()
    port, log = free_port(), ws / "serve-bench.log"
    process = start(ws, port, model, log)
    try:
        load(port, body, concurrency, concurrency)  # warm-up: each thread's first request
        before = rss_mb(process.pid)
        latencies, statuses, wall = load(port, body, requests, concurrency)
        after = rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
    ranked = sorted(latencies)

    def at(share: float) -> float:
        return round(1000 * ranked[min(len(ranked) - 1, int(share * len(ranked)))], 1)

    return {"requests": requests, "concurrency": concurrency, "image": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEG",
            "model": model or "production", "req_s": round(requests / wall, 1), "wall_s": round(wall, 1),
            "p50_ms": round(1000 * statistics.median(ranked), 1), "p95_ms": at(0.95), "p99_ms": at(0.99),
            "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "rss_before_mb": before, "rss_after_mb": after}


def serving_line(row: dict) -> str:
    """The serving row as one line under the bench table (it names its own machine and date: a
    --serving-only run adds it to an earlier report)."""
    statuses = ", ".join(f"{n} × {s}" for s, n in row["statuses"].items())
    return (f"serving, on {row['machine']}, {row['date']} ({row['model']}, {row['requests']:,} requests of one "
            f"{row['image']} at concurrency "
            f"{row['concurrency']}): {row['req_s']} req/s, p50 {row['p50_ms']} ms, p95 {row['p95_ms']} ms, "
            f"p99 {row['p99_ms']} ms; server RSS {row['rss_before_mb']} MB before, {row['rss_after_mb']} MB after; "
            f"{statuses}")
