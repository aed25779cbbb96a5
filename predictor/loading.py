"""The one place that builds diffusers pipelines.

Loads a pipeline from a local directory (KServe's /mnt/models), a Hugging Face repo id, or a builtin; finds its
family (``predictor.families``) from ``model_index.json`` before any weight is read; picks device and dtype.
Safetensors only, no remote code.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from predictor import weights
from predictor.config import ModelSource
from predictor.errors import LoadError
from predictor.families import (
    BUILTIN_PREFIX,
    Family,
    FamilyModel,
    build_builtin,
    builtin_entry,
    family_for,
    served_classes,
)
from predictor.logs import install_log_filters
from predictor.lora import LoraLibrary
from predictor.request import ModelTraits

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"


def unsupported_class(class_name: str, source: str) -> LoadError:
    return LoadError(f"'{source}' holds a {class_name}, which this server does not serve; it serves {served_classes()}")


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
        family = family_for(type(self.pipe).__name__)
        if family is None:
            raise unsupported_class(type(self.pipe).__name__, self.source)
        self.family: Family = family
        if self.max_sequence_length is None:
            self.max_sequence_length = family.long_text_tokens

    @functools.cached_property
    def model(self) -> FamilyModel:
        """The family's model of this pipeline: its traits and the runner's hooks."""
        return self.family.model(self)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.model.denoiser

    @property
    def native_size(self) -> int:
        return self.model.native_size

    @functools.cached_property
    def traits(self) -> ModelTraits:
        return self.model.traits()

    def describe(self) -> dict[str, Any]:
        """What an operator checks after a deploy: the family, and the scheduler config requests build on."""
        return self.model.describe()


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


def load_source(source: ModelSource) -> LoadedPipeline:
    """The pipeline the model flags (``ModelSource``) name."""
    return load_pipeline(
        source.model_dir,
        source.model_id,
        source.revision,
        device_flag=source.device,
        dtype_flag=source.dtype,
        safety_checker=source.safety_checker,
        variant=source.variant,
        max_sequence_length=source.max_sequence_length,
        preview_vae_dir=source.preview_vae_dir,
        lora_dir=source.lora_dir,
        max_lora_bytes=source.max_lora_bytes,
        storage_dtype=source.storage_dtype,
        offload_text_encoders=source.offload_text_encoders,
    )


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
    storage_dtype: str = "auto",
    offload_text_encoders: bool = False,
) -> LoadedPipeline:
    install_log_filters()
    device = resolve_device(device_flag)
    source = describe_source(model_dir, model_id)
    started = time.perf_counter()
    random_weights = source.startswith(BUILTIN_PREFIX)
    index: dict[str, Any] = {}
    local = False
    if random_weights:
        try:
            family, _ = builtin_entry(source.removeprefix(BUILTIN_PREFIX))
        except ValueError as exc:
            raise LoadError(str(exc)) from None
    else:
        local = Path(source).is_dir()
        if not local and source.startswith(("/", ".")):
            raise LoadError(f"model directory '{source}' does not exist or holds no {MODEL_INDEX}")
        index = read_model_index(source, revision if source == model_id else None, local)
        family = family_of(index, source)
    if max_sequence_length is not None and family.long_text_tokens is None:
        raise LoadError(f"--max_sequence_length is for models with a T5 encoder (FLUX, SD3); '{source}' has none")
    dtype = resolve_dtype(dtype_flag, device, family)
    # Weights that are cast or offloaded are loaded in host memory first: a 32B transformer in bfloat16 would not
    # fit the GPU it fits in float8, nor beside a text encoder meant to stay in host memory.
    placed_later = storage_dtype != "auto" or offload_text_encoders
    load_device = torch.device("cpu") if placed_later else device
    if random_weights:
        pipe = build_builtin(source.removeprefix(BUILTIN_PREFIX), load_device, dtype)
    else:
        pipe = _from_pretrained(
            source, revision if source == model_id else None, load_device, dtype, variant, index, local
        )
    if family_for(type(pipe).__name__) is not family:
        raise unsupported_class(type(pipe).__name__, source)
    pipe.set_progress_bar_config(disable=True)
    if safety_checker == "off" and hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    elif safety_checker == "on" and getattr(pipe, "safety_checker", None) is None:
        raise LoadError(f"--safety_checker on, but '{source}' ships no safety checker")
    preview_vae = None if preview_vae_dir is None else load_preview_vae(preview_vae_dir, pipe, device, dtype)
    if storage_dtype != "auto":
        if lora_dir is not None:
            raise LoadError("--storage_dtype with --lora_dir: adapters on layerwise-cast weights are not supported yet")
        store_layerwise(pipe, getattr(torch, storage_dtype), dtype)
    if placed_later:
        if offload_text_encoders and lora_dir is not None:
            # PEFT's adapter layers, added after the offloading hooks, would stay in host memory.
            raise LoadError(
                "--offload_text_encoders with --lora_dir: adapters on offloaded encoders are not supported yet"
            )
        place(pipe, device, offload_text_encoders)
    loras = None
    if lora_dir is not None:
        if not hasattr(pipe, "load_lora_weights"):
            raise LoadError(f"--lora_dir: diffusers loads no LoRA adapters into a {type(pipe).__name__}")
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
    loaded.model.check()
    if device.type == "cuda":
        loaded.model.prepare_for_cuda()
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


# The denoiser, which holds most of a DiT's weights and runs every step, is stored in --storage_dtype. The text
# encoders keep --dtype: diffusers' pipelines take their prompt embeddings' dtype from the encoder's, so a float8
# encoder makes float8 latents, which neither diffusers nor torch can draw. The VAE keeps --dtype too.
LAYERWISE_COMPONENTS = ("unet", "transformer")


def store_layerwise(pipe: DiffusionPipeline, storage: torch.dtype, compute: torch.dtype) -> None:
    """diffusers' layerwise casting on the pipeline's denoiser, as a user would apply it: ``enable_layerwise_casting``
    (normalisation layers and embeddings stay in the compute dtype)."""
    for name in LAYERWISE_COMPONENTS:
        component = getattr(pipe, name, None)
        if component is not None:
            component.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)


def place(pipe: DiffusionPipeline, device: torch.device, offload_text_encoders: bool) -> None:
    """Each component of a pipeline loaded in host memory onto ``device``; with ``offload_text_encoders`` the text
    encoders stay in host memory under diffusers' group offloading (leaf level: each layer's weights come to
    ``device`` as it runs, on a stream of their own on CUDA, so the copies overlap the compute)."""
    from diffusers.hooks import apply_group_offloading

    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        if offload_text_encoders and name.startswith("text_encoder"):
            apply_group_offloading(
                component, onload_device=device, offload_type="leaf_level", use_stream=device.type == "cuda"
            )
        else:
            component.to(device)


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
    family = family_for(class_name)
    if family is None:
        raise unsupported_class(class_name, source)
    return family


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
    source: str,
    revision: str | None,
    device: torch.device,
    dtype: torch.dtype,
    variant_flag: str,
    index: dict[str, Any],
    local: bool,
) -> DiffusionPipeline:
    family = family_of(index, source)
    served = family.served(str(index.get("_class_name")))
    if served is None:
        raise unsupported_class(str(index.get("_class_name")), source)
    variant = choose_variant(variant_flag, index, source, revision, local, dtype)
    if variant is not None:
        logger.info("loading the %s weight files of %s", variant, source)
    try:
        overrides = family.model.component_overrides(index, source, local, revision)
        # Components loaded otherwise are registered after diffusers' load: diffusers checks a passed component's
        # class against model_index.json's, which transformers may leave a placeholder (PixtralProcessor without
        # torchvision).
        pipe = served.pipeline_class.from_pretrained(
            source,
            revision=revision,
            variant=variant,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=local,
            device_map=device.type,  # weights go straight to the device, not through host memory first
            **dict.fromkeys(overrides),
        )
        pipe.register_modules(**{name: part for name, part in overrides.items() if part is not None})
    except (OSError, ValueError) as exc:
        where = "directory" if local else "Hugging Face repo"
        raise LoadError(f"cannot load a diffusers pipeline from {where} '{source}': {exc}") from exc
    return pipe.to(device)
