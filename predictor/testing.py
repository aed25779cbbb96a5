"""Helpers shared by the tests and the benchmarks: real server processes on loopback ports, polling instead of
sleeping, request parameters, pixels, and diffusers' own image for the same request (the ground truth)."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from predictor.request import GenerationParams

READY_TIMEOUT_S = 120.0
# How far a served image may be from diffusers' own for the same request, in grey levels (batched rows round
# differently).
TOLERANCE = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    *args: str,
    port: int,
    log: Path | str | None = None,
    env: dict[str, str] | None = None,
    model_name: str = "sd",
    cwd: Path | str | None = None,
) -> subprocess.Popen:
    """``python -m predictor`` with ``args`` on ``port``. Its output goes to ``log`` (or nowhere): an unread
    pipe would fill up and block the server. ``cwd``: another checkout's directory, whose package then runs."""
    output = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - the process owns it
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "predictor", "--model_name", model_name, "--http_port", str(port), *args],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=cwd,
        )
    finally:
        if log:
            output.close()


def log_tail(log: Path | str | None, chars: int = 5000) -> str:
    return Path(log).read_text(errors="replace")[-chars:] if log and Path(log).exists() else ""


def wait_ready(
    process: subprocess.Popen,
    port: int,
    log: Path | str | None = None,
    timeout_s: float = READY_TIMEOUT_S,
    model_name: str = "sd",
) -> float:
    """Seconds until ``GET /v1/models/NAME`` answers 200; raises with the log's tail if the process exits first
    or the time runs out."""
    started = time.perf_counter()
    url = f"http://127.0.0.1:{port}/v1/models/{model_name}"
    while time.perf_counter() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before becoming ready:\n{log_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"server did not become ready within {timeout_s:g} s:\n{log_tail(log)}")


def stop_server(process: subprocess.Popen, timeout_s: float = 60) -> int:
    """SIGTERM, then the exit status (killed if it does not exit in time)."""
    process.terminate()
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def wait_until(condition: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.01) -> Any:
    """Poll ``condition`` until it returns something true (returned); fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout_s:g} s")
        time.sleep(interval_s)


def metric(base_url: str, name: str, **labels: str) -> float:
    """One sample from a server's /metrics, matching its labels in any order (model_name "sd" unless given);
    0 when absent."""
    wanted = {"model_name": "sd", **labels}
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    for match in re.finditer(rf"^{name}{{([^}}]*)}} (\S+)$", text, re.M):
        if dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) == wanted:
            return float(match.group(2))
    return 0.0


def params(**overrides: Any) -> GenerationParams:
    """Resolved generation parameters for the tiny builtins' native size, with ``overrides``."""
    values: dict[str, Any] = {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": None,
        "num_inference_steps": 6,
        "guidance_scale": 7.5,
        "width": 64,
        "height": 64,
        "seed": 42,
        "scheduler": "dpmpp_2m",
        "output_format": "png",
    }
    values.update(overrides)
    return GenerationParams(**values)


def mixed_cases(
    schedulers: tuple[str, ...],
    rounds: int,
    first: Callable[[int], dict[str, Any]] = lambda i: {},
    second: Callable[[int], dict[str, Any]] = lambda i: {},
) -> list[GenerationParams]:
    """The equivalence tests' cases: two a round, the scheduler cycling through ``schedulers``. The first at 64 px
    (seed i, 3 or 4 steps); the second (seed 100 + i, 4 steps) at 64 px every other round, so rows of one size share
    calls, and 96x80 in between, a group of its own. ``first(i)`` and ``second(i)`` give round i's own fields
    (guidance, prompts)."""
    cases = []
    for i in range(rounds):
        scheduler = schedulers[i % len(schedulers)]
        cases.append(params(scheduler=scheduler, seed=i, num_inference_steps=3 + i % 2, **first(i)))
        size = {"width": 64, "height": 64} if i % 2 == 0 else {"width": 96, "height": 80}
        cases.append(params(scheduler=scheduler, seed=100 + i, num_inference_steps=4, **size, **second(i)))
    return cases


