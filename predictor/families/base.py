"""What a model family is: a ``Family`` (registered once, known before any weight is read) and a ``FamilyModel``
(one per loaded pipeline: its traits, its schedules, and the narrow hooks the model-agnostic runner calls).

A family module defines one ``FamilyModel`` subclass and one ``FAMILY``; ``predictor.families`` registers it. The
runner (``predictor.runner.DiffusionRunner``) owns rows, guidance mixing, CUDA streams, the decode transport,
previews and ``--compile``; it asks the family only what differs between pipelines, each hook with one signature:

- the schedule: ``make_scheduler``, ``set_timesteps``, ``set_first_step``;
- the rows: ``shape_key``, ``encode_prompts``, ``initial_latents``, ``model_input``, ``timestep_row``,
  ``guidance_scale``;
- image jobs: ``encode_images``, ``image_latents``, ``renoise``, ``blends_inpainting``;
- the decode: ``final_latents``, ``latents_for_vae``, ``flag_unsafe``;
- ``--compile``: ``denoiser_module``, ``native_row_shape``, ``example_inputs``.

Every hook's specification is the family's diffusers pipeline, row for row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from predictor.errors import GenerationFailed, LoadError
from predictor.jobs import Job
from predictor.request import SCHEDULER_NAMES, GenerationParams, ModelTraits, kept_steps

logger = logging.getLogger(__name__)

Conditioning = dict[str, Any]  # one row's inputs to the denoiser besides the latents and timestep (nested dicts too)
Encoded = tuple[Conditioning, Conditioning | None]  # a job's (conditional, unconditional) rows; None: unguided
# A scheduler registry: request name -> (class, the overrides for a checkpoint's scheduler config).
SchedulerRegistry = dict[str, tuple[type[SchedulerMixin], Callable[[Any], dict[str, Any]]]]


@dataclass(frozen=True)
class Builtin:
    """A pipeline built in-process with random weights (``builtin:NAME``, predictor/builtin.py): a tiny one for
    tests and smoke runs (built in float32 on the CPU, then cast and moved), or a full-size architecture built
    straight on the device in the dtype, for GPU benchmarks without weights."""

    pipeline_class: type[DiffusionPipeline]
    build: Callable[..., DiffusionPipeline]
    full_size: bool = False


@dataclass(frozen=True, kw_only=True)
class ServedPipeline:
    """One diffusers pipeline class a family serves, as ``model_index.json`` names it."""

    pipeline_class: type[DiffusionPipeline]
    description: str
    default_guidance_scale: float  # diffusers' default for this pipeline's __call__
    # diffusers' default true_cfg_scale (FLUX.1's 1: off; Qwen-Image's 4, in effect with a negative prompt)
    default_true_cfg_scale: float = 1.0
    takes_images: bool = True  # False: its img2img and inpainting pipelines compute otherwise (LCM's)


@dataclass(frozen=True, kw_only=True)
class Family:
    """A family as the registry knows it before loading: which checkpoints it serves, which model computes them,
    and the builtins that stand for them."""

    name: str
    model: type[FamilyModel]
    pipelines: tuple[ServedPipeline, ...]
    # FLUX's activations overflow float16, and the DiTs are trained and shipped in bfloat16.
    cuda_dtype: torch.dtype = torch.float16
    long_text_tokens: int | None = None  # the T5 window's default (diffusers'); None: --max_sequence_length refused
    builtins: dict[str, Builtin] = field(default_factory=dict)

    def served(self, class_name: str) -> ServedPipeline | None:
        return next((p for p in self.pipelines if p.pipeline_class.__name__ == class_name), None)


def make_scheduler(registry: SchedulerRegistry, name: str, base_config: Any) -> SchedulerMixin:
    """A fresh scheduler instance of registry entry ``name``, made as diffusers makes it, from the checkpoint's whole
    config: fields a class does not take stay on its config (DPM-Solver reads a Euler config's sigma_min, and
    FLUX's base_shift and max_shift)."""
    cls, overrides = registry[name]
    return cls.from_config(base_config, **overrides(base_config))


def set_first_step_index(scheduler: Any) -> None:
    """Find where the schedule starts on the host, as the scheduler's first step would on the device (the
    same lookup on a host copy of the same timesteps), so that step needs no device-to-host round trip."""
    if not (hasattr(scheduler, "set_begin_index") and hasattr(scheduler, "index_for_timestep")):
        return  # schedulers that track no step index (DDIM, PNDM)
    timesteps = scheduler.timesteps.cpu()
    scheduler.set_begin_index(scheduler.index_for_timestep(timesteps[0], timesteps))


def truncated(tokenizer: Any, text: str, max_tokens: int | None = None) -> bool:
    """Whether ``text`` is longer than the tokenizer's window (77 tokens for CLIP, ``max_tokens`` when given: the
    T5 window a pipeline sets), so the encoder sees only part."""
    max_tokens = max_tokens or tokenizer.model_max_length
    return len(tokenizer(text, truncation=True, max_length=max_tokens + 1).input_ids) > max_tokens


def with_negatives(
    jobs: list[Job], guided: list[Job], texts: Callable[[GenerationParams], tuple[str, ...]], negatives: Callable
) -> tuple[list[list[str]], dict[int, int]]:
    """Every job's prompt texts, then the guided jobs' negative texts, per encoder (``texts`` and ``negatives``
    give one text per encoder); and where each guided job's negative row sits. One encoder call per list then
    serves the whole batch, and a job's rows are slices of it."""
    columns: list[list[str]] = [list(column) for column in zip(*(texts(job.params) for job in jobs), strict=True)]
    for job in guided:
        for column, text in zip(columns, negatives(job.params), strict=True):
            column.append(text)
    return columns, {id(job): len(jobs) + index for index, job in enumerate(guided)}


def two_prompts(p: GenerationParams) -> tuple[str, str]:
    """A job's texts for two encoders, as the two-encoder pipelines default them: ``prompt_2`` is ``prompt``."""
    return p.prompt, p.prompt_2 or p.prompt


def two_negative_prompts(p: GenerationParams) -> tuple[str, str]:
    """A guided job's negative texts for two encoders: ``""`` when absent, ``negative_prompt_2`` defaulting."""
    return p.negative_prompt or "", p.negative_prompt_2 or p.negative_prompt or ""


def vae_posterior_sample(posterior: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """diffusers' ``latent_dist.sample(generator)`` for one row: the same draw, on the posterior's device."""
    mean, std = posterior
    return mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


def posteriors(vae: Any, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mean, std) of the VAE encoder's posterior for each image: one call in float32, image by image in half
    precision, where a batched call sums in another order than diffusers' one-image call (as for the decode)."""
    if images.dtype == torch.float32:
        posterior = vae.encode(images).latent_dist
        return [(posterior.mean[i : i + 1], posterior.std[i : i + 1]) for i in range(len(images))]
    return [(p.mean, p.std) for p in (vae.encode(images[i : i + 1]).latent_dist for i in range(len(images)))]


def by_output_size(jobs: list[Job]) -> dict[tuple[int, int], list[Job]]:
    """Image jobs grouped by output size: one VAE encoder pass each."""
    groups: dict[tuple[int, int], list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.params.height, job.params.width), []).append(job)
    return groups


class Loaded(Protocol):
    """What a family's model reads of the loaded pipeline (``predictor.loading.LoadedPipeline``)."""

    pipe: Any
    source: str
    device: torch.device
    dtype: torch.dtype
    max_sequence_length: int | None
    family: Family


class FamilyModel:
    """One loaded pipeline as its family computes it. Subclasses set the class attributes and the hooks their
    pipeline defines differently; the defaults are SD's."""

    schedulers: ClassVar[SchedulerRegistry]
    default_scheduler: ClassVar[str | None] = "dpmpp_2m"  # None: the checkpoint's own (else the first available)
    # Schedulers whose step makes no host synchronisation (measured on an H200): on CUDA the host is free while such
    # a step runs, so work queued behind it costs the GPU nothing.
    host_free_schedulers: ClassVar[frozenset[str]] = frozenset()
    # Image jobs keep diffusers' img2img strength rounding: SD's ``int(steps * strength)`` steps, or the flow
    # pipelines' start at ``int(steps - steps * strength)``.
    strength_rounded_from_start: ClassVar[bool] = False
    default_strength: ClassVar[dict[str, float]] = {"img2img": 0.8, "inpaint": 1.0}
    prediction_type: ClassVar[str] = "epsilon"  # what the checkpoint's scheduler config says when it says nothing
    family_fields: ClassVar[frozenset[str]] = frozenset()  # family-only request fields (request.FAMILY_FIELDS)
    # --compile compiles the transformer's repeated blocks with dynamic sequence sizes, not the whole call: for a
    # transformer whose inputs are ragged (lists of different lengths). example_inputs then takes ``ragged``.
    compile_by_region: ClassVar[bool] = False

    def __init__(self, loaded: Loaded) -> None:
        self.loaded = loaded
        self.pipe: Any = loaded.pipe
        self.device = loaded.device
        self.vae: Any = self.decoding_vae(loaded.pipe.vae)  # the VAE that decodes (SDXL's may be a float32 copy)

    def decoding_vae(self, vae: Any) -> Any:
        """The VAE as the runner calls it: ``decode`` of (rows, channels, height, width) latents to images, with
        ``config.latent_channels`` (Qwen-Image's video VAE is wrapped to look so)."""
        return vae

    # ---- facts about the checkpoint ----------------------------------------------------------------

    @property
    def denoiser(self) -> torch.nn.Module:
        """The module holding the denoiser's weights (LoRA adapters and --compile act on it)."""
        return self.pipe.unet

    @property
    def denoiser_module(self) -> torch.nn.Module:
        """The module called as ``(sample, timesteps, **conditioning, return_dict=False)[0]``."""
        return self.denoiser

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype diffusers draws the latents in (its prompt embeddings' dtype)."""
        return self.pipe.text_encoder.dtype

    @property
    def native_size(self) -> int:
        """The size the checkpoint was trained at, in pixels (512 for SD 1.x, 1024 for SDXL)."""
        sample_size: Any = self.denoiser.config.sample_size
        if not isinstance(sample_size, int):
            sample_size = sample_size[0]
        return int(sample_size) * self.pipe.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Widths and heights must be multiples of this: the VAE's factor (times a transformer's patch size)."""
        return int(self.pipe.vae_scale_factor)

    @property
    def max_image_size(self) -> int | None:
        """The model's own ceiling on a side, in pixels; None: none."""
        return None

    @property
    def has_safety_checker(self) -> bool:
        return False

    def prepare_for_cuda(self) -> None:
        """Memory layouts that suit the device (after loading on CUDA): channels_last for convolutions."""
        self.pipe.vae.to(memory_format=torch.channels_last)

    def check(self) -> None:
        """Refuse at load a checkpoint that would fail every request (LoadError)."""

    # ---- what a request may ask of it ---------------------------------------------------------------

    def default_guidance_scale(self) -> float:
        served = self.loaded.family.served(type(self.pipe).__name__)
        return served.default_guidance_scale if served is not None else 7.5

    def default_true_cfg_scale(self) -> float:
        served = self.loaded.family.served(type(self.pipe).__name__)
        return served.default_true_cfg_scale if served is not None else 1.0

    def guidance_kind(self) -> str:
        """ "cfg": classifier-free guidance rows; "embedded": the scale is an input; "none": no guidance scale."""
        return "cfg"

    def prompt_windows(self) -> dict[str, int]:
        """Each text field's token window (the fields a second or third encoder reads included)."""
        return {"prompt": self.pipe.tokenizer.model_max_length}

    def modes(self) -> frozenset[str]:
        served = self.loaded.family.served(type(self.pipe).__name__)
        if served is not None and not served.takes_images:
            return frozenset({"text"})
        return frozenset({"text", "img2img", "inpaint"})

    def image_schedulers(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """Which of ``names`` can start from an image; empty: all of them."""
        return ()

    def lcm_max_steps(self) -> int:
        # LCMScheduler spaces its steps over the checkpoint's distillation schedule and takes no more than that.
        return int(self.pipe.scheduler.config.get("original_inference_steps", 50))

    def traits(self) -> ModelTraits:
        schedulers = self.available_schedulers()
        if not schedulers:
            raise LoadError(
                f"no scheduler ({', '.join(self.schedulers)}) sets up on the checkpoint's "
                f"{type(self.pipe.scheduler).__name__} config"
            )
        own = [name for name in schedulers if self.schedulers[name][0] is type(self.pipe.scheduler)]
        default = self.default_scheduler if self.default_scheduler in schedulers else (own or schedulers)[0]
        windows = self.prompt_windows()
        guidance = self.guidance_kind()
        return ModelTraits(
            family=self.loaded.family.name,
            native_size=self.native_size,
            second_text_encoder="prompt_2" in windows,
            lcm_max_steps=self.lcm_max_steps(),
            schedulers=schedulers,
            default_scheduler=default,
            default_guidance_scale=0.0 if guidance == "none" else self.default_guidance_scale(),
            default_true_cfg_scale=self.default_true_cfg_scale(),
            size_multiple=self.size_multiple,
            fields=self.taken_fields(windows),
            guidance=guidance,  # type: ignore[arg-type]
            max_prompt_tokens=windows,
            max_image_size=self.max_image_size,
            modes=self.modes(),
            default_strength=dict(self.default_strength),
            image_schedulers=self.image_schedulers(schedulers),
            strength_rounded_from_start=self.strength_rounded_from_start,
            **self.reference_rules(),
        )

    def reference_rules(self) -> dict[str, Any]:
        """ModelTraits' reference_* and max_reference_images fields where the model edits by reference and its
        pipeline's rules differ from FLUX.2's (the defaults)."""
        return {}

    def taken_fields(self, windows: dict[str, int]) -> frozenset[str]:
        """The family fields this checkpoint takes (SD3 without its T5 encoder takes no third prompt)."""
        return self.family_fields

    def describe(self) -> dict[str, Any]:
        """What an operator checks after a deploy: the family, and the scheduler config requests build on."""
        config = self.pipe.scheduler.config
        own = {
            "class": type(self.pipe.scheduler).__name__,
            "prediction_type": config.get("prediction_type", self.prediction_type),
        }
        return {
            "family": self.loaded.family.name,
            "pipeline": type(self.pipe).__name__,
            "checkpoint_scheduler": own | self.describe_schedule(config),
        }

    def describe_schedule(self, config: Any) -> dict[str, Any]:
        return {"timestep_spacing": config.get("timestep_spacing", "leading")}

    # ---- the schedule ---------------------------------------------------------------------------------

    def make_scheduler(self, name: str) -> SchedulerMixin:
        """A fresh scheduler for one job (schedulers keep per-run state), from the family's registry."""
        return make_scheduler(self.schedulers, name, self.pipe.scheduler.config)

    def set_timesteps(
        self, scheduler: SchedulerMixin, steps: int, height: int, width: int, device: torch.device | None = None
    ) -> None:
        """Set a job's schedule as the family's pipeline sets it, on ``device`` (default: the model's)."""
        scheduler.set_timesteps(steps, device=device or self.device)

    def set_first_step(self, scheduler: SchedulerMixin) -> None:
        """Where a text job's schedule starts: found on the host as the scheduler itself would find it."""
        set_first_step_index(scheduler)

    def available_schedulers(self) -> tuple[str, ...]:
        """The registry's names this checkpoint can use: those whose schedule sets up the way the family's pipeline
        sets it (anything else would fail every request)."""
        names = []
        size = self.native_size
        for name in self.schedulers:
            try:
                self.set_timesteps(self.make_scheduler(name), 4, size, size, torch.device("cpu"))
            except Exception as exc:  # any failure means the pipeline could not use it either
                logger.debug("scheduler %s does not suit this checkpoint: %s", name, exc)
                continue
            names.append(name)
        return tuple(names)

    def kept_steps(self, params: GenerationParams) -> int:
        """The steps an image job runs, as diffusers' ``get_timesteps`` counts them."""
        return kept_steps(params.num_inference_steps, params.strength, self.strength_rounded_from_start)

    # ---- the rows -------------------------------------------------------------------------------------

    def shape_key(self, params: GenerationParams) -> Hashable:
        """Jobs with equal keys can share one denoiser call: the same latent shape (and whatever else the family's
        rows must share). The runner adds LoRA grouping to it for the engine's batch key."""
        return (params.height, params.width)

    def encode_prompts(self, jobs: list[Job]) -> list[Encoded]:
        """Each job's (conditional, unconditional) rows, the second None when the job runs unguided. Encode all
        jobs' prompts in as few calls as possible, and set ``job.prompt_truncated``."""
        raise NotImplementedError

    def initial_latents(self, job: Job, scheduler: SchedulerMixin, generator: torch.Generator) -> torch.Tensor:
        """The job's starting noise: the same draw diffusers' pipeline makes with the same generator."""
        raise NotImplementedError

    def model_input(self, work: Any, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's sample for a job's row at timestep ``t``."""
        return work.scheduler.scale_model_input(work.latents, t)

    def timestep_row(self, t: torch.Tensor) -> torch.Tensor:
        """A job's timestep as its denoiser row takes it (the UNet embeds timesteps as float32)."""
        return t.to(torch.float32).reshape(1)

    def guidance_scale(self, params: GenerationParams) -> float:
        """The scale that mixes a job's unconditional and conditional rows."""
        return params.guidance_scale

    def mix_guidance(self, uncond: torch.Tensor, text: torch.Tensor, params: GenerationParams) -> torch.Tensor:
        """A guided job's noise prediction from its two rows."""
        return uncond + self.guidance_scale(params) * (text - uncond)

    # ---- image jobs ----------------------------------------------------------------------------------

    @property
    def blends_inpainting(self) -> bool:
        """Whether this model inpaints by putting the noised picture back outside the mask after every step (any
        denoiser without mask channels)."""
        return True

    def encode_images(self, jobs: list[Job]) -> dict[Job, Any]:
        """img2img and inpainting jobs' encoded inputs, in as few VAE calls as possible."""
        if jobs:
            raise GenerationFailed(f"the {self.loaded.family.name} family takes no input image")
        return {}

    def image_latents(
        self, job: Job, scheduler: SchedulerMixin, timesteps: torch.Tensor, generator: torch.Generator, encoded: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """An image job's starting latents and the per-job state its steps need."""
        raise GenerationFailed(f"the {self.loaded.family.name} family takes no input image")

    def renoise(
        self, scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        """A picture's latents noised to ``timestep``."""
        return scheduler.add_noise(latents, noise, timestep)

    # ---- the decode ------------------------------------------------------------------------------------

    def final_latents(self, jobs: list[Job]) -> torch.Tensor:
        """Finished jobs' latents as the VAE takes them (FLUX unpacks its 2x2 patches here)."""
        return torch.cat([job.work.latents for job in jobs])

    def latents_for_vae(self, latents: torch.Tensor, dtype: torch.dtype, jobs: list[Job] | None = None) -> torch.Tensor:
        """Latents as the VAE decoder takes them, in ``dtype``."""
        return latents.to(dtype) / self.vae.config.scaling_factor

    def flag_unsafe(self, images: torch.Tensor, dtype: torch.dtype) -> list[bool] | None:
        """The safety checker's verdict per image; None when there is none."""
        return None

    # ---- --compile ---------------------------------------------------------------------------------------

    def native_row_shape(self) -> tuple[int, ...]:
        """One row's sample shape (no batch dimension) at the native size: what compiled graphs are made for."""
        raise NotImplementedError

    def example_inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """(sample, timesteps, conditioning) of ``rows`` rows at the native size, to compile with before serving."""
        raise NotImplementedError

    @classmethod
    def component_overrides(
        cls, index: dict[str, Any], source: str, local: bool, revision: str | None
    ) -> dict[str, Any]:
        """Components passed to ``from_pretrained`` in place of what it would load: None for one a checkpoint may
        leave out, or the component loaded otherwise."""
        return {}


def check_registries(registries: list[SchedulerRegistry]) -> None:
    """Every scheduler name a request may give is in some family's registry, and no registry has another."""
    names = set().union(*(set(registry) for registry in registries))
    if names != set(SCHEDULER_NAMES):
        raise LoadError(f"scheduler registries {sorted(names)} differ from the request's {sorted(SCHEDULER_NAMES)}")
