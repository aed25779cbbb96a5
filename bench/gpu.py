"""GPU benchmark: the bare diffusers pipeline and the server side by side, in one run.

Measures, for ``builtin:sd-v1-arch`` (full SD v1 compute, random weights) at 512x512 in float16 (or another
builtin: ``--model_id builtin:sdxl-arch --size 1024 --steps 30 --batch 4 --clients 8`` for SDXL), saved to disk
with ``save_pretrained`` so every server loads real files from --model_dir:
  - bare diffusers in this process: batch-8 throughput; host syncs per denoising step inside the engine
    (torch's sync debug mode; expected 0);
  - each server configuration: process start to ready, the first request, lone latency at --steps and
    --long_steps (25 and 50) taken
    in rounds that alternate with the bare pipeline's (this machine's host speed drifts: only figures taken side
    by side compare), throughput and p50/p95 with 16 concurrent clients, graphs compiled under load;
  - eager start to ready, repeated, optionally each from a cold page cache (--cold_ready, as root);
  - configurations: eager; --compile with a cold cache; --compile again on the warm cache; the same warm cache
    with --max_batch_size 16 (the compiled UNet takes any batch size, so only new CUDA graphs are recorded).
Prints a table and writes results.json to --out. Test it on a CPU first:

    python bench/gpu.py --model_id builtin:tiny --size 64 --requests 16 --compile_backend eager

FLUX.1-dev and SD 3.5 large at 1024x1024, 28 steps, bfloat16 (the family's default on CUDA):

    python bench/gpu.py --model_id builtin:flux-arch --size 1024 --steps 28 --long_steps 50 --batch 4 --clients 4
    python bench/gpu.py --model_id builtin:sd35-arch --size 1024 --steps 28 --long_steps 50 --batch 4 --clients 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
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
        "scheduler": options.scheduler,
        "guidance_scale": options.guidance,
        "seed": 1,
    }


def timed_post(client: httpx.Client, payload: dict) -> float:
    started = time.perf_counter()
    client.post("/generate", json=payload).raise_for_status()
    return time.perf_counter() - started


def metric(base: str, name: str) -> float:
    match = re.search(rf"^{name}{{[^}}]*}} (\S+)$", httpx.get(f"{base}/metrics", timeout=10).text, re.M)
    return float(match.group(1)) if match else 0.0


class Bare:
    """The diffusers pipeline in this process: the baseline every server figure is compared with."""

    def __init__(self, options: argparse.Namespace):
        import torch

        from predictor.loading import load_pipeline

        self.options = options
        self.torch = torch
        self.loaded = load_pipeline(None, options.model_id, None)
        self.pipe = self.loaded.pipe
        # The family's defaults, for the bare pipeline and every server alike: dpmpp_2m and 7.5 for SD, the
        # checkpoint's own flow-matching Euler and 3.5 for FLUX.1-dev, 7 for SD3.
        traits = self.loaded.traits
        options.scheduler, options.guidance = traits.default_scheduler, traits.default_guidance_scale
        self.pipe.scheduler = self.loaded.model.make_scheduler(options.scheduler)
        self.cuda = self.loaded.device.type == "cuda"

    def run(self, batch: int, steps: int) -> float:
        torch = self.torch
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
        size = self.options.size
        if self.cuda:
            torch.cuda.synchronize()
        begun = time.perf_counter()
        self.pipe(
            [PROMPT] * batch,
            num_inference_steps=steps,
            guidance_scale=self.options.guidance,
            width=size,
            height=size,
            generator=generators,
        )
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - begun


def measure_bare(options: argparse.Namespace, bare: Bare) -> dict:
    import torch

    from predictor.config import EngineConfig
    from predictor.engine import create_engine
    from predictor.request import GenerationParams

    started = time.perf_counter()
    bare.pipe.save_pretrained(options.model_dir)
    result = {"save_s": time.perf_counter() - started}
    bare.run(1, 2), bare.run(options.batch, 2)
    result[f"lone_{options.steps}"] = median([bare.run(1, options.steps) for _ in range(3)])
    result[f"batch{options.batch}_images_per_s"] = options.batch / median(
        [bare.run(options.batch, options.steps) for _ in range(3)]
    )

    # Host syncs per denoising step in the engine: torch reports each synchronizing call as a warning.
    engine = create_engine(bare.loaded, EngineConfig(max_batch_size=options.batch))
    engine.start()

    def params(steps: int) -> GenerationParams:
        return GenerationParams(
            PROMPT, None, steps, options.guidance, options.size, options.size, 1, options.scheduler, "png"
        )

    engine.generate(params(2))
    if bare.cuda:
        counts = {}
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
    return result


def measure_server(options: argparse.Namespace, bare: Bare, name: str, flags: list[str], rounds: int = 5) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["--model_dir", options.model_dir, "--max_queue", "64", *flags]
    log = Path(options.out) / f"server-{name}.log"
    started = time.perf_counter()
    process = start_server(*args, port=port, log=log)
    result: dict = {}
    try:
        result["ready_s"] = wait_ready(process, port, log, timeout_s=900)
        with httpx.Client(base_url=base, timeout=600) as client:
            result["first_request"] = timed_post(client, body(options, options.steps))
            # Alternate with the bare pipeline so both see the same host and GPU conditions.
            for steps, repeats in ((options.steps, rounds), (options.long_steps, max(2, rounds - 2))):
                server, baseline = [], []
                for _ in range(repeats):
                    baseline.append(bare.run(1, steps))
                    server.append(timed_post(client, body(options, steps)))
                result[f"lone_{steps}"] = median(server)
                result[f"bare_lone_{steps}"] = median(baseline)
                result[f"ratio_{steps}"] = median(server) / median(baseline)
        graphs_before = metric(base, "diffusion_compiled_graphs")
        load_body = body(options, options.steps)
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


def drop_page_cache() -> bool:
    """Forget cached file pages (root only), so the next start reads its weights from disk like a fresh node."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure_ready(options: argparse.Namespace, rounds: int) -> dict:
    """Eager start to ready and the first request, ``rounds`` times; with --cold_ready, each start after the page
    cache is dropped, so weights and libraries come from disk as on a fresh node."""
    result: dict = {"page_cache_dropped": False, "ready_s": [], "first_request": []}
    for _ in range(rounds):
        if options.cold_ready:
            result["page_cache_dropped"] = drop_page_cache()
        port = free_port()
        log = Path(options.out) / "server-ready.log"
        args = ["--model_dir", options.model_dir, "--max_batch_size", str(options.batch)]
        process = start_server(*args, port=port, log=log)
        try:
            ready = wait_ready(process, port, log, timeout_s=300)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
                first = timed_post(client, body(options, options.steps))
        finally:
            stop_server(process)
        result["ready_s"].append(round(ready, 2))
        result["first_request"].append(round(first, 3))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_id", default="builtin:sd-v1-arch")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25, help="steps of every request and of the bare runs")
    parser.add_argument("--long_steps", type=int, default=50, help="steps of the second lone-latency figure")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="alternating bare/server rounds per lone figure")
    parser.add_argument("--compile_backend", default="inductor")
    parser.add_argument("--compile_mode", default="reduce-overhead")
    parser.add_argument("--ready_rounds", type=int, default=1, help="extra eager starts, measured to ready")
    parser.add_argument("--cold_ready", action="store_true", help="drop the page cache before each (root only)")
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: eager,ready,compile,batch16")
    parser.add_argument("--budget_s", type=float, default=400, help="skip later phases past this many seconds")
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="gpu-bench-"))
    options = parser.parse_args()
    Path(options.out).mkdir(parents=True, exist_ok=True)
    options.model_dir = str(Path(options.out) / "model")
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
    ]
    batch = ["--max_batch_size", str(options.batch)]
    bare = Bare(options)
    phase("bare", measure_bare, options, bare)
    rounds = options.rounds
    phase("eager", measure_server, options, bare, "eager", batch, rounds)
    phase("ready", measure_ready, options, options.ready_rounds)
    phase("compile-cold", measure_server, options, bare, "compile-cold", compile_flags + batch, rounds)
    phase("compile-warm", measure_server, options, bare, "compile-warm", compile_flags + batch, max(2, rounds - 2))
    batch16 = ["--max_batch_size", str(2 * options.batch)]
    phase("batch16-compile-warm", measure_server, options, bare, "batch16-compile-warm", compile_flags + batch16, 2)

    def get(phase_name: str, key: str) -> float | None:
        value = results.get(phase_name, {}).get(key)
        return value if isinstance(value, int | float) else None

    print(f"\n{options.model_id} {options.size}x{options.size}, {options.clients} clients, {options.requests} requests")
    rows = [
        ("bare diffusers", "bare"),
        ("server eager", "eager"),
        ("server --compile cold", "compile-cold"),
        ("server --compile warm", "compile-warm"),
        (f"  same, batch {2 * options.batch}", "batch16-compile-warm"),
    ]
    short, long = options.steps, options.long_steps
    header = (
        f"lone{short} s",
        f"bare{short} s",
        f"lone{long} s",
        f"bare{long} s",
        "img/s",
        "p50 s",
        "ready s",
        "first s",
    )
    print(f"{'':<26}" + "".join(f"{h:>10}" for h in header))
    for label, key in rows:
        keys = (f"lone_{short}", f"bare_lone_{short}", f"lone_{long}", f"bare_lone_{long}")
        cells = [get(key, k) for k in keys]
        cells.append(get(key, f"batch{options.batch}_images_per_s") or get(key, "images_per_s"))
        cells += [get(key, k) for k in ("p50", "ready_s", "first_request")]
        print(f"{label:<26}" + "".join(f"{c:>10.3f}" if c is not None else f"{'-':>10}" for c in cells))

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

    bare_batch = get("bare", f"batch{options.batch}_images_per_s")
    for key in ("eager", "compile-cold"):
        for steps in (short, long):
            side_by_side = ratio(get(key, f"lone_{steps}"), get(key, f"bare_lone_{steps}"))
            print(f"server {key} lone / bare lone, side by side ({steps} steps): {side_by_side}")
    print(f"server eager throughput / bare batch {options.batch}: {ratio(get('eager', 'images_per_s'), bare_batch)}")
    for key in ("eager", "compile-warm"):
        print(f"first request / warm lone ({key}): {ratio(get(key, 'first_request'), get(key, f'lone_{short}'))}")
    speedup = ratio(get("eager", f"lone_{long}"), get("compile-cold", f"lone_{long}"))
    print(f"compile speedup, lone {long} steps: {speedup}")
    print(f"compile throughput / eager: {ratio(get('compile-cold', 'images_per_s'), get('eager', 'images_per_s'))}")
    syncs = (get("bare", "host_syncs_10_steps"), get("bare", "host_syncs_20_steps"))
    print(f"host syncs in the engine, one image: {syncs[0]} for 10 steps, {syncs[1]} for 20 (per step: the difference)")
    ready = results.get("ready", {})
    if ready.get("ready_s"):
        cold = "cold page cache" if ready.get("page_cache_dropped") else "warm page cache"
        print(f"eager start -> ready, {cold}: {ready['ready_s']} s; first request {ready['first_request']} s")
    print(f"total {time.perf_counter() - began:.0f} s; results in {options.out}/results.json")


if __name__ == "__main__":
    main()
