"""What streamed previews cost a batch: the same jobs with and without ``partial_images``, side by side.

Runs the engine in-process on a builtin (no HTTP: the cost measured is the engine's, the latent-to-RGB map and
its copy to the host; the PNG of each preview is encoded off the worker by the route). Rounds alternate the two
configurations, since this machine's speed drifts; prints the median wall time of each and the ratio.

    python bench/previews.py                                        # CPU: builtin:tiny, 8 jobs, 25 steps
    python bench/previews.py --model_id builtin:sdxl-arch --size 1024 --steps 30 --jobs 4   # on a GPU
"""

from __future__ import annotations

import argparse
import time
from statistics import median

from predictor.pipeline import load_pipeline
from predictor.testing import params, running_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_id", default="builtin:tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--partial_images", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()

    loaded = load_pipeline(None, options.model_id, None)
    traits = loaded.traits
    sent = 0

    def on_progress(kind: str, *args) -> None:
        nonlocal sent
        sent += kind == "preview"

    def run(engine, previews: int) -> float:
        jobs = [
            params(
                seed=i,
                num_inference_steps=options.steps,
                width=options.size,
                height=options.size,
                scheduler=traits.default_scheduler,
                guidance_scale=traits.default_guidance_scale,
                partial_images=previews,
            )
            for i in range(options.jobs)
        ]
        started = time.perf_counter()
        for future in engine.submit(jobs, on_progress=on_progress):
            future.result(timeout=3600)
        return time.perf_counter() - started

    times: dict[int, list[float]] = {0: [], options.partial_images: []}
    with running_engine(loaded, max_batch_size=options.jobs) as engine:
        run(engine, options.partial_images)  # warm-up, and the preview map's one-time fit
        for _ in range(options.rounds):
            for previews in times:
                times[previews].append(run(engine, previews))
    plain, watched = median(times[0]), median(times[options.partial_images])
    print(
        f"model {options.model_id}, {options.size}x{options.size}, {options.steps} steps, {options.jobs} jobs a batch"
    )
    print(f"without previews: {plain:.3f} s; with {options.partial_images} each: {watched:.3f} s")
    print(f"previews sent: {sent}; cost: {100 * (watched / plain - 1):+.1f}% ({watched / plain:.3f}x)")


if __name__ == "__main__":
    main()
