"""GPU probe: where does the time go? In one process: the cost of each import and of CUDA start-up, building,
saving and reloading ``builtin:sd-v1-arch``, the bare pipeline against the engine and against POST /generate
(interleaved), the engine's phases (synchronised), a torch.profiler table of 10 steps on each side, and the
compiled engine (CUDA graphs). Writes probe.json and profile_*.txt to --out. On a CPU:

    python bench/gpu_probe.py --model_id builtin:tiny --size 64 --compile_backend eager --out /tmp/probe
"""

from __future__ import annotations

import time

T0 = time.perf_counter()
MARKS: dict[str, float] = {}


def mark(name: str) -> None:
    MARKS[name] = time.perf_counter() - T0
    print(f"[{MARKS[name]:7.2f}s] {name}", flush=True)


import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

mark("import torch")
CUDA = torch.cuda.is_available()
if CUDA:
    torch.zeros(1, device="cuda")
    mark("cuda context")
    a = torch.randn(256, 256, device="cuda", dtype=torch.float16)
    (a @ a).sum().item()
    mark("cublas first matmul")
from diffusers import StableDiffusionPipeline  # noqa: E402, F401

mark("import diffusers pipeline")
sys.argv, _argv = sys.argv[:1], sys.argv
import kserve.model_server  # noqa: E402, F401

sys.argv = _argv
mark("import kserve.model_server")
from predictor.config import EngineConfig  # noqa: E402
from predictor.engine import create_engine  # noqa: E402
from predictor.loading import load_pipeline  # noqa: E402
from predictor.request import GenerationParams  # noqa: E402

mark("import predictor")

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
R: dict = {"marks": MARKS}


SIZE = 512


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def params(steps: int, seed: int = 1) -> GenerationParams:
    return GenerationParams(PROMPT, "", steps, 7.5, SIZE, SIZE, seed, "dpmpp_2m", "png")


