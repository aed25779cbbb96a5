"""What streamed previews cost a batch: the same jobs with and without ``partial_images``, side by side.

Runs the engine in-process on a builtin (no HTTP: the cost measured is the engine's, the preview and its copy to
the host; the PNG of each preview is encoded off the worker by the route). Three configurations: no previews,
previews from the linear latent-to-RGB map (the default), and previews from a tiny VAE (--preview_vae_dir; with
``random``, an AutoencoderTiny of TAESD's architecture with random weights, whose cost is the real one's). Rounds
alternate them, since this machine's speed drifts; prints the median wall time of each and the ratios.

    python bench/previews.py                                        # CPU: builtin:tiny, 8 jobs, 25 steps
    python bench/previews.py --model_id builtin:sdxl-arch --size 1024 --steps 30 --jobs 4   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
import time
from statistics import median

from predictor.loading import load_pipeline, load_preview_vae
from predictor.testing import params, running_engine


def _random_taesd(directory: str, latent_channels: int) -> str:
    """AutoencoderTiny's defaults are TAESD's architecture (taef1's and taesd3's with 16 latent channels)."""
    from diffusers import AutoencoderTiny

    AutoencoderTiny(latent_channels=latent_channels).save_pretrained(directory)
    return directory


def measure_previews(
    model_id: str,
    size: int,
    steps: int,
    jobs: int,
    partial_images: int,
    rounds: int,
    preview_vae_dir: str = "random",
    device: str = "auto",
) -> dict[str, float]:
    """Median wall seconds of a batch of ``jobs`` per configuration ("none", "linear map" and, unless
    ``preview_vae_dir`` is "none", "tiny VAE"), rounds alternated, and the previews sent ("previews sent")."""
    plain_loaded = load_pipeline(None, model_id, None, device_flag=device)
    configurations = {"none": plain_loaded, "linear map": plain_loaded}
    with tempfile.TemporaryDirectory() as scratch:
        if preview_vae_dir != "none":
            directory = preview_vae_dir
            if directory == "random":
                directory = _random_taesd(scratch, plain_loaded.pipe.vae.config.latent_channels)
            tiny = load_preview_vae(directory, plain_loaded.pipe, plain_loaded.device, plain_loaded.dtype)
            configurations["tiny VAE"] = dataclasses.replace(plain_loaded, preview_vae=tiny)
        return measure(plain_loaded.traits, configurations, size, steps, jobs, partial_images, rounds)


def measure(
    traits, configurations: dict, size: int, steps: int, jobs: int, partial_images: int, rounds: int
) -> dict[str, float]:
    sent = 0

    def on_progress(kind: str, *args) -> None:
        nonlocal sent
        sent += kind == "preview"

    def run(engine, previews: int) -> float:
        batch = [
            params(
                seed=i,
                num_inference_steps=steps,
                width=size,
                height=size,
                scheduler=traits.default_scheduler,
                guidance_scale=traits.default_guidance_scale,
                partial_images=previews,
            )
            for i in range(jobs)
        ]
        started = time.perf_counter()
        for future in engine.submit(batch, on_progress=on_progress):
            future.result(timeout=3600)
        return time.perf_counter() - started

    times: dict[str, list[float]] = {name: [] for name in configurations}
    with contextlib.ExitStack() as stack:
        # One engine a configuration, over the same weights; one runs at a time.
        engines = {
            name: stack.enter_context(running_engine(loaded, max_batch_size=jobs))
            for name, loaded in configurations.items()
        }
        for engine in engines.values():
            run(engine, partial_images)  # warm-up, and the preview map's one-time fit
        sent = 0
        for _ in range(rounds):
            for name, engine in engines.items():
                times[name].append(run(engine, 0 if name == "none" else partial_images))
    return {name: median(values) for name, values in times.items()} | {"previews sent": sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_id", default="builtin:tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--partial_images", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--preview_vae_dir", default="random", help="a tiny VAE's directory; random: TAESD's architecture; none: skip"
    )
    options = parser.parse_args()
    found = measure_previews(
        options.model_id,
        options.size,
        options.steps,
        options.jobs,
        options.partial_images,
        options.rounds,
        options.preview_vae_dir,
    )
    plain = found["none"]
    print(
        f"model {options.model_id}, {options.size}x{options.size}, {options.steps} steps, {options.jobs} jobs a batch"
    )
    print(f"without previews: {plain:.3f} s")
    for name in ("linear map", "tiny VAE"):
        if name in found:
            watched = found[name]
            print(
                f"{options.partial_images} previews each from the {name}: {watched:.3f} s, "
                f"cost {100 * (watched / plain - 1):+.1f}% ({watched / plain:.3f}x)"
            )
    print(f"previews sent: {found['previews sent']:.0f}")


if __name__ == "__main__":
    main()
