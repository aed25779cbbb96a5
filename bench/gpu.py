"""GPU benchmark: the bare diffusers pipeline and the server side by side, in one run.

Measures, for ``builtin:sd-v1-arch`` (full SD v1 compute, random weights) at 512x512 in float16:
  - bare diffusers: batch-1 latency at 25 and 50 steps, batch-8 throughput;
  - host syncs per denoising step inside the engine (torch's sync debug mode; expected 0);
  - the server (eager, --max_batch_size 8): time to ready, first-request latency, lone latency at 25 and 50 steps,
    throughput and p50/p95 with 16 concurrent clients; the serial server (--max_batch_size 1) for comparison;
  - the server with --compile, cold cache then warm cache: the same, plus graphs compiled after warm-up.
Prints a table and writes results.json to --out. Test it on a CPU first:

    python bench/gpu.py --model_id builtin:tiny --size 64 --requests 16 --compile_backend eager
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import httpx
from common import free_port, median, percentile, start_server, stop_server, wait_ready
from load import drive

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def body(options: argparse.Namespace, steps: int) -> dict:
    return {
        "prompt": PROMPT,
        "num_inference_steps": steps,
        "width": options.size,
        "height": options.size,
        "scheduler": "dpmpp_2m",
        "seed": 1,
    }


def timed_post(base: str, payload: dict) -> float:
    started = time.perf_counter()
    httpx.post(f"{base}/generate", json=payload, timeout=600).raise_for_status()
    return time.perf_counter() - started


def metric(base: str, name: str) -> float:
    match = re.search(rf"^{name}{{[^}}]*}} (\S+)$", httpx.get(f"{base}/metrics", timeout=10).text, re.M)
    return float(match.group(1)) if match else 0.0


def measure_bare(options: argparse.Namespace) -> dict:
    import torch

    from predictor.engine import EngineConfig, GenerationEngine
    from predictor.pipeline import load_pipeline
    from predictor.schemas import GenerationParams

    started = time.perf_counter()
    loaded = load_pipeline(None, options.model_id, None)
    build_s = time.perf_counter() - started
    pipe = loaded.pipe
    cuda = loaded.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run(batch: int, steps: int) -> float:
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
        sync()
        begun = time.perf_counter()
        pipe([PROMPT] * batch, num_inference_steps=steps, width=options.size, height=options.size, generator=generators)
        sync()
        return time.perf_counter() - begun

    from predictor.pipeline import make_scheduler

    pipe.scheduler = make_scheduler("dpmpp_2m", pipe.scheduler.config)
    run(1, 2), run(options.batch, 2)
    result = {
        "build_s": build_s,
        "lone_25": median([run(1, 25) for _ in range(3)]),
        "lone_50": median([run(1, 50) for _ in range(3)]),
        f"batch{options.batch}_images_per_s": options.batch / median([run(options.batch, 25) for _ in range(3)]),
    }

    # Host syncs per denoising step in the engine: torch reports each synchronizing call as a warning.
    engine = GenerationEngine(loaded, EngineConfig(max_batch_size=options.batch))
    engine.start()

    def params(steps: int) -> GenerationParams:
        return GenerationParams(PROMPT, "", steps, 7.5, options.size, options.size, 1, "dpmpp_2m", "png")

    engine.generate(params(2))
    counts = {}
    if cuda:
        for steps in (10, 20):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                engine.generate(params(steps))
                torch.cuda.set_sync_debug_mode("default")
            counts[steps] = sum("synchroniz" in str(w.message) for w in caught)
        result["host_syncs_10_steps"] = counts[10]
        result["host_syncs_20_steps"] = counts[20]
        result["host_syncs_per_step"] = (counts[20] - counts[10]) / 10
    engine.close(timeout=60)
    return result  # the pipeline's GPU memory is freed when this frame goes; the servers have room anyway


def measure_server(options: argparse.Namespace, name: str, flags: list[str], full: bool = True) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["--model_id", options.model_id, "--model_dir", "/nonexistent", "--max_queue", "64", *flags]
    log = Path(options.out) / f"server-{name}.log"
    started = time.perf_counter()
    process = start_server(args, port, log_path=str(log))
    result: dict = {}
    try:
        result["ready_s"] = wait_ready(process, port, timeout_s=900)
        result["first_request_25"] = timed_post(base, body(options, 25))
        result["lone_25"] = median([timed_post(base, body(options, 25)) for _ in range(3)])
        result["lone_50"] = median([timed_post(base, body(options, 50)) for _ in range(3)])
        if full:
            graphs_before = metric(base, "diffusion_compiled_graphs")
            load_body = {**body(options, 25), "seed": None}
            load_body.pop("seed")
            asyncio.run(drive(port, load_body, options.clients, options.clients))
            wall, latencies, statuses = asyncio.run(drive(port, load_body, options.clients, options.requests))
            assert statuses == {200: options.requests}, statuses
            result.update(images_per_s=options.requests / wall, p50=median(latencies), p95=percentile(latencies, 95))
            result["graphs_added_under_load"] = metric(base, "diffusion_compiled_graphs") - graphs_before
    finally:
        stop_server(process)
    result["phase_s"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_id", default="builtin:sd-v1-arch")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compile_backend", default="inductor")
    parser.add_argument("--compile_mode", default="default")
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: bare,eager,serial,compile")
    parser.add_argument("--budget_s", type=float, default=460, help="skip later phases past this many seconds")
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="gpu-bench-"))
    options = parser.parse_args()
    Path(options.out).mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, options.skip.split(",")))
    began = time.perf_counter()
    results: dict = {"argv": sys.argv[1:]}

    def phase(name: str, fn, *args) -> None:
        if name.split("-")[0] in skip or time.perf_counter() - began > options.budget_s:
            print(f"-- {name}: skipped", flush=True)
            return
        print(f"-- {name} ...", flush=True)
        try:
            results[name] = fn(*args)
        except Exception as exc:  # keep what the other phases measured
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"   {json.dumps(results[name])}", flush=True)
        (Path(options.out) / "results.json").write_text(json.dumps(results, indent=2))

    cache = Path(options.out) / "compile-cache"
    shutil.rmtree(cache, ignore_errors=True)
    compile_flags = [
        "--compile",
        "--compile_cache_dir",
        str(cache),
        "--compile_backend",
        options.compile_backend,
        "--compile_mode",
        options.compile_mode,
        "--max_batch_size",
        str(options.batch),
    ]
    phase("bare", measure_bare, options)
    phase("eager", measure_server, options, "eager", ["--max_batch_size", str(options.batch)])
    phase("serial", measure_server, options, "serial", ["--max_batch_size", "1"])
    phase("compile-cold", measure_server, options, "compile-cold", compile_flags)
    phase("compile-warm", measure_server, options, "compile-warm", compile_flags, False)

    def get(phase_name: str, key: str) -> float | None:
        value = results.get(phase_name, {}).get(key)
        return value if isinstance(value, int | float) else None

    print(f"\n{options.model_id} {options.size}x{options.size}, {options.clients} clients, {options.requests} requests")
    rows = [
        ("bare diffusers", "bare"),
        ("server eager", "eager"),
        ("server serial", "serial"),
        ("server --compile cold", "compile-cold"),
        ("server --compile warm", "compile-warm"),
    ]
    print(f"{'':<24}{'lone25 s':>9}{'lone50 s':>9}{'img/s':>8}{'p50 s':>8}{'ready s':>9}{'first s':>9}")
    for label, key in rows:
        cells = [get(key, k) for k in ("lone_25", "lone_50")]
        cells.append(get(key, f"batch{options.batch}_images_per_s") or get(key, "images_per_s"))
        cells += [get(key, k) for k in ("p50", "ready_s", "first_request_25")]
        print(f"{label:<24}" + "".join(f"{c:>9.3f}" if c is not None else f"{'-':>9}" for c in cells))

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

    bare_batch = get("bare", f"batch{options.batch}_images_per_s")
    print(f"server eager lone / bare lone (25 steps): {ratio(get('eager', 'lone_25'), get('bare', 'lone_25'))}")
    print(f"server eager lone / bare lone (50 steps): {ratio(get('eager', 'lone_50'), get('bare', 'lone_50'))}")
    print(f"server eager throughput / bare batch {options.batch}: {ratio(get('eager', 'images_per_s'), bare_batch)}")
    print(f"server eager throughput / serial: {ratio(get('eager', 'images_per_s'), get('serial', 'images_per_s'))}")
    print(f"server eager p50 under load / bare lone: {ratio(get('eager', 'p50'), get('bare', 'lone_25'))}")
    print(f"first request / warm lone (eager): {ratio(get('eager', 'first_request_25'), get('eager', 'lone_25'))}")
    print(f"compile speedup lone 50: {ratio(get('eager', 'lone_50'), get('compile-cold', 'lone_50'))}")
    print(f"host syncs per step: {get('bare', 'host_syncs_per_step')}")
    print(f"total {time.perf_counter() - began:.0f} s; results in {options.out}/results.json")


if __name__ == "__main__":
    main()