def section(name: str):
    def wrap(fn):
        def run(*args):
            print(f"== {name}", flush=True)
            try:
                R[name] = fn(*args)
            except Exception as exc:
                traceback.print_exc()
                R[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"   {json.dumps(R[name], default=str)[:1500]}", flush=True)
            return R[name]

        return run

    return wrap


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/probe")
    parser.add_argument("--model_dir", default="/tmp/sdv1")
    parser.add_argument("--model_id", default="builtin:sd-v1-arch")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--compile_backend", default="inductor")
    options = parser.parse_args()
    global SIZE
    SIZE = options.size
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)

    built = load_pipeline(None, options.model_id, None)
    mark("build builtin")
    built.pipe.save_pretrained(options.model_dir)
    mark("save_pretrained fp16")
    del built
    torch.cuda.empty_cache()
    loaded = load_pipeline(options.model_dir, "unused", None)
    mark("load_pipeline from disk (device_map)")
    pipe = loaded.pipe
    pipe.scheduler = loaded.model.make_scheduler("dpmpp_2m")

    def bare(steps: int) -> float:
        sync()
        started = time.perf_counter()
        pipe(
            PROMPT, num_inference_steps=steps, width=SIZE, height=SIZE, generator=torch.Generator("cpu").manual_seed(1)
        )
        sync()
        return time.perf_counter() - started

    engine = create_engine(loaded, EngineConfig(max_batch_size=8))
    engine.start()

    def direct(steps: int) -> float:
        started = time.perf_counter()
        engine.generate(params(steps))
        return time.perf_counter() - started

    bare(2), direct(2), bare(25), direct(25)
    mark("eager warm")

    @section("eager")
    def eager() -> dict:
        result = {}
        for steps, rounds in ((25, 3), (50, 2)):
            b, e = [], []
            for _ in range(rounds):
                b.append(bare(steps))
                e.append(direct(steps))
            result[f"bare_{steps}"] = statistics.median(b)
            result[f"engine_{steps}"] = statistics.median(e)
            result[f"all_bare_{steps}"] = b
            result[f"all_engine_{steps}"] = e
        return result

    eager()

    @section("engine phases (synchronised)")
    def phases() -> dict:
        totals: dict[str, float] = {}
        originals = {}

        def timed(name: str):
            original = getattr(engine, name)
            originals[name] = original

            def wrapper(*args, **kwargs):
                sync()
                started = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    sync()
                    totals[name] = totals.get(name, 0.0) + time.perf_counter() - started

            setattr(engine, name, wrapper)

        for name in ("_prepare", "_call_unet", "_advance", "_vae_decode", "_step"):
            timed(name)
        started = time.perf_counter()
        result = engine.generate(params(25))
        totals["wall"] = time.perf_counter() - started
        for name in originals:
            delattr(engine, name)
        image = result.image
        started = time.perf_counter()
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=3)
        totals["png_encode"] = time.perf_counter() - started
        totals["png_bytes"] = len(buffer.getvalue())
        return totals

    phases()

    @section("profiles")
    def profiles() -> dict:
        from torch.profiler import ProfilerActivity, profile

        result = {}
        for name, fn in (("bare", lambda: bare(10)),):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                wall = fn()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
            (out / f"profile_{name}.txt").write_text(f"wall {wall:.3f}s\n{table}")
            result[name] = wall
        return result

    profiles()

    @section("engine per-step host time")
    def host_time() -> dict:
        # Time per step as seen by the worker, without syncs, and a profile of steps 5-15 taken on the worker
        # thread itself (a profiler started on this thread does not see the worker's calls).
        from torch.profiler import ProfilerActivity, profile

        import predictor.engine as eng_module

        samples: list[float] = []
        original = eng_module.GenerationEngine._denoise
        holder: dict = {}

        def step(self, batch):
            if len(samples) == 5:
                holder["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                holder["prof"].__enter__()
                holder["begun"] = time.perf_counter()
            started = time.perf_counter()
            original(self, batch)
            samples.append(time.perf_counter() - started)
            if len(samples) == 15:
                sync()
                holder["wall"] = time.perf_counter() - holder["begun"]
                holder["prof"].__exit__(None, None, None)

        eng_module.GenerationEngine._denoise = step
        try:
            direct(25)
        finally:
            eng_module.GenerationEngine._denoise = original
        table = holder["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        (out / "profile_engine.txt").write_text(f"10 steps, wall {holder['wall']:.3f}s\n{table}")
        return {"median_step_host_s": statistics.median(samples), "steps": len(samples), "ten_steps_s": holder["wall"]}

    host_time()
    engine.close(timeout=30)

    @section("http vs engine vs bare")
    def http() -> dict:

        import httpx
        from common import serve_in_thread

        from predictor.config import parse_settings
        from predictor.model import DiffusionModel

        _, settings = parse_settings(["--model_name", "sd", "--model_dir", options.model_dir])
        model = DiffusionModel(settings, pipeline_loader=lambda _: loaded)
        model.load()
        userver, port = serve_in_thread(settings, model)
        body = {"prompt": PROMPT, "seed": 1, "num_inference_steps": 25, "scheduler": "dpmpp_2m"}
        timings: dict[str, list[float]] = {"bare": [], "engine": [], "http": [], "http_jpeg": []}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            client.post("/generate", json=body).raise_for_status()
            for _ in range(3):
                timings["bare"].append(bare(25))
                begun = time.perf_counter()
                model.generation_engine.generate(params(25))
                timings["engine"].append(time.perf_counter() - begun)
                begun = time.perf_counter()
                client.post("/generate", json=body).raise_for_status()
                timings["http"].append(time.perf_counter() - begun)
                begun = time.perf_counter()
                client.post("/generate", json={**body, "output_format": "jpeg"}).raise_for_status()
                timings["http_jpeg"].append(time.perf_counter() - begun)
        userver.should_exit = True
        model.generation_engine.close(timeout=30)
        return {name: statistics.median(values) for name, values in timings.items()} | {"all": timings}

    http()

    @section("bare batch 8")
    def bare_batch() -> dict:
        def run(batch: int) -> float:
            gens = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
            sync()
            started = time.perf_counter()
            pipe([PROMPT] * batch, num_inference_steps=25, width=SIZE, height=SIZE, generator=gens)
            sync()
            return time.perf_counter() - started

        run(8)
        return {"images_per_s_batch8": 8 / statistics.median([run(8) for _ in range(2)])}

    bare_batch()

    @section("compiled engine, reduce-overhead")
    def compiled() -> dict:
        result = {}
        started = time.perf_counter()
        engine = create_engine(
            loaded,
            EngineConfig(
                max_batch_size=8,
                compile=True,
                compile_mode="reduce-overhead",
                compile_backend=options.compile_backend,
            ),
        )
        engine.start()
        result["compile_s"] = time.perf_counter() - started
        result["graphs"] = engine.runner.compiled_graphs()
        mark("compiled")

        def lone(steps: int) -> float:
            begun = time.perf_counter()
            engine.generate(params(steps))
            return time.perf_counter() - begun

        lone(25)
        result["first_25"] = lone(25)
        result["lone_25"] = statistics.median([lone(25) for _ in range(3)])
        result["lone_50"] = statistics.median([lone(50) for _ in range(3)])
        begun = time.perf_counter()
        futures = engine.submit([params(25, seed) for seed in range(16)])
        [f.result() for f in futures]
        result["warm16_s"] = time.perf_counter() - begun
        begun = time.perf_counter()
        futures = engine.submit([params(25, seed) for seed in range(32)])
        [f.result() for f in futures]
        result["images_per_s_32_queued"] = 32 / (time.perf_counter() - begun)
        result["graphs_after"] = engine.runner.compiled_graphs()
        result["bare_lone_50_again"] = bare(50)
        engine.close(timeout=30)
        return result

    compiled()
    (out / "probe.json").write_text(json.dumps(R, indent=2, default=str))
    print(json.dumps(R, indent=1, default=str))


if __name__ == "__main__":
    main()
