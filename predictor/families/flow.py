"""What the flow-matching transformer families share (FLUX.1, SD3, and the DiTs after them): the flow-matching
scheduler registry, no ``scale_model_input`` (their pipelines call none), img2img and inpainting by
``scale_noise``, ``TransformerCall``, which lets the runner call a transformer as it calls a UNet, and
``PackedFlowModel``, FLUX.1's 2x2 packed latents (Qwen-Image's too)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from predictor.families.base import (
    FamilyModel,
    Loaded,
    SchedulerRegistry,
    by_output_size,
    posteriors,
    vae_posterior_sample,
)
from predictor.jobs import Job


def _flow_sigmas(config: Any) -> dict[str, Any]:
    """A multistep solver on flow-matching sigmas, with the checkpoint's own shift (SD3.5's 3.0)."""
    shift = config.get("shift", config.get("flow_shift", 1.0))  # a checkpoint may ship a solver with flow_shift
    return {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": shift}


# The checkpoint's own Euler and the diffusers solvers that take flow sigmas. Which of them a checkpoint can use is
# found by setting each one's timesteps as its pipeline would (``FamilyModel.available_schedulers``): DPM-Solver,
# for one, takes FLUX's resolution shift only on checkpoints with dynamic shifting (FLUX.1-dev), and Heun takes no
# custom sigmas (FLUX).
FLOW_SCHEDULERS: SchedulerRegistry = {
    "euler": (FlowMatchEulerDiscreteScheduler, lambda config: {}),
    "heun": (FlowMatchHeunDiscreteScheduler, lambda config: {}),
    "dpmpp_2m": (
        DPMSolverMultistepScheduler,
        lambda config: {**_flow_sigmas(config), "algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "unipc": (UniPCMultistepScheduler, _flow_sigmas),
}


def resolution_shift(config: Any, tokens: int, default_max_shift: float = 1.15) -> float:
    """The ``mu`` a flow pipeline shifts its schedule by for an image of ``tokens`` latent tokens: diffusers'
    ``calculate_shift`` (each of FLUX's, SD3's and Z-Image's pipelines holds the same copy) over the scheduler
    config's fields, with the pipeline's defaults (SD3's ``max_shift`` is 1.16)."""
    return calculate_shift(
        tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", default_max_shift),
    )


class TransformerCall(torch.nn.Module):
    """A transformer called as ``(sample, timesteps, **conditioning)``: ``call`` maps that onto the model's own
    keywords. A module, so torch.compile traces the mapping with the model."""

    def __init__(self, transformer: torch.nn.Module, call: Callable[..., Any]) -> None:
        super().__init__()
        self.transformer = transformer
        self._call = call

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, return_dict: bool = False, **inputs: Any) -> Any:
        return self._call(self.transformer, sample, timesteps, **inputs)


class FlowMatchingModel(FamilyModel):
    schedulers = FLOW_SCHEDULERS
    default_scheduler = None  # the checkpoint's own
    # By reading FlowMatchEulerDiscreteScheduler.step: it indexes its sigmas with a host integer and never reads a
    # value back (the GPU suite measures it).
    host_free_schedulers = frozenset({"euler"})
    strength_rounded_from_start = True
    # FluxImg2ImgPipeline's and StableDiffusion3Img2ImgPipeline's defaults, and their inpainting pipelines'.
    default_strength = {"img2img": 0.6, "inpaint": 0.6}
    prediction_type = "flow_prediction"
    image_size_factor = 1  # the image processor's multiple of the VAE factor (FLUX: 2, its packed patches)
    # FluxInpaintPipeline noises the picture even at strength 1; SD3's starts from pure noise there.
    inpaint_noises_at_full_strength = False
    # How the family's pipeline calls its transformer, as (transformer, sample, timesteps, **conditioning): set with
    # staticmethod(...), and called through a TransformerCall, as the runner calls a UNet.
    call_transformer: ClassVar[Callable[..., Any]]
    # The size a pipeline without default_sample_size fixes (ZImagePipeline: 1024 px).
    default_native_size: ClassVar[int] = 1024

    def __init__(self, loaded: Loaded) -> None:
        super().__init__(loaded)
        self._call = TransformerCall(self.pipe.transformer, self.call_transformer)
        # The long text encoder's token window: --max_sequence_length, else the pipeline's default (the family's).
        self.max_text_tokens = int(loaded.max_sequence_length or loaded.family.long_text_tokens or 0)
        scale, channels = self.pipe.vae_scale_factor * self.image_size_factor, self.vae.config.latent_channels
        self.image_processor = VaeImageProcessor(vae_scale_factor=scale, vae_latent_channels=channels)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=scale,
            vae_latent_channels=channels,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def denoiser_module(self) -> torch.nn.Module:
        return self._call

    @property
    def native_size(self) -> int:
        # These pipelines fix their default size rather than reading the transformer's config (the tiny builtins set
        # a smaller one; saved to disk and loaded again, the pipeline's own is back).
        sample_size = getattr(self.pipe, "default_sample_size", None)
        return self.default_native_size if sample_size is None else int(sample_size) * self.pipe.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.image_size_factor  # FLUX's 2x2 patches: 16 px

    def image_schedulers(self, names: tuple[str, ...]) -> tuple[str, ...]:
        # The image's latents are noised by the scheduler's scale_noise, which only the flow Euler and Heun have.
        return tuple(name for name in names if hasattr(self.schedulers[name][0], "scale_noise"))

    def describe_schedule(self, config: Any) -> dict[str, Any]:
        return {"shift": config.get("shift", 1.0), "use_dynamic_shifting": config.get("use_dynamic_shifting", False)}

    def set_first_step(self, scheduler: SchedulerMixin) -> None:
        # FLUX's pipeline starts at index 0 (set_begin_index(0)). A lookup would start at 1 when a strong shift
        # makes the first integer timesteps equal (FLUX.1-dev at 2048 px and 40+ steps with dpmpp_2m), and the
        # job would fail at its last step; SD3's pipeline fails there itself, and from 0 the job completes.
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)

    def model_input(self, work: Any, t: torch.Tensor) -> torch.Tensor:
        return work.latents

    def renoise(
        self, scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        return scheduler.scale_noise(latents, timestep, noise)

    def latents_for_vae(self, latents: torch.Tensor, dtype: torch.dtype, jobs: list[Job] | None = None) -> torch.Tensor:
        config = self.vae.config
        return latents.to(dtype) / config.scaling_factor + config.shift_factor

    def latents_from_vae(self, sample: torch.Tensor) -> torch.Tensor:
        """A picture's VAE latents as the denoiser's (``latents_for_vae``'s inverse)."""
        config = self.vae.config
        return (sample - config.shift_factor) * config.scaling_factor

    # ---- image jobs: diffusers' Flux/StableDiffusion3 Img2Img and Inpaint pipelines ---------------------------

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the transformer takes them (FLUX packs 2x2 patches)."""
        return latents

    def pack_mask(self, mask: torch.Tensor, channels: int) -> torch.Tensor:
        """The latent-size mask as the latents are laid out (FLUX packs it with the latents' channels)."""
        return mask

    def encode_images(self, jobs: list[Job]) -> dict[Job, Any]:
        """Each job's input through the VAE encoder, one pass per output size; sampled per job in image_latents, in
        its pipeline's order. The masked input's latents are never read by these transformers (no mask channels),
        so it is not encoded: only its draw is made."""
        encoded: dict[Job, Any] = {}
        for (height, width), group in by_output_size(jobs).items():
            pixels = []
            for job in group:
                p = job.params
                pixels.append(self.image_processor.preprocess(p.image, height=height, width=width).to(torch.float32))
                encoded[job] = {}
                if p.mask is not None:
                    encoded[job]["mask"] = self.mask_processor.preprocess(p.mask, height=height, width=width)
            batch = torch.cat(pixels).to(device=self.device, dtype=self.latent_dtype).to(self.vae.dtype)
            for job, posterior in zip(group, posteriors(self.vae, batch), strict=True):
                encoded[job]["image"] = posterior
        return encoded

    def image_latents(
        self, job: Job, scheduler: SchedulerMixin, timesteps: torch.Tensor, generator: torch.Generator, encoded: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p, dtype = job.params, self.latent_dtype
        init = self.latents_from_vae(vae_posterior_sample(encoded["image"], generator)).to(dtype).contiguous()
        noise = randn_tensor(init.shape, generator=generator, device=self.device, dtype=dtype)
        if p.mask is None:  # img2img
            return self.pack(self.renoise(scheduler, init, noise, timesteps[:1]).to(dtype)), {}
        if p.strength == 1.0 and not self.inpaint_noises_at_full_strength:
            latents = noise
        else:
            latents = self.renoise(scheduler, init, noise, timesteps[:1])
        mask = torch.nn.functional.interpolate(encoded["mask"], size=init.shape[-2:]).to(self.device, dtype)
        # The masked input's latents go unused here; their draw (in the VAE's dtype, as the pipelines sample them)
        # moves the generator on.
        randn_tensor(init.shape, generator=generator, device=self.device, dtype=self.vae.dtype)
        inputs = {
            "mask": self.pack_mask(mask, init.shape[1]),
            "image_latents": self.pack(init),
            "noise": self.pack(noise),
        }
        return self.pack(latents.to(dtype)), inputs


class PackedFlowModel(FlowMatchingModel):
    """The FLUX.1 way of laying latents out, which Qwen-Image's pipelines copy: 2x2 patches packed into tokens
    (``pipe._pack_latents``), sizes in multiples of 16, the timestep in the latents' dtype."""

    image_size_factor = 2  # the image processor works in multiples of 16: the VAE's 8 and the 2x2 patches

    def timestep_row(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.latent_dtype).reshape(1)  # diffusers casts t to the latents' dtype, then divides

    def _latent_size(self, pixels: int) -> int:
        return 2 * (pixels // (self.pipe.vae_scale_factor * 2))

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        _, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, latents.shape[0], channels, height, width)

    def pack_mask(self, mask: torch.Tensor, channels: int) -> torch.Tensor:
        return self.pack(mask.repeat(1, channels, 1, 1))
