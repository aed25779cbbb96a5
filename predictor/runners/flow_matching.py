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
from predictor.runners.base import DenoiseWork
from predictor.runners.latent import LatentRunner, posteriors
from predictor.schemas import GenerationParams


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
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=self.pipe.vae_scale_factor * self.image_size_factor,
            vae_latent_channels=self.pipe.vae.config.latent_channels,
        )

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the transformer takes them (FLUX packs 2x2 patches)."""
        return latents

    # ---- img2img: diffusers' FluxImg2ImgPipeline and StableDiffusion3Img2ImgPipeline -----------------------

    def encode_images(self, jobs: list[Job]) -> dict[Job, Any]:
        """Each job's input through the VAE encoder, one call per output size; sampled per job in image_latents."""
        encoded: dict[Job, Any] = {}
        by_size: dict[tuple[int, int], list[Job]] = {}
        for job in jobs:
            by_size.setdefault((job.params.height, job.params.width), []).append(job)
        for (height, width), group in by_size.items():
            pixels = torch.cat(
                [self.image_processor.preprocess(job.params.image, height=height, width=width) for job in group]
            )
            batch = pixels.to(torch.float32).to(device=self.device, dtype=self.latent_dtype)
            for job, posterior in zip(group, posteriors(self.vae, batch.to(self.vae.dtype)), strict=True):
                encoded[job] = posterior
        return encoded

    def image_latents(
        self, job: Job, scheduler: SchedulerMixin, timesteps: torch.Tensor, generator: torch.Generator, encoded: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mean, std = encoded
        draw = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        vae = self.vae.config
        init = (mean + std * draw - vae.shift_factor) * vae.scaling_factor
        noise = randn_tensor(init.shape, generator=generator, device=self.device, dtype=self.latent_dtype)
        latents = scheduler.scale_noise(init, timesteps[:1], noise).to(self.latent_dtype)
        return self.pack(latents), {}

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
