"""Helpers the benchmarks share beyond ``predictor.testing`` (processes, ports, readiness): percentiles, and this
server's app served in-process on a thread."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from predictor.testing import free_port, start_server, stop_server, wait_ready

__all__ = ["free_port", "median", "percentile", "serve_in_thread", "start_server", "stop_server", "wait_ready"]


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
