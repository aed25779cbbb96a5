"""Helpers shared by the benchmarks: start a real server process, wait for it, summarise latencies."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    args: list[str], port: int, log_path: str | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``python -m predictor`` with ``args`` on ``port``; output to ``log_path`` (or discarded)."""
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the process owns it
    return subprocess.Popen(
        [sys.executable, "-m", "predictor", "--model_name", "sd", "--http_port", str(port), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def wait_ready(process: subprocess.Popen, port: int, timeout_s: float = 600) -> float:
    """Seconds until GET /v1/models/sd answers 200."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before becoming ready")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models/sd", timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("server did not become ready")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values)


def serve_in_thread(settings: Any, model: Any) -> tuple[Any, int]:
    """This server's app for a loaded ``model`` on a free loopback port, run by uvicorn on a daemon thread in
    this process (so the benchmark can also call the engine directly). Returns (uvicorn server, port); set
    ``should_exit`` on the server to stop it."""
    import uvicorn

    from predictor.server import PredictorServer

    port = free_port()
    app = PredictorServer(settings, http_port=port, grpc_port=0, enable_grpc=False).create_app(model)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, port
