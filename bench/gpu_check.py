"""Correctness of the engine's CUDA-only paths, against diffusers' own pipeline on the same device.

On CUDA the engine prepares new jobs on a second stream and finds each scheduler's first step on the host;
neither runs on a CPU, so the test suite cannot see them. This script runs, on the GPU:
  - every scheduler alone: the engine's image against ``pipe(...)`` with the same seed;
  - a mixed load: jobs of every scheduler and several step counts submitted in waves while others run (so
    preparation overlaps running steps), each image against the same job run alone;
  - host synchronisations per denoising step under that load (torch's sync debug mode), expected 0.
Prints one line per case and exits 1 if any image differs by more than --tolerance grey levels.

    python bench/gpu_check.py                      # on a GPU machine: builtin:tiny, float16
    python bench/gpu_check.py --device cpu         # the same checks on a CPU (no second stream there)
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import torch

from predictor.config import EngineConfig
from predictor.engine import create_engine
from predictor.loading import load_pipeline
from predictor.request import GenerationParams
from predictor.testing import diffusers_image, pixels
from predictor.testing import params as test_params

PROMPT = "a lighthouse on a cliff at dusk"


GUIDANCE = [7.5]  # the served family's default, set in main()


def params(scheduler: str, steps: int, seed: int, size: int) -> GenerationParams:
    return test_params(
        prompt=PROMPT,
        scheduler=scheduler,
        num_inference_steps=steps,
        seed=seed,
        width=size,
        height=size,
        guidance_scale=GUIDANCE[0],
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_id", default="builtin:tiny")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--tolerance", type=int, default=2)
    options = parser.parse_args()
    loaded = load_pipeline(None, options.model_id, None, device_flag=options.device)
    pipe = loaded.pipe
    schedulers = loaded.traits.schedulers  # the family's: the flow-matching ones for FLUX and SD3
    GUIDANCE[0] = loaded.traits.default_guidance_scale
    print(f"device {loaded.device}, {loaded.dtype}, {options.model_id} at {options.size}x{options.size}")
    failures = 0

    def report(name: str, diff: int) -> None:
        nonlocal failures
        ok = diff <= options.tolerance
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: max difference {diff} grey levels")

    engine = create_engine(loaded, EngineConfig(max_batch_size=8, max_queue=64))
    engine.start()
    try:
        alone: dict[GenerationParams, np.ndarray] = {}
        for index, name in enumerate(schedulers):
            p = params(name, 12, seed=index, size=options.size)
            alone[p] = pixels(engine.generate(p, timeout=120).image)
            report(f"{name} alone vs diffusers", int(np.abs(alone[p] - diffusers_image(pipe, p)).max()))

        # Host synchronisations per denoising step, scheduler by scheduler: the difference between 20 and 10 steps.
        if loaded.device.type == "cuda":
            for index, name in enumerate(schedulers):
                counts = []
                for steps in (10, 20):
                    torch.cuda.synchronize()
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        torch.cuda.set_sync_debug_mode("warn")
                        engine.generate(params(name, steps, seed=index, size=options.size), timeout=120)
                        torch.cuda.set_sync_debug_mode(0)
                    counts.append(sum("synchroniz" in str(w.message) for w in caught))
                print(f"     {name}: host synchronisations {counts[0]} for 10 steps, {counts[1]} for 20")

        # Waves: each submitted while the previous one is mid-run, so new jobs are prepared beside running steps.
        mixed = [
            params(name, steps, seed=100 + k, size=options.size)
            for k, (name, steps) in enumerate((name, steps) for steps in (9, 14, 20) for name in schedulers)
        ]
        for p in mixed:
            alone[p] = pixels(engine.generate(p, timeout=120).image)
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            futures = []
            for start in range(0, len(mixed), 6):
                futures += engine.submit(mixed[start : start + 6])
                time.sleep(0.01)
            results = [future.result(timeout=300) for future in futures]
        if loaded.device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
        worst = max(int(np.abs(pixels(r.image) - alone[p]).max()) for r, p in zip(results, mixed, strict=True))
        report(f"{len(mixed)} jobs in waves vs each alone", worst)
        steps = sum(p.num_inference_steps for p in mixed)
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        print(f"     host synchronisations under that load: {syncs} for {len(mixed)} images, {steps} steps")
    finally:
        engine.close(timeout=30)
    print("all checks passed" if not failures else f"{failures} checks FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
