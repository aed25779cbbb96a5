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
import time

from common import measure_server, median, picture


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
    parser.add_argument(
        "--negative_prompt", default=None, help="every request's (with true CFG, Qwen-Image's guidance: two rows)"
    )
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
    if options.negative_prompt is not None:
        body["negative_prompt"] = options.negative_prompt
    if options.img2img_every > 0:
        body = [body] * (options.img2img_every - 1) + [
            {**body, "image": picture(options.size), "strength": options.strength}
        ]
    load = (options.clients, options.requests, options.server_args, options.log)
    results = {
        f"batching (max_batch_size {options.batch_size})": measure_server(
            options.model_id, options.batch_size, body, *load
        ),
        "serial (max_batch_size 1)": measure_server(options.model_id, 1, body, *load),
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
