"""Throughput and latency under concurrent load: step-level batching versus serial (--max_batch_size 1).

Starts the real server (one process per configuration, the same flags otherwise), drives POST /generate
with N concurrent clients for a fixed number of requests, and prints images/s, p50 and p95 latency and the
ratios batching / serial. With --diffusers it also measures the bare diffusers pipeline in this process at
batch --diffusers_batch (throughput) and batch 1 (a lone image's latency), for the GPU targets.

    python bench/load.py                                   # CPU: builtin:tiny, 64x64, 8 clients
    python bench/load.py --model_id builtin:sd-v1-arch --size 512 --clients 16 --requests 96 --diffusers
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import httpx
from common import free_port, median, percentile, start_server, stop_server, wait_ready


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


def compiled_graphs(port: int) -> float:
    """The server's diffusion_compiled_graphs gauge (0 without --compile)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples = [line.split()[-1] for line in text.splitlines() if line.startswith("diffusion_compiled_graphs{")]
    return float(samples[0]) if samples else 0.0


def lone_latency(port: int, body: dict, repeats: int = 3) -> float:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        client.post("/generate", json=body).raise_for_status()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            client.post("/generate", json=body).raise_for_status()
            times.append(time.perf_counter() - started)
    return median(times)


def measure_server(
    options: argparse.Namespace, batch_size: int, body: dict | list[dict], by_body: dict[int, list[float]] | None = None
) -> dict[str, float]:
    port = free_port()
    args = [
        "--model_id",
        options.model_id,
        "--model_dir",
        "/nonexistent",
        "--max_batch_size",
        str(batch_size),
        "--max_queue",
        str(max(32, options.clients * 2)),
        *options.server_args,
    ]
    process = start_server(*args, port=port, log=options.log and f"{options.log}.bs{batch_size}.log")
    try:
        ready_s = wait_ready(process, port, timeout_s=600)
        graphs_ready = compiled_graphs(port)
        lone = lone_latency(port, body[0] if isinstance(body, list) else body)  # a text-to-image request
        asyncio.run(drive(port, body, options.clients, options.clients))  # warm every batch size on the way
        cpu_before = cpu_seconds(process.pid)
        wall, latencies, statuses = asyncio.run(drive(port, body, options.clients, options.requests, by_body))
        cpu_after = cpu_seconds(process.pid)
        graphs_after = compiled_graphs(port)
    finally:
        stop_server(process)
    ok = statuses.get(200, 0)
    if ok != options.requests:
        raise RuntimeError(f"unexpected statuses at batch size {batch_size}: {statuses}")
    return {
        "images_per_s": ok / wall,
        "p50": median(latencies),
        "p95": percentile(latencies, 95),
        "lone": lone,
        "ready_s": ready_s,
        "cpu_ms_per_image": float("nan") if cpu_before is None else (cpu_after - cpu_before) / ok * 1000,
        "graphs_ready": graphs_ready,  # torch.compile's graphs when the server said ready, and after the load
        "graphs_after": graphs_after,
    }


def measure_diffusers(options: argparse.Namespace) -> dict[str, float]:
    import torch

    from predictor.loading import load_pipeline

    loaded = load_pipeline(None, options.model_id, None)
    pipe = loaded.pipe
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)

    def run(batch: int) -> float:
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
        sync()
        started = time.perf_counter()
        pipe(
            ["a lighthouse at dusk"] * batch,
            num_inference_steps=options.steps,
            width=options.size,
            height=options.size,
            generator=generators,
        )
        sync()
        return time.perf_counter() - started

    run(1), run(options.diffusers_batch)  # warm-up
    lone = median([run(1) for _ in range(3)])
    batched = median([run(options.diffusers_batch) for _ in range(3)])
    return {"lone": lone, "images_per_s": options.diffusers_batch / batched}


def picture(size: int) -> str:
    """A size x size noise picture as base64 PNG: an img2img request's input."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_id", default="builtin:tiny")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--scheduler", default=None, help="default: the served model's (dpmpp_2m SD, euler FLUX)")
    parser.add_argument("--batch_size", type=int, default=8, help="--max_batch_size of the batching server")
    parser.add_argument(
        "--img2img_every", type=int, default=0, help="make one request in N img2img (an input picture; 0: none)"
    )
    parser.add_argument("--strength", type=float, default=0.5, help="the img2img requests' strength")
    parser.add_argument("--diffusers", action="store_true", help="also measure the bare diffusers pipeline")
    parser.add_argument("--diffusers_batch", type=int, default=8)
    parser.add_argument("--log", default=None, help="write server logs to LOG.bsN.log")
    parser.add_argument("server_args", nargs="*", help="extra server flags, after --")
    options = parser.parse_args()

    body = {
        "prompt": "a lighthouse at dusk",
        "num_inference_steps": options.steps,
        "width": options.size,
        "height": options.size,
    }
    if options.scheduler is not None:
        body["scheduler"] = options.scheduler
    if options.img2img_every > 0:
        body = [body] * (options.img2img_every - 1) + [
            {**body, "image": picture(options.size), "strength": options.strength}
        ]
    results = {
        f"batching (max_batch_size {options.batch_size})": measure_server(options, options.batch_size, body),
        "serial (max_batch_size 1)": measure_server(options, 1, body),
    }
    print(
        f"\nmodel {options.model_id}, {options.size}x{options.size}, {options.steps} steps, "
        f"{options.clients} clients, {options.requests} requests"
        + (f", every {options.img2img_every}th img2img at strength {options.strength}" if options.img2img_every else "")
    )
    print(f"{'configuration':<30}{'images/s':>10}{'p50 s':>9}{'p95 s':>9}{'lone s':>9}{'ready s':>9}{'cpu ms/img':>12}")
    for name, r in results.items():
        print(
            f"{name:<30}{r['images_per_s']:>10.2f}{r['p50']:>9.3f}{r['p95']:>9.3f}{r['lone']:>9.3f}{r['ready_s']:>9.1f}"
            f"{r['cpu_ms_per_image']:>12.1f}"
        )
    batching, serial = results.values()
    print(f"throughput batching/serial: {batching['images_per_s'] / serial['images_per_s']:.2f}x")
    print(
        f"p50 latency batching/serial: {batching['p50'] / serial['p50']:.2f}x, "
        f"p95: {batching['p95'] / serial['p95']:.2f}x"
    )
    print(f"p50 latency under load / lone request: {batching['p50'] / batching['lone']:.2f}x")
    if options.diffusers:
        bare = measure_diffusers(options)
        print(
            f"bare diffusers: batch {options.diffusers_batch} {bare['images_per_s']:.2f} images/s, "
            f"batch 1 {bare['lone']:.3f} s"
        )
        print(
            f"server throughput / bare diffusers batch {options.diffusers_batch}: "
            f"{batching['images_per_s'] / bare['images_per_s']:.2f}x"
        )
        print(f"server p50 under load / bare lone image: {batching['p50'] / bare['lone']:.2f}x")
        print(f"server lone request / bare lone image: {batching['lone'] / bare['lone']:.2f}x")


if __name__ == "__main__":
    main()
