"""The one place that builds diffusers objects.

Loads a pipeline from a local directory (KServe's /mnt/models), a Hugging Face repo id, or a builtin; detects
its family from ``model_index.json`` before any weight is read; picks device and dtype; and owns the scheduler
registries (one for the UNet families' discrete schedules, one for flow matching) and the way each family sets
a job's timesteps. Safetensors only, no remote code.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FluxPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.flux import pipeline_flux
from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from predictor import weights
from predictor.builtin import BUILTIN_PREFIX, build_builtin, builtin_class_name
from predictor.request import SCHEDULER_NAMES, ModelTraits

logger = logging.getLogger(__name__)

# name -> (class, overrides applied on top of the checkpoint's own scheduler config): the UNet families'.
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


def _flow_sigmas(config: Any) -> dict[str, Any]:
    """A multistep solver on flow-matching sigmas, with the checkpoint's own shift (SD3.5's 3.0)."""
    shift = config.get("shift", config.get("flow_shift", 1.0))  # a checkpoint may ship a solver with flow_shift
    return {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": shift}


# The flow-matching families' (FLUX, SD3): the checkpoint's own Euler and the diffusers solvers that take flow
# sigmas. Overrides may depend on the checkpoint's config. Which of them a checkpoint can use is found by setting
# each one's timesteps as its pipeline would (``available_schedulers``): DPM-Solver, for one, takes FLUX's
# resolution shift only on checkpoints with dynamic shifting (FLUX.1-dev), and Heun takes no custom sigmas (FLUX).
FLOW_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], Callable[[Any], dict[str, Any]]]] = {
    "euler": (FlowMatchEulerDiscreteScheduler, lambda config: {}),
    "heun": (FlowMatchHeunDiscreteScheduler, lambda config: {}),
    "dpmpp_2m": (
        DPMSolverMultistepScheduler,
        lambda config: {**_flow_sigmas(config), "algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "unipc": (UniPCMultistepScheduler, _flow_sigmas),
}
assert set(SCHEDULERS) | set(FLOW_SCHEDULERS) == set(SCHEDULER_NAMES), "schemas.SCHEDULER_NAMES and the registries"

MODEL_INDEX = "model_index.json"
DEFAULT_LCM_STEPS = 50  # LCMScheduler's original_inference_steps when a checkpoint's config has none


@dataclass(frozen=True)
class Family:
    """A kind of pipeline this server serves: one runner module each (``predictor/runners``)."""

    name: str
    pipeline_class: type[DiffusionPipeline]
    description: str
    second_text_encoder: bool = False
    default_guidance_scale: float = 7.5  # diffusers' default for the pipeline
    flow_matching: bool = False  # a transformer trained with flow matching: FLOW_SCHEDULERS, bfloat16 on CUDA
    t5_tokens: int | None = None  # the T5 encoder's default window (diffusers'), None: no T5 encoder
    fields: frozenset[str] = frozenset()  # family-only request fields (schemas.FAMILY_FIELDS)

    @property
    def cuda_dtype(self) -> torch.dtype:
        # FLUX's activations overflow float16; SD3 is trained and shipped in bfloat16.
        return torch.bfloat16 if self.flow_matching else torch.float16


# model_index.json's _class_name -> family. A checkpoint of any other class is refused before loading.
FAMILIES: dict[str, Family] = {
    family.pipeline_class.__name__: family
    for family in (
        Family("sd", StableDiffusionPipeline, "Stable Diffusion 1.x and 2.x (SD-Turbo included)"),
        Family("sdxl", StableDiffusionXLPipeline, "Stable Diffusion XL (SDXL-Turbo included)", True, 5.0),
        # SD 1.x and 2.x inpainting checkpoints: a UNet with mask and masked-image channels (9 in).
        Family("sd", StableDiffusionInpaintPipeline, "Stable Diffusion 1.x and 2.x inpainting checkpoints"),
        # SDXL inpainting checkpoints likewise (StableDiffusionXLInpaintPipeline's guidance default is 7.5).
        Family("sdxl", StableDiffusionXLInpaintPipeline, "Stable Diffusion XL inpainting checkpoints", True),
        # An SD 1.x pipeline whose UNet embeds the guidance scale: the SD runner computes what it computes.
        Family("sd", LatentConsistencyModelPipeline, "Latent Consistency Models distilled from SD 1.x", False, 8.5),
        Family("flux", FluxPipeline, "FLUX.1 (schnell and dev)", True, 3.5, True, 512, frozenset({"true_cfg_scale"})),
        Family(
            "sd3",
            StableDiffusion3Pipeline,
            "Stable Diffusion 3 and 3.5 (medium, large, large-turbo)",
            True,
            7.0,
            True,
            256,
            frozenset({"prompt_3", "negative_prompt_3"}),
        ),
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
    max_sequence_length: int | None = field(default=None)  # the T5 window (FLUX, SD3); None: the family's
    preview_vae: Any = field(default=None)  # an AutoencoderTiny that decodes previews (--preview_vae_dir)
    loras: Any = field(default=None)  # the LoRA adapters requests may name (lora.LoraLibrary), None: no --lora_dir

    def __post_init__(self) -> None:
        if self.max_sequence_length is None:
            self.max_sequence_length = self.family.t5_tokens

    @property
    def family(self) -> Family:
        return FAMILIES[type(self.pipe).__name__]

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer if self.family.flow_matching else self.pipe.unet

    @property
    def native_size(self) -> int:
        """The size the checkpoint was trained at, in pixels: 512 for SD 1.x, 768 for SD 2.x-768, 1024 for SDXL,
        FLUX and SD3 (FLUX's pipeline fixes it; the builtins set a smaller one)."""
        if isinstance(self.pipe, FluxPipeline):
            sample_size: Any = self.pipe.default_sample_size
        else:
            sample_size = self.denoiser.config.sample_size
        if not isinstance(sample_size, int):
            sample_size = sample_size[0]
        return int(sample_size) * self.pipe.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Widths and heights must be multiples of this: the VAE's factor, times the patch size for transformers."""
        if isinstance(self.pipe, FluxPipeline):
            return self.pipe.vae_scale_factor * 2  # latents packed in 2x2 patches
        if isinstance(self.pipe, StableDiffusion3Pipeline):
            return self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size
        return self.pipe.vae_scale_factor

    @property
    def has_t5(self) -> bool:
        return getattr(self.pipe, "text_encoder_3" if self.family.name == "sd3" else "text_encoder_2", None) is not None

    @functools.cached_property
    def traits(self) -> ModelTraits:
        family, pipe = self.family, self.pipe
        # LCMScheduler spaces its steps over the checkpoint's distillation schedule and takes no more than that.
        lcm_steps = int(pipe.scheduler.config.get("original_inference_steps", DEFAULT_LCM_STEPS))
        schedulers = available_schedulers(self)
        default_scheduler = "dpmpp_2m"
        guidance, default_guidance = "cfg", family.default_guidance_scale
        fields = set(family.fields)
        tokens = {"prompt": pipe.tokenizer.model_max_length}
        if family.second_text_encoder:
            tokens["prompt_2"] = pipe.tokenizer_2.model_max_length
        if family.flow_matching:
            if not schedulers:
                raise LoadError(
                    f"no flow-matching scheduler ({', '.join(FLOW_SCHEDULERS)}) sets up on the checkpoint's "
                    f"{type(pipe.scheduler).__name__} config"
                )
            own = [n for n in schedulers if FLOW_SCHEDULERS[n][0] is type(pipe.scheduler)]
            default_scheduler = own[0] if own else schedulers[0]
            tokens["prompt_3" if family.name == "sd3" else "prompt_2"] = int(self.max_sequence_length or 0)
        if family.name == "flux" and not pipe.transformer.config.guidance_embeds:
            guidance, default_guidance = "none", 0.0  # FLUX.1-schnell: no guidance input at all
        elif family.name == "flux":
            guidance = "embedded"  # FLUX.1-dev: the scale is an input of the transformer
        if family.name == "sd3" and not self.has_t5:
            fields -= {"prompt_3", "negative_prompt_3"}
            tokens.pop("prompt_3")
        modes = {"text"}
        default_strength = {"img2img": 0.8, "inpaint": 1.0}
        image_schedulers: tuple[str, ...] = ()
        unet_pipelines = (
            StableDiffusionPipeline,
            StableDiffusionInpaintPipeline,
            StableDiffusionXLPipeline,
            StableDiffusionXLInpaintPipeline,
        )  # not LCM's: its img2img pipeline is another computation
        if isinstance(pipe, unet_pipelines):
            # A UNet with mask and masked-image channels (9 in) is an inpainting checkpoint: it inpaints only.
            inpainting_unet = pipe.unet.config.in_channels != pipe.vae.config.latent_channels
            modes = {"inpaint"} if inpainting_unet else {"text", "img2img", "inpaint"}
        if family.name == "sdxl":
            # StableDiffusionXLImg2ImgPipeline's and StableDiffusionXLInpaintPipeline's defaults.
            default_strength = {"img2img": 0.3, "inpaint": 0.9999}
        if family.flow_matching:
            # FluxImg2ImgPipeline and StableDiffusion3Img2ImgPipeline: the image's latents noised by the
            # scheduler's scale_noise, which only the flow-matching Euler and Heun have.
            modes = {"text", "img2img", "inpaint"}
            default_strength = {"img2img": 0.6, "inpaint": 0.6}
            image_schedulers = tuple(n for n in schedulers if hasattr(FLOW_SCHEDULERS[n][0], "scale_noise"))
        max_size = None
        pos_embed = getattr(self.denoiser.config, "pos_embed_max_size", None)
        if family.name == "sd3" and pos_embed:
            max_size = int(pos_embed) * self.size_multiple
        return ModelTraits(
            family=family.name,
            native_size=self.native_size,
            second_text_encoder=family.second_text_encoder,
            lcm_max_steps=lcm_steps,
            schedulers=schedulers,
            default_scheduler=default_scheduler,
            default_guidance_scale=default_guidance,
            size_multiple=self.size_multiple,
            fields=frozenset(fields),
            guidance=guidance,
            max_prompt_tokens=tokens,
            max_image_size=max_size,
            modes=frozenset(modes),
            default_strength=default_strength,
            image_schedulers=image_schedulers,
            flow_matching=family.flow_matching,
        )

    def describe(self) -> dict[str, Any]:
        """What an operator checks after a deploy: the family, and the scheduler config requests build on."""
        config = self.pipe.scheduler.config
        own = {
            "class": type(self.pipe.scheduler).__name__,
            "prediction_type": config.get(
                "prediction_type", "flow_prediction" if self.family.flow_matching else "epsilon"
            ),
        }
        if self.family.flow_matching:
            own |= {
                "shift": config.get("shift", 1.0),
                "use_dynamic_shifting": config.get("use_dynamic_shifting", False),
            }
        else:
            own["timestep_spacing"] = config.get("timestep_spacing", "leading")
        return {"family": self.family.name, "pipeline": type(self.pipe).__name__, "checkpoint_scheduler": own}


def make_scheduler(name: str, base_config: Any, flow_matching: bool = False) -> SchedulerMixin:
    """A fresh scheduler instance: each request owns one, since schedulers keep per-run state. Made as diffusers
    makes it, from the checkpoint's whole config: fields a class does not take are kept on its config (DPM-Solver
    reads a Euler config's sigma_min and sigma_max, and FLUX's base_shift and max_shift)."""
    if flow_matching:
        flow_cls, flow_overrides = FLOW_SCHEDULERS[name]
        return flow_cls.from_config(base_config, **flow_overrides(base_config))
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(base_config, **overrides)


def set_timesteps(
    loaded: LoadedPipeline, scheduler: SchedulerMixin, steps: int, height: int, width: int, device: torch.device
) -> None:
    """Set a job's schedule as its family's pipeline sets it: FLUX passes its own sigmas and a shift ``mu`` from
    the image's token count; SD3 passes ``mu`` only to schedulers with dynamic shifting; the UNet families ask for
    ``steps`` steps. Uses diffusers' own functions, so the schedule is the pipeline's."""
    config, pipe = scheduler.config, loaded.pipe
    if isinstance(pipe, FluxPipeline):
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        tokens = (height // (pipe.vae_scale_factor * 2)) * (width // (pipe.vae_scale_factor * 2))
        mu = pipeline_flux.calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        pipeline_flux.retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
    elif isinstance(pipe, StableDiffusion3Pipeline):
        kwargs = {}
        if config.get("use_dynamic_shifting", None):
            patch = pipe.transformer.config.patch_size
            tokens = (height // pipe.vae_scale_factor // patch) * (width // pipe.vae_scale_factor // patch)
            kwargs["mu"] = pipeline_stable_diffusion_3.calculate_shift(
                tokens,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        pipeline_stable_diffusion_3.retrieve_timesteps(scheduler, steps, device, sigmas=None, **kwargs)
    else:
        scheduler.set_timesteps(steps, device=device)


def available_schedulers(loaded: LoadedPipeline) -> tuple[str, ...]:
    """The registry's names this checkpoint can use: for the flow-matching families, those whose schedule sets up
    the way the family's pipeline sets it (anything else would fail every request)."""
    if not loaded.family.flow_matching:
        return tuple(SCHEDULERS)
    names = []
    size = loaded.native_size
    for name in FLOW_SCHEDULERS:
        try:
            scheduler = make_scheduler(name, loaded.pipe.scheduler.config, flow_matching=True)
            set_timesteps(loaded, scheduler, 4, size, size, torch.device("cpu"))
        except Exception as exc:  # any failure means the pipeline could not use it either
            logger.debug("scheduler %s does not suit this checkpoint: %s", name, exc)
            continue
        names.append(name)
    return tuple(names)


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


def resolve_dtype(flag: str, device: torch.device, family: Family | None = None) -> torch.dtype:
    if flag == "auto":
        if device.type != "cuda":
            return torch.float32
        return family.cuda_dtype if family is not None else torch.float16
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
    max_sequence_length: int | None = None,
    preview_vae_dir: str | None = None,
    lora_dir: str | None = None,
    max_lora_bytes: int = 1024**3,
) -> LoadedPipeline:
    device = resolve_device(device_flag)
    source = describe_source(model_dir, model_id)
    started = time.perf_counter()
    random_weights = source.startswith(BUILTIN_PREFIX)
    index: dict[str, Any] = {}
    local = False
    if random_weights:
        try:
            class_name = builtin_class_name(source.removeprefix(BUILTIN_PREFIX))
        except ValueError as exc:
            raise LoadError(str(exc)) from None
    else:
        local = Path(source).is_dir()
        if not local and source.startswith(("/", ".")):
            raise LoadError(f"model directory '{source}' does not exist or holds no {MODEL_INDEX}")
        index = read_model_index(source, revision if source == model_id else None, local)
        class_name = str(index.get("_class_name", "<no _class_name>"))
    family = family_of({"_class_name": class_name}, source)
    if max_sequence_length is not None and family.t5_tokens is None:
        raise LoadError(f"--max_sequence_length is for models with a T5 encoder (FLUX, SD3); '{source}' has none")
    dtype = resolve_dtype(dtype_flag, device, family)
    if random_weights:
        pipe = build_builtin(source.removeprefix(BUILTIN_PREFIX), device, dtype)
    else:
        pipe = _from_pretrained(source, revision if source == model_id else None, device, dtype, variant, index, local)
    if type(pipe).__name__ not in FAMILIES:
        raise unsupported_class(type(pipe).__name__, source)
    pipe.set_progress_bar_config(disable=True)
    if safety_checker == "off" and hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    elif safety_checker == "on" and getattr(pipe, "safety_checker", None) is None:
        raise LoadError(f"--safety_checker on, but '{source}' ships no safety checker")
    if device.type == "cuda":
        # SDPA is the default attention in diffusers on torch 2; channels_last helps the convolutions.
        if not family.flow_matching:
            pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    preview_vae = None if preview_vae_dir is None else load_preview_vae(preview_vae_dir, pipe, device, dtype)
    loras = None
    if lora_dir is not None:
        if not hasattr(pipe, "load_lora_weights"):
            raise LoadError(f"--lora_dir: diffusers loads no LoRA adapters into a {type(pipe).__name__}")
        from predictor.lora import LoraLibrary

        loras = LoraLibrary(lora_dir, max_lora_bytes)
    loaded = LoadedPipeline(
        pipe,
        source,
        device,
        dtype,
        random_weights,
        time.perf_counter() - started,
        max_sequence_length,
        preview_vae,
        loras,
    )
    if random_weights:
        logger.warning("model %s has RANDOM weights: it produces noise, not pictures", source)
    if family.name == "sd3" and not loaded.has_t5:
        logger.info(
            "%s has no T5 encoder (text_encoder_3): prompts condition it through the CLIP encoders only", source
        )
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


def load_preview_vae(directory: str, pipe: DiffusionPipeline, device: torch.device, dtype: torch.dtype) -> Any:
    """A tiny VAE for previews (``AutoencoderTiny``, TAESD and its kin) from a local directory, checked against the
    pipeline: it must read as many latent channels as the model's VAE makes (taesd: 4, taef1 and taesd3: 16)."""
    from diffusers import AutoencoderTiny

    path = Path(directory)
    if not (path / "config.json").is_file():
        raise LoadError(
            f"--preview_vae_dir '{directory}' holds no config.json (save a diffusers AutoencoderTiny there)"
        )
    try:
        config = AutoencoderTiny.load_config(path)
    except (OSError, ValueError) as exc:
        raise LoadError(f"--preview_vae_dir '{directory}': unreadable config.json: {exc}") from exc
    if config.get("_class_name") != AutoencoderTiny.__name__:
        raise LoadError(
            f"--preview_vae_dir '{directory}' holds a {config.get('_class_name')}, not an AutoencoderTiny (TAESD)"
        )
    wanted = pipe.vae.config.latent_channels
    if int(config.get("latent_channels", 4)) != wanted:
        raise LoadError(
            f"--preview_vae_dir '{directory}' decodes {config.get('latent_channels', 4)}-channel latents, but this "
            f"model's have {wanted} (taesd and taesdxl: 4; taef1 and taesd3: 16)"
        )
    try:
        tiny = AutoencoderTiny.from_pretrained(path, torch_dtype=dtype, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise LoadError(f"cannot load the preview VAE in '{directory}': {exc}") from exc
    logger.info("previews decode with the tiny VAE in %s", directory)
    return tiny.to(device).eval()


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


def _absent_components(index: dict[str, Any], source: str, local: bool) -> dict[str, None]:
    """SD3's T5 encoder when model_index.json has it null or the directory lacks its folder (left out to save
    9.5 GB): diffusers runs without it when it is passed as None; any other missing component stays an error."""
    if not local or index.get("_class_name") != StableDiffusion3Pipeline.__name__:
        return {}
    listed = index.get("text_encoder_3")
    named = isinstance(listed, list | tuple) and bool(listed) and listed[0] is not None
    if named and (Path(source) / "text_encoder_3" / "config.json").is_file():
        return {}
    logger.info("'%s' has no text_encoder_3: loading SD3 without its T5 encoder", source)
    return {"text_encoder_3": None, "tokenizer_3": None}


def _from_pretrained(
    source: str,
    revision: str | None,
    device: torch.device,
    dtype: torch.dtype,
    variant_flag: str,
    index: dict[str, Any],
    local: bool,
) -> DiffusionPipeline:
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
            **_absent_components(index, source, local),
        )
    except (OSError, ValueError) as exc:
        where = "directory" if local else "Hugging Face repo"
        raise LoadError(f"cannot load a diffusers pipeline from {where} '{source}': {exc}") from exc
    return pipe.to(device)
