"""What the flow-matching transformer families (FLUX, SD3) share: schedulers from the flow-matching registry,
schedules set as the family's pipeline sets them (pipeline.set_timesteps), no ``scale_model_input`` (their
pipelines call none), and an adapter that lets the engine call a transformer as it calls a UNet."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from predictor.config import EngineConfig
from predictor.jobs import Job
from predictor.pipeline import LoadedPipeline, make_scheduler
from predictor.request import GenerationParams
from predictor.runners.base import DenoiseWork
from predictor.runners.latent import LatentRunner, posteriors


class TransformerCall(torch.nn.Module):
    """A transformer called as ``(sample, timesteps, **conditioning)``: ``call`` maps that onto the model's own
    keywords. A module, so torch.compile traces the mapping with the model."""

    def __init__(self, transformer: torch.nn.Module, call: Callable[..., Any]) -> None:
        super().__init__()
        self.transformer = transformer
        self._call = call

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, return_dict: bool = False, **inputs: Any) -> Any:
        return self._call(self.transformer, sample, timesteps, **inputs)


class FlowMatchingRunner(LatentRunner):
    # By reading FlowMatchEulerDiscreteScheduler.step: it indexes its sigmas with a host integer and never reads a
    # value back (bench/gpu_check.py measures it on a GPU).
    host_free_schedulers = frozenset({"euler"})
    image_size_factor = 1  # the image processor's multiple of the VAE factor (FLUX: 2, its packed patches)

    def __init__(self, loaded: LoadedPipeline, config: EngineConfig) -> None:
        super().__init__(loaded, config)
        # The processor FluxImg2ImgPipeline and StableDiffusion3Img2ImgPipeline make.
        scale, channels = self.pipe.vae_scale_factor * self.image_size_factor, self.pipe.vae.config.latent_channels
        self.image_processor = VaeImageProcessor(vae_scale_factor=scale, vae_latent_channels=channels)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=scale,
            vae_latent_channels=channels,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the transformer takes them (FLUX packs 2x2 patches)."""
        return latents

    # ---- img2img and inpainting: diffusers' Flux/StableDiffusion3 Img2Img and Inpaint pipelines ----------------

    # FluxInpaintPipeline noises the picture even at strength 1; SD3's starts from pure noise there.
    inpaint_noises_at_full_strength = False

    def encode_images(self, jobs: list[Job]) -> dict[Job, Any]:
        """Each job's input through the VAE encoder, one pass per output size; sampled per job in image_latents, in
        its pipeline's order. The masked input's latents are never read by these transformers (no mask channels),
        so it is not encoded: only its draw is made."""
        encoded: dict[Job, Any] = {}
        for (height, width), group in self.by_output_size(jobs).items():
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

    def _sample(self, posterior: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        mean, std = posterior
        draw = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        vae = self.vae.config
        return (mean + std * draw - vae.shift_factor) * vae.scaling_factor

    def image_latents(
        self, job: Job, scheduler: SchedulerMixin, timesteps: torch.Tensor, generator: torch.Generator, encoded: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p, dtype = job.params, self.latent_dtype
        init = self._sample(encoded["image"], generator).to(dtype).contiguous()
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

    def pack_mask(self, mask: torch.Tensor, channels: int) -> torch.Tensor:
        """The latent-size mask as the latents are laid out (FLUX packs it with the latents' channels)."""
        return mask

    def renoise(
        self, scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        return scheduler.scale_noise(latents, timestep, noise)

    def batch_key(self, params: GenerationParams) -> Hashable:
        return (params.height, params.width)

    def make_scheduler(self, name: str) -> SchedulerMixin:
        return make_scheduler(name, self.pipe.scheduler.config, flow_matching=True)

    def model_input(self, work: DenoiseWork, t: torch.Tensor) -> torch.Tensor:
        return work.latents

    def set_first_step(self, scheduler: SchedulerMixin) -> None:
        # FLUX's pipeline starts at index 0 (set_begin_index(0)). A lookup would start at 1 when a strong shift
        # makes the first integer timesteps equal (FLUX.1-dev at 2048 px and 40+ steps with dpmpp_2m), and the
        # job would fail at its last step; SD3's pipeline fails there itself, and from 0 the job completes.
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
