"""Load test of `m2det serve`: requests/s, latency and the server's memory, batching off and on.

Starts the server as a user would (`m2det serve`, a fresh process on 127.0.0.1, random weights:
speed does not depend on them), then for each model and batching setting runs a bounded load of
1, 8 and 32 concurrent clients posting the same 640x480 JPEG, each cell for `--seconds` seconds.
It reports requests/s, p50/p95 latency (client side), answers other than 200 (503s when the
in-flight bound is reached), the mean batch size the server reported, and the server's peak
resident memory (VmHWM). Then a fresh server answers two PNG bombs (headers declaring 10000 x
10000 and 30000 x 30000 pixels) and its peak memory before and after is reported.

Prints a markdown table and writes JSON (`--out`).

    python benchmarks/serve_load.py --quick                 # sanity check: m2det_tiny, 2 s a cell
    python benchmarks/serve_load.py [--seconds 15] [--models m2det_tiny m2det320_vgg16]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Optional

import httpx

CONCURRENCY = (1, 8, 32)
BATCHING = {"off": ["--max-batch", "1"], "on": ["--max-batch", "8", "--max-wait-ms", "5"]}

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def bomb_png(width: int, height: int) -> bytes:
    """A PNG declaring `width` x `height` RGB pixels with only its first rows' data (a few KB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width * 3 + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_jpeg() -> bytes:
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    pixels = cv2.GaussianBlur(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8), (0, 0), 3)
    return cv2.imencode(".jpg", pixels)[1].tobytes()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, model: str, extra: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "m2det.cli.main", "serve", "--preset", model]
        command += ["--port", str(self.port), *extra]
        self.log = log.open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}); see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not answer within 120 s; see {log}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def run_load(url: str, body: bytes, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` threads posting `body` back to back for `seconds` (each request bounded to 60 s)."""
    latencies: list[float] = []
    codes: dict[int, int] = {}
    batches: list[int] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client() -> None:
        with httpx.Client(timeout=60) as session:
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    response = session.post(url + "/detect", content=body)
                    code = response.status_code
                except httpx.HTTPError:
                    code = -1
                elapsed = time.perf_counter() - start
                with lock:
                    codes[code] = codes.get(code, 0) + 1
                    if code == 200:
                        latencies.append(elapsed)
                        batches.append(int(response.json().get("batch_size", 1)))

    started = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 70)
    wall = time.perf_counter() - started
    latencies.sort()

    def quantile(q: float) -> Optional[float]:
        return (
            round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1)
            if latencies
            else None
        )

    return {
        "clients": clients,
        "ok": len(latencies),
        "codes": {str(k): v for k, v in sorted(codes.items())},
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": quantile(0.5),
        "p95_ms": quantile(0.95),
        "mean_batch": round(statistics.mean(batches), 2) if batches else None,
    }


def bomb_memory(model: str, log: Path) -> dict[str, Any]:
    server = Server(model, [], log)
    try:
        before = peak_rss_mb(server.process.pid)
        out: dict[str, Any] = {"before_mb": round(before, 1)}
        for side in (10000, 30000):
            response = httpx.post(server.url + "/detect", content=bomb_png(side, side), timeout=120)
            out[f"{side}x{side}"] = {
                "code": response.status_code,
                "peak_mb": round(peak_rss_mb(server.process.pid), 1),
            }
        return out
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["m2det_tiny", "m2det320_vgg16"])
    parser.add_argument("--seconds", type=float, default=15.0, help="Length of each load (at most 15 s).")
    parser.add_argument("--clients", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--quick", action="store_true", help="m2det_tiny only, 2 s a cell.")
    parser.add_argument("--out", type=Path, default=Path("serve_load.json"))
    args = parser.parse_args()
    if args.quick:
        args.models, args.seconds = ["m2det_tiny"], 2.0
    seconds = min(args.seconds, 15.0)
    body = test_jpeg()
    logs = args.out.with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    bombs: dict[str, Any] = {}
    for model in args.models:
        for batching, extra in BATCHING.items():
            server = Server(model, extra, logs / f"{model}-batching-{batching}.log")
            try:
                httpx.post(server.url + "/detect", content=body, timeout=120)  # warm-up
                for clients in args.clients:
                    row = {
                        "model": model,
                        "batching": batching,
                        **run_load(server.url, body, clients, seconds),
                    }
                    row["server_peak_mb"] = round(peak_rss_mb(server.process.pid), 1)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
            finally:
                server.stop()
        bombs[model] = bomb_memory(model, logs / f"{model}-bombs.log")
    from m2det.device import usable_cores

    cpuinfo = Path("/proc/cpuinfo")
    flags = sorted(set(cpuinfo.read_text().split()) & set(CPU_FLAGS)) if cpuinfo.exists() else []
    print(
        f"\n{seconds:g} s a cell, {usable_cores()} of {os.cpu_count()} CPUs usable (server and clients share them), "
        f"flags {' '.join(flags) or '?'}; a 640x480 JPEG, random weights\n"
    )
    print("| model | batching | clients | req/s | p50 ms | p95 ms | mean batch | non-200 | server peak MiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for r in rows:
        others = {k: v for k, v in r["codes"].items() if k != "200"} or ""
        print(
            f"| {r['model']} | {r['batching']} | {r['clients']} | {r['requests_per_s']} | {r['p50_ms']} | "
            f"{r['p95_ms']} | {r['mean_batch']} | {others} | {r['server_peak_mb']} |"
        )
    print("\n| model | server peak MiB before | 10000x10000 PNG bomb | 30000x30000 PNG bomb |")
    print("| --- | ---: | --- | --- |")
    for model, b in bombs.items():
        cells = [f"{b[k]['code']}, peak {b[k]['peak_mb']} MiB" for k in ("10000x10000", "30000x30000")]
        print(f"| {model} | {b['before_mb']} | {cells[0]} | {cells[1]} |")
    args.out.write_text(json.dumps({"seconds": seconds, "load": rows, "bombs": bombs}, indent=1))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