def pixels(image: Image.Image) -> np.ndarray:
    """An image as int16 RGB values, so differences do not wrap around."""
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, WebP) as int16 RGB values."""
    return pixels(Image.open(io.BytesIO(data)))


def reference_scheduler(pipe: Any, name: str) -> Any:
    """The scheduler a user would set on diffusers' own pipeline for the server's scheduler ``name``, from the
    pipeline's own scheduler config. Spelled out here, not taken from the server's registries, so a wrong override
    there shows in the equivalence tests."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
        LCMScheduler,
        LMSDiscreteScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )

    config = pipe.scheduler.config
    if getattr(pipe, "transformer", None) is not None:  # the flow-matching pipelines
        flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": config.get("shift", 1.0)}
        made = {
            "euler": lambda: FlowMatchEulerDiscreteScheduler.from_config(config),
            "heun": lambda: FlowMatchHeunDiscreteScheduler.from_config(config),
            "dpmpp_2m": lambda: DPMSolverMultistepScheduler.from_config(
                config, **flow, algorithm_type="dpmsolver++", solver_order=2
            ),
            "unipc": lambda: UniPCMultistepScheduler.from_config(config, **flow),
        }
        return made[name]()
    dpm = {"algorithm_type": "dpmsolver++", "solver_order": 2}
    made = {
        "dpmpp_2m": lambda: DPMSolverMultistepScheduler.from_config(config, **dpm),
        "dpmpp_2m_karras": lambda: DPMSolverMultistepScheduler.from_config(config, **dpm, use_karras_sigmas=True),
        "euler": lambda: EulerDiscreteScheduler.from_config(config),
        "euler_a": lambda: EulerAncestralDiscreteScheduler.from_config(config),
        "ddim": lambda: DDIMScheduler.from_config(config),
        "pndm": lambda: PNDMScheduler.from_config(config, skip_prk_steps=True),
        "lms": lambda: LMSDiscreteScheduler.from_config(config),
        "unipc": lambda: UniPCMultistepScheduler.from_config(config),
        "lcm": lambda: LCMScheduler.from_config(config),
    }
    return made[name]()


def diffusers_pipeline(directory: Path | str, cls: Any, dtype: Any = None, **components: Any) -> Any:
    """diffusers' own ``cls`` loaded from ``directory`` (a pipeline saved with save_pretrained), in float32 unless
    ``dtype`` says otherwise, with its progress bar off: the reference the equivalence tests compare with.
    ``components`` replace the saved ones (registered after the load, as the server's loader does)."""
    import torch

    pipe = cls.from_pretrained(
        directory, use_safetensors=True, dtype=dtype or torch.float32, **dict.fromkeys(components)
    )
    pipe.register_modules(**{name: part for name, part in components.items() if part is not None})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_image(pipe: Any, p: GenerationParams, max_sequence_length: int | None = None, **extra: Any) -> np.ndarray:
    """What diffusers' own ``pipe(...)`` makes for ``p``: the same arguments, the named scheduler made by diffusers'
    ``from_config`` from the pipeline's config, ``generator=torch.Generator("cpu").manual_seed(seed)``; ``extra``
    goes to the call as it is (a step callback)."""
    import inspect

    import torch

    original = pipe.scheduler
    pipe.scheduler = reference_scheduler(pipe, p.scheduler)
    # Only the texts given: SDXL's second prompts exist on SDXL alone, and LCM's pipeline takes no negative prompt.
    texts: dict[str, Any] = {
        name: getattr(p, name)
        for name in ("negative_prompt", "prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3")
        if getattr(p, name) is not None
    }
    if "true_cfg_scale" in inspect.signature(pipe.__call__).parameters:  # FLUX's: 1 (off) unless asked
        texts["true_cfg_scale"] = p.true_cfg_scale
    if max_sequence_length is not None:
        texts["max_sequence_length"] = max_sequence_length
    try:
        image = pipe(
            prompt=p.prompt,  # by name: FLUX.2's pipelines take their reference images first
            **texts,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            width=p.width,
            height=p.height,
            generator=torch.Generator("cpu").manual_seed(p.seed),
            **extra,
        ).images[0]
    finally:
        pipe.scheduler = original
    return pixels(image)


