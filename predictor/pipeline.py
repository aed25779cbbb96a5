"""The one place that builds diffusers objects.

Loads a Stable Diffusion pipeline from a local directory (KServe's /mnt/models), a Hugging Face repo id,
or a builtin; picks device and dtype; and owns the scheduler registry. Safetensors only, no remote code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from predictor.builtin import BUILTIN_PREFIX, build_builtin
from predictor.schemas import SCHEDULER_NAMES

logger = logging.getLogger(__name__)

# name -> (class, overrides applied on top of the checkpoint's own scheduler config)
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
assert set(SCHEDULERS) == set(SCHEDULER_NAMES), "schemas.SCHEDULER_NAMES and the registry must agree"

MODEL_INDEX = "model_index.json"


class LoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


@dataclass
class LoadedPipeline:
    pipe: StableDiffusionPipeline
    source: str
    device: torch.device
    dtype: torch.dtype
    random_weights: bool
    load_seconds: float

    @property
    def native_size(self) -> int:
        sample_size = self.pipe.unet.config.sample_size
        if not isinstance(sample_size, int):
            sample_size = sample_size[0]
        return int(sample_size) * self.pipe.vae_scale_factor


def make_scheduler(name: str, base_config: Any) -> SchedulerMixin:
    """A fresh scheduler instance: each request owns one, since schedulers keep per-run state."""
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(base_config, **overrides)


def resolve_device(flag: str) -> torch.device:
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if flag == "cuda" and not torch.cuda.is_available():
        raise LoadError("--device cuda was asked for, but torch sees no CUDA device (is this the CUDA build of torch?)")
    return torch.device(flag)


def resolve_dtype(flag: str, device: torch.device) -> torch.dtype:
    if flag == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[flag]


def describe_source(model_dir: str | None, model_id: str) -> str:
    """Which source ``load_pipeline`` will use: the model dir when it holds a pipeline, else the model id."""
    if model_dir and (Path(model_dir) / MODEL_INDEX).is_file():
        return model_dir
    return model_id


def load_pipeline(
    model_dir: str | None,
    model_id: str,
    revision: str | None,
    device_flag: str = "auto",
    dtype_flag: str = "auto",
    safety_checker: str = "checkpoint",
) -> LoadedPipeline:
    device = resolve_device(device_flag)
    dtype = resolve_dtype(dtype_flag, device)
    source = describe_source(model_dir, model_id)
    started = time.perf_counter()
    random_weights = source.startswith(BUILTIN_PREFIX)
    if random_weights:
        pipe = build_builtin(source.removeprefix(BUILTIN_PREFIX), device, dtype)
    else:
        pipe = _from_pretrained(source, revision if source == model_id else None, device, dtype)
    if not isinstance(pipe, StableDiffusionPipeline):
        raise LoadError(f"'{source}' holds a {type(pipe).__name__}; this server serves StableDiffusionPipeline")
    pipe.set_progress_bar_config(disable=True)
    if safety_checker == "off":
        pipe.safety_checker = None
    elif safety_checker == "on" and pipe.safety_checker is None:
        raise LoadError(f"--safety_checker on, but '{source}' ships no safety checker")
    if device.type == "cuda":
        # SDPA is the default attention in diffusers on torch 2; channels_last helps the convolutions.
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    loaded = LoadedPipeline(pipe, source, device, dtype, random_weights, time.perf_counter() - started)
    if random_weights:
        logger.warning("model %s has RANDOM weights: it produces noise, not pictures", source)
    logger.info(
        "loaded %s on %s as %s in %.1f s (native size %d)",
        source,
        device,
        str(dtype).removeprefix("torch."),
        loaded.load_seconds,
        loaded.native_size,
    )
    return loaded


def _from_pretrained(source: str, revision: str | None, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    local = Path(source).is_dir()
    if not local and source.startswith(("/", ".")):
        raise LoadError(f"model directory '{source}' does not exist or holds no {MODEL_INDEX}")
    try:
        pipe = DiffusionPipeline.from_pretrained(
            source,
            revision=revision,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=local,
            device_map=device.type,  # weights go straight to the device, not through host memory first
        )
    except (OSError, ValueError) as exc:
        where = "directory" if local else "Hugging Face repo"
        raise LoadError(f"cannot load a diffusers pipeline from {where} '{source}': {exc}") from exc
    return pipe.to(device)
