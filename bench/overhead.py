"""Serving overhead: end-to-end latency over real HTTP (v1 and /generate) versus the engine called directly.

All three run in one process on the same loaded model, interleaved round by round so machine noise hits
them alike. Prints medians and the ratios HTTP / direct (target: at most 1.10 with builtin:tiny at 64x64).

    python bench/overhead.py [--model_id builtin:tiny] [--rounds 30] [--steps 25] [--size 64]
"""

from __future__ import annotations

import argparse
import sys
import time

sys.argv, _argv = sys.argv[:1], sys.argv  # kserve.model_server parses argv on import
import kserve.model_server  # noqa: E402, F401

sys.argv = _argv

import httpx  # noqa: E402
from common import median, serve_in_thread  # noqa: E402

from predictor.config import parse_settings  # noqa: E402
from predictor.model import DiffusionModel  # noqa: E402
from predictor.request import GenerationRequest, resolve  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_id", default="builtin:tiny")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    options = parser.parse_args()

    _, settings = parse_settings(
        [
            "--model_name",
            "sd",
            "--model_id",
            options.model_id,
            "--model_dir",
            "/nonexistent",
            "--device",
            options.device,
        ]
    )
    model = DiffusionModel(settings)
    model.load()
    uvicorn_server, port = serve_in_thread(settings, model)

    body = {
        "prompt": "a lighthouse at dusk",
        "seed": 1,
        "num_inference_steps": options.steps,
        "width": options.size,
        "height": options.size,
    }
    params = resolve(GenerationRequest(**body), settings.limits, model.traits)
    url = f"http://127.0.0.1:{port}"
    timings: dict[str, list[float]] = {"direct engine": [], "POST /generate": [], "v1 :predict": []}
    with httpx.Client(base_url=url, timeout=300) as client:
        for _ in range(3):  # warm the HTTP path too
            client.post("/generate", json=body).raise_for_status()
        for _ in range(options.rounds):
            started = time.perf_counter()
            model.generation_engine.generate(params)
            timings["direct engine"].append(time.perf_counter() - started)
            started = time.perf_counter()
            client.post("/generate", json=body).raise_for_status()
            timings["POST /generate"].append(time.perf_counter() - started)
            started = time.perf_counter()
            client.post("/v1/models/sd:predict", json={"instances": [body]}).raise_for_status()
            timings["v1 :predict"].append(time.perf_counter() - started)
    uvicorn_server.should_exit = True
    model.stop()

    direct = median(timings["direct engine"])
    print(
        f"model {options.model_id}, {options.size}x{options.size}, {options.steps} steps, "
        f"{options.rounds} rounds, device {model.loaded.device}"
    )
    print(f"{'path':<16}{'median ms':>12}{'ratio':>8}")
    for name, values in timings.items():
        print(f"{name:<16}{median(values) * 1000:>12.1f}{median(values) / direct:>8.3f}")


if __name__ == "__main__":
    main()
