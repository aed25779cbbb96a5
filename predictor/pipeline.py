"""The one place that builds diffusers objects.

Loads a pipeline from a local directory (KServe's /mnt/models), a Hugging Face repo id, or a builtin; detects
its family from ``model_index.json`` before any weight is read; picks device and dtype; and owns the scheduler
registry. Safetensors only, no remote code.
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
    LatentConsistencyModelPipeline,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from predictor import weights
from predictor.builtin import BUILTIN_PREFIX, build_builtin
from predictor.schemas import SCHEDULER_NAMES, ModelTraits

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
    "lcm": (LCMScheduler, {}),  # for LCM-distilled checkpoints
}
assert set(SCHEDULERS) == set(SCHEDULER_NAMES), "schemas.SCHEDULER_NAMES and the registry must agree"

MODEL_INDEX = "model_index.json"
DEFAULT_LCM_STEPS = 50  # LCMScheduler's original_inference_steps when a checkpoint's config has none


@dataclass(frozen=True)
class Family:
    """A kind of pipeline this server serves: one runner module each (``predictor/runners``)."""

    name: str
    pipeline_class: type[DiffusionPipeline]
    description: str
    second_text_encoder: bool = False


# model_index.json's _class_name -> family. A checkpoint of any other class is refused before loading.
FAMILIES: dict[str, Family] = {
    family.pipeline_class.__name__: family
    for family in (
        Family("sd", StableDiffusionPipeline, "Stable Diffusion 1.x and 2.x (SD-Turbo included)"),
        Family("sdxl", StableDiffusionXLPipeline, "Stable Diffusion XL (SDXL-Turbo included)", True),
        # An SD 1.x pipeline whose UNet embeds the guidance scale: the SD runner computes what it computes.
        Family("sd", LatentConsistencyModelPipeline, "Latent Consistency Models distilled from SD 1.x"),
    )
}


class LoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


def unsupported_class(class_name: str, source: str) -> LoadError:
    supported = ", ".join(f"{name} ({family.description})" for name, family in FAMILIES.items())
    return LoadError(f"'{source}' holds a {class_name}, which this server does not serve; it serves {supported}")


@dataclass
class LoadedPipeline:
    pipe: DiffusionPipeline
    source: str
    device: torch.device
    dtype: torch.dtype
    random_weights: bool
    load_seconds: float

    @property
    def family(self) -> Family:
        return FAMILIES[type(self.pipe).__name__]

    @property
    def native_size(self) -> int:
        """The size the checkpoint was trained at (the UNet's sample size in pixels): 512 for SD 1.x, 768 for
        SD 2.x-768, 1024 for SDXL."""
        sample_size = self.pipe.unet.config.sample_size
        if not isinstance(sample_size, int):
            sample_size = sample_size[0]
        return int(sample_size) * self.pipe.vae_scale_factor

    @property
    def traits(self) -> ModelTraits:
        family = self.family
        # LCMScheduler spaces its steps over the checkpoint's distillation schedule and takes no more than that.
        lcm_steps = int(self.pipe.scheduler.config.get("original_inference_steps", DEFAULT_LCM_STEPS))
        return ModelTraits(family.name, self.native_size, family.second_text_encoder, lcm_steps)

    def describe(self) -> dict[str, Any]:
        """What an operator checks after a deploy: the family, and the scheduler config requests build on."""
        config = self.pipe.scheduler.config
        return {
            "family": self.family.name,
            "pipeline": type(self.pipe).__name__,
            "checkpoint_scheduler": {
                "class": type(self.pipe.scheduler).__name__,
                "prediction_type": config.get("prediction_type", "epsilon"),
                "timestep_spacing": config.get("timestep_spacing", "leading"),
            },
        }


def make_scheduler(name: str, base_config: Any) -> SchedulerMixin:
    """A fresh scheduler instance: each request owns one, since schedulers keep per-run state. Made as diffusers
    makes it, from the checkpoint's whole config: fields a class does not take are kept on its config (DPM-Solver
    reads a Euler config's sigma_min and sigma_max)."""
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(base_config, **overrides)


class _ForeignConfigFields(logging.Filter):
    """diffusers warns, at every scheduler made from another class's config, that the other class's fields are
    ignored: with a scheduler per request that would be a warning per request, about nothing wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "but are not expected and will be ignored" not in record.getMessage()


logging.getLogger("diffusers.configuration_utils").addFilter(_ForeignConfigFields())


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
    variant: str = "auto",
) -> LoadedPipeline:
    device = resolve_device(device_flag)
    dtype = resolve_dtype(dtype_flag, device)
    source = describe_source(model_dir, model_id)
    started = time.perf_counter()
    random_weights = source.startswith(BUILTIN_PREFIX)
    if random_weights:
        try:
            pipe = build_builtin(source.removeprefix(BUILTIN_PREFIX), device, dtype)
        except ValueError as exc:
            raise LoadError(str(exc)) from None
    else:
        pipe = _from_pretrained(source, revision if source == model_id else None, device, dtype, variant)
    if type(pipe).__name__ not in FAMILIES:
        raise unsupported_class(type(pipe).__name__, source)
    pipe.set_progress_bar_config(disable=True)
    if safety_checker == "off" and hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    elif safety_checker == "on" and getattr(pipe, "safety_checker", None) is None:
        raise LoadError(f"--safety_checker on, but '{source}' ships no safety checker")
    if device.type == "cuda":
        # SDPA is the default attention in diffusers on torch 2; channels_last helps the convolutions.
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    loaded = LoadedPipeline(pipe, source, device, dtype, random_weights, time.perf_counter() - started)
    if random_weights:
        logger.warning("model %s has RANDOM weights: it produces noise, not pictures", source)
    logger.info(
        "loaded %s (%s) on %s as %s in %.1f s (native size %d)",
        source,
        type(pipe).__name__,
        device,
        str(dtype).removeprefix("torch."),
        loaded.load_seconds,
        loaded.native_size,
    )
    return loaded


def read_model_index(source: str, revision: str | None = None, local: bool = True) -> dict[str, Any]:
    """A checkpoint's model_index.json (one small file: no weights are read)."""
    try:
        return dict(DiffusionPipeline.load_config(source, revision=revision, local_files_only=local))
    except (OSError, ValueError) as exc:
        where = "directory" if local else "Hugging Face repo"
        raise LoadError(f"cannot read {MODEL_INDEX} of {where} '{source}': {exc}") from exc


def family_of(index: dict[str, Any], source: str) -> Family:
    class_name = str(index.get("_class_name", "<no _class_name>"))
    if class_name not in FAMILIES:
        raise unsupported_class(class_name, source)
    return FAMILIES[class_name]


def choose_variant(
    flag: str, index: dict[str, Any], source: str, revision: str | None, local: bool, dtype: torch.dtype
) -> str | None:
    """The weight files to read: ``auto`` takes fp16 for a float16 load when every component has it."""
    if flag != "auto":
        return None if flag == "none" else flag
    if dtype != torch.float16:
        return None
    try:
        if local:
            root = Path(source)
            files = [str(p.relative_to(root)) for p in root.rglob("*.safetensors*")]
        else:
            from huggingface_hub import list_repo_files

            files = list_repo_files(source, revision=revision)
    except Exception as exc:  # offline, or the Hub refused: the plain files, as without the flag
        logger.info("cannot list the files of '%s' (%s); loading the plain weights", source, type(exc).__name__)
        return None
    return weights.choose_variant(files, weights.components_of(index), "auto")


def _from_pretrained(
    source: str, revision: str | None, device: torch.device, dtype: torch.dtype, variant_flag: str = "auto"
) -> DiffusionPipeline:
    local = Path(source).is_dir()
    if not local and source.startswith(("/", ".")):
        raise LoadError(f"model directory '{source}' does not exist or holds no {MODEL_INDEX}")
    index = read_model_index(source, revision, local)
    family = family_of(index, source)
    variant = choose_variant(variant_flag, index, source, revision, local, dtype)
    if variant is not None:
        logger.info("loading the %s weight files of %s", variant, source)
    try:
        pipe = family.pipeline_class.from_pretrained(
            source,
            revision=revision,
            variant=variant,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=local,
            device_map=device.type,  # weights go straight to the device, not through host memory first
        )
    except (OSError, ValueError) as exc:
        where = "directory" if local else "Hugging Face repo"
        raise LoadError(f"cannot load a diffusers pipeline from {where} '{source}': {exc}") from exc
    return pipe.to(device)
