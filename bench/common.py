"""Helpers the benchmarks share beyond ``predictor.testing`` (processes, ports, readiness, /metrics): percentiles,
real server processes driven over HTTP (start to ready, lone requests, concurrent load and the server's CPU time
under it), and this server's app served in-process on a thread."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from predictor.testing import free_port, metric, start_server, stop_server, wait_ready

__all__ = [
    "RECOMPILE_LOGS",
    "Server",
    "cpu_seconds",
    "drive",
    "free_port",
    "live_and_ready",
    "lone_latency",
    "measure_load",
    "measure_server",
    "median",
    "metric",
    "percentile",
    "picture",
    "running_server",
    "serve_in_thread",
    "start_server",
    "stop_server",
    "timed_post",
    "wait_ready",
]


RECOMPILE_LOGS = {"TORCH_LOGS": "recompiles"}  # a server's environment: torch logs every recompilation


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Server:
    """A ``python -m predictor`` process that said it was ready."""

    process: Any
    port: int
    ready_s: float
    log: Path | None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def compiled_graphs(self) -> float:
        """The server's diffusion_compiled_graphs gauge (0 without --compile)."""
        return metric(self.base, "diffusion_compiled_graphs")

    def recompiles(self) -> int:
        """torch.compile's recompilations so far as torch itself logs them (the server must run with
        ``TORCH_LOGS=recompiles``, RECOMPILE_LOGS): unlike the compiled-graphs gauge, this sees a guard failure
        that traces a function again."""
        return self.log.read_text(errors="replace").count("Recompiling function") if self.log else 0


@contextmanager
def running_server(
    *args: str, log: Path | str | None = None, timeout_s: float = 600, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """``python -m predictor`` with ``args`` on a free port, waited for until ready (``ready_s``: process start to
    ready), stopped on exit."""
    port = free_port()
    process = start_server(*args, port=port, log=log, env=env)
    try:
        ready_s = wait_ready(process, port, log, timeout_s=timeout_s)
        yield Server(process, port, ready_s, Path(log) if log else None)
    finally:
        stop_server(process)


def live_and_ready(
    process: Any, port: int, started: float, log: Path | str | None = None, timeout_s: float = 600
) -> tuple[float, float]:
    """Seconds from ``started`` (a perf_counter reading taken before the process started) to the first answer on
    /livez (the listener is up) and to ready (``GET /v1/models/sd`` 200, after loading and the warm-up)."""
    base = f"http://127.0.0.1:{port}"
    listening = None
    while time.perf_counter() - started < timeout_s:
        if process.poll() is not None:
            tail = Path(log).read_text(errors="replace")[-2000:] if log and Path(log).exists() else ""
            raise RuntimeError(f"the server exited with {process.returncode}:\n{tail}")
        try:
            if listening is None and httpx.get(f"{base}/livez", timeout=1).status_code == 200:
                listening = time.perf_counter() - started
            if httpx.get(f"{base}/v1/models/sd", timeout=1).status_code == 200:
                ready = time.perf_counter() - started
                return listening or ready, ready
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"the server was not ready within {timeout_s:g} s")


def timed_post(client: httpx.Client, body: dict, path: str = "/generate") -> float:
    started = time.perf_counter()
    client.post(path, json=body).raise_for_status()
    return time.perf_counter() - started


def lone_latency(base: str, body: dict, repeats: int = 3) -> float:
    """Median seconds of ``repeats`` requests sent one at a time, after one unmeasured."""
    with httpx.Client(base_url=base, timeout=600) as client:
        timed_post(client, body)
        return median([timed_post(client, body) for _ in range(repeats)])


async def drive(
    port: int, body: dict | list[dict], clients: int, requests: int, by_body: dict[int, list[float]] | None = None
) -> tuple[float, list[float], dict[int, int]]:
    """``requests`` POSTs from ``clients`` concurrent clients; a list of bodies is sent in turn (``by_body``
    collects each body's latencies by its index)."""
    bodies = body if isinstance(body, list) else [body]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    remaining = requests

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            index = remaining % len(bodies)
            started = time.perf_counter()
            response = await client.post("/generate", json=bodies[index])
            latencies.append(time.perf_counter() - started)
            if by_body is not None:
                by_body.setdefault(index, []).append(latencies[-1])
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - started
    return wall, latencies, statuses


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used, from /proc (None elsewhere): less noisy than wall time on a
    shared machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_load(
    server: Server,
    body: dict | list[dict],
    clients: int,
    requests: int,
    by_body: dict[int, list[float]] | None = None,
    warm: bool = True,
) -> dict[str, float]:
    """Throughput and latency of ``requests`` from ``clients`` concurrent clients (after one unmeasured round of
    ``clients`` requests that warms every batch size on the way, unless ``warm`` is false), the server's CPU time
    per image, and the graphs torch.compile added meanwhile (0 unless something compiled under load). Raises
    unless every request answered 200."""
    if warm:
        asyncio.run(drive(server.port, body, clients, clients))
    graphs_before = server.compiled_graphs()
    cpu_before = cpu_seconds(server.process.pid)
    wall, latencies, statuses = asyncio.run(drive(server.port, body, clients, requests, by_body))
    cpu_after = cpu_seconds(server.process.pid)
    if statuses.get(200, 0) != requests:
        raise RuntimeError(f"unexpected statuses under load: {statuses}")
    cpu = float("nan") if cpu_before is None or cpu_after is None else (cpu_after - cpu_before) / requests * 1000
    return {
        "images_per_s": requests / wall,
        "p50": median(latencies),
        "p95": percentile(latencies, 95),
        "cpu_ms_per_image": cpu,
        "graphs_added_under_load": server.compiled_graphs() - graphs_before,
    }


def measure_server(
    model_id: str,
    batch_size: int,
    body: dict | list[dict],
    clients: int,
    requests: int,
    server_args: list[str] | tuple[str, ...] = (),
    log: str | None = None,
    by_body: dict[int, list[float]] | None = None,
) -> dict[str, float]:
    """One server process for ``model_id`` at ``--max_batch_size batch_size``: start to ready, a lone request's
    latency (the first body: a text-to-image request), then the load; the compiled-graphs gauge when it said ready
    and after the load."""
    args = [
        *("--model_id", model_id, "--model_dir", "/nonexistent", "--max_batch_size", str(batch_size)),
        *("--max_queue", str(max(32, clients * 2)), *server_args),
    ]
    with running_server(*args, log=log and f"{log}.bs{batch_size}.log") as server:
        graphs_ready = server.compiled_graphs()
        lone = lone_latency(server.base, body[0] if isinstance(body, list) else body)
        found = measure_load(server, body, clients, requests, by_body)
        graphs_after = server.compiled_graphs()
    found |= {"lone": lone, "ready_s": server.ready_s, "graphs_ready": graphs_ready, "graphs_after": graphs_after}
    return found


def picture(size: int) -> str:
    """A size x size noise picture as base64 PNG: an img2img request's input."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


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