def diffusers_image_job(pipe: Any, p: GenerationParams) -> np.ndarray:
    """What diffusers' own img2img or inpainting ``pipe(...)`` makes for the image job ``p``: the same arguments, the
    named scheduler from the pipeline's config (the flow-matching registry for FLUX and SD3), the request's CPU
    generator."""
    import torch

    original = pipe.scheduler
    pipe.scheduler = reference_scheduler(pipe, p.scheduler)
    arguments: dict[str, Any] = {
        "prompt": p.prompt,
        "image": p.image,
        "strength": p.strength,
        "num_inference_steps": p.num_inference_steps,
        "guidance_scale": p.guidance_scale,
        "generator": torch.Generator("cpu").manual_seed(p.seed),
    }
    if p.negative_prompt is not None:
        arguments["negative_prompt"] = p.negative_prompt
    flow = getattr(pipe, "transformer", None) is not None
    if p.mask is not None or flow:  # SD's and SDXL's img2img pipelines take no size
        arguments.update(height=p.height, width=p.width)
    if p.mask is not None:
        arguments["mask_image"] = p.mask
    try:
        return pixels(pipe(**arguments).images[0])
    finally:
        pipe.scheduler = original


def assert_alone_and_mixed_equal(
    loaded: Any,
    cases: list[GenerationParams],
    expected: list[np.ndarray],
    join_at_step: int = 1,
    tolerance: int = TOLERANCE,
    **engine_config: Any,
) -> None:
    """The first two cases alone, then every case at once with the second half joining once the first case has
    made ``join_at_step`` steps: each image equals its ``expected`` one (diffusers' own) within ``tolerance``."""
    with running_engine(loaded, **{"max_batch_size": 8, **engine_config}) as engine:
        alone = [pixels(engine.generate(case).image) for case in cases[:2]]
        early = engine.submit(cases[: len(cases) // 2])
        late: list = []

        def join_later(step: int) -> None:
            if step == join_at_step and not late:
                late.extend(engine.submit(cases[len(cases) // 2 :]))

        engine.submit([cases[0]], on_progress=StepLog().callback("t", join_later))[0].result(timeout=120)
        mixed = [pixels(future.result(timeout=120).image) for future in early + late]
    assert late, "the later jobs joined while others were running"
    for got, want in zip(alone + mixed, expected[:2] + expected, strict=True):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= tolerance


@contextmanager
def running_engine(loaded: Any, clock: Callable[[], float] | None = None, **config: Any) -> Iterator[Any]:
    """A started engine on ``loaded`` (a queue of 64 unless given), closed on exit."""
    from predictor.config import EngineConfig
    from predictor.engine import create_engine

    engine_config = EngineConfig(**{"max_queue": 64, **config})
    engine = create_engine(loaded, engine_config) if clock is None else create_engine(loaded, engine_config, clock)
    engine.start()
    try:
        yield engine
    finally:
        engine.close(timeout=30)


class StepLog:
    """Records (name, step) progress events in the order the engine emits them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.totals: list[int] = []
        self.lock = threading.Lock()

    def callback(self, name: str, on_step=None):
        def record(event: str, current: int, total: int, *preview: Any) -> None:
            if event == "step":
                with self.lock:
                    self.events.append((name, current))
                    self.totals.append(total)
                if on_step is not None:
                    on_step(current)

        return record


def save_hub_like_repository(root: Path) -> Path:
    """builtin:tiny saved as a Hub repository holds a pipeline: plain and fp16 safetensors, plus files the server
    never reads (a pickle, a Flax copy, a single-file checkpoint, a model card)."""
    import torch

    from predictor.builtin import build_tiny

    pipe = build_tiny()
    pipe.save_pretrained(root, safe_serialization=True)
    pipe.to(dtype=torch.float16).save_pretrained(root, safe_serialization=True, variant="fp16")
    torch.save(pipe.unet.state_dict(), root / "unet" / "diffusion_pytorch_model.bin")
    (root / "unet" / "diffusion_flax_model.msgpack").write_bytes(b"\0" * 50_000)
    (root / "v1-4.ckpt").write_bytes(b"\0" * 200_000)
    (root / "README.md").write_text("# a model card\n")
    return root


# Components built here in place of a released class, by class name, and what a released checkpoint holds instead:
# FLUX.2-dev's tokenizer is a PixtralProcessor (its processor's and image processor's configs beside the tokenizer);
# Qwen-Image-Edit's processor a Qwen2VLProcessor.
_RELEASED_LAYOUTS: dict[str, tuple[list[str], dict[str, dict[str, Any]]]] = {
    "PixtralTextProcessor": (
        ["transformers", "PixtralProcessor"],
        {
            "processor_config.json": {
                "processor_class": "PixtralProcessor",
                "image_token": "[IMG]",
                "image_break_token": "[IMG_BREAK]",
                "image_end_token": "[IMG_END]",
                "patch_size": 14,
                "spatial_merge_size": 2,
            },
            "preprocessor_config.json": {
                "image_processor_type": "PixtralImageProcessorFast",
                "patch_size": {"height": 14, "width": 14},
                "size": {"longest_edge": 1540},
                "do_resize": True,
                "do_rescale": True,
                "do_normalize": True,
                "do_convert_rgb": True,
            },
        },
    ),
    # Qwen-Image-Edit's processor is a Qwen2VLProcessor (its image processor the torchvision one).
    "QwenVLImageProcessor": (
        ["transformers", "Qwen2VLProcessor"],
        {
            "processor_config.json": {"processor_class": "Qwen2VLProcessor"},
            "preprocessor_config.json": {"image_processor_type": "Qwen2VLImageProcessor"},
        },
    ),
}


def save_as_released(pipe: Any, directory: Path) -> Path:
    """``pipe`` saved with save_pretrained, in the layout its released checkpoint has: a component built here in
    place of a released class (FLUX.2-dev's text-only processor) is named and configured as that class."""
    import json

    pipe.save_pretrained(directory, safe_serialization=True)
    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text())
    for name, component in pipe.components.items():
        layout = _RELEASED_LAYOUTS.get(type(component).__name__)
        if layout is None:
            continue
        index[name], files = layout
        for file_name, config in files.items():  # the released fields over what save_pretrained wrote, if any
            path = directory / name / file_name
            written = json.loads(path.read_text()) if path.exists() else {}
            path.write_text(json.dumps({**written, **config}, indent=2))
    index_path.write_text(json.dumps(index, indent=2))
    return directory


MODEL_NAME = "sd"


def make_settings(model_dir: Path | str, *flags: str) -> Any:
    """Server settings for a model directory, as the command line would give them."""
    from predictor.config import parse_settings

    argv = ["--model_name", MODEL_NAME, "--model_dir", str(model_dir), "--model_id", "not/used", *flags]
    return parse_settings(argv)[1]


@contextmanager
def app_client(model_dir: Path | str, *flags: str) -> Iterator[Any]:
    """The real app (KServe's server with this server's routes) in process over a TestClient, on ``model_dir``
    loaded with ``flags``; the model is stopped on exit."""
    from fastapi.testclient import TestClient

    from predictor.model import DiffusionModel
    from predictor.server import PredictorServer

    settings = make_settings(model_dir, *flags)
    model = DiffusionModel(settings)
    model.load()
    app = PredictorServer(settings, http_port=0, grpc_port=0, enable_grpc=False).create_app(model)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client
    finally:
        model.stop()


def assert_compiled_matches_eager(loaded: Any, jobs: list[GenerationParams], **engine_config: Any) -> None:
    """``jobs`` under --compile (the eager backend: dynamo's capture and guards are inductor's) compile nothing
    after warm-up, and make the images eager makes, alone (the first) and together."""
    with running_engine(loaded, **engine_config) as engine:
        expected = [pixels(f.result(timeout=60).image) for f in engine.submit(jobs)]
        expected.append(pixels(engine.submit(jobs[:1])[0].result(timeout=60).image))
    with running_engine(loaded, compile=True, compile_backend="eager", **engine_config) as engine:
        after_warmup = engine.runner.compiled_graphs()
        served = [pixels(f.result(timeout=60).image) for f in engine.submit(jobs)]
        served.append(pixels(engine.submit(jobs[:1])[0].result(timeout=60).image))
        assert engine.runner.compiled_graphs() == after_warmup, "a prompt length, size or row count compiled"
    for got, want in zip(served, expected, strict=True):
        assert np.abs(got - want).max() <= TOLERANCE


def save_random_lora(*args: Any, **kwargs: Any) -> Any:
    """``predictor.make_lora.save_random_lora`` (the adapter command's function), imported when first used, so
    importing this module imports no torch."""
    from predictor.make_lora import save_random_lora as make

    return make(*args, **kwargs)
