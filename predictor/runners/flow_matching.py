"""What the flow-matching transformer families (FLUX, SD3) share: schedulers from the flow-matching registry,
schedules set as the family's pipeline sets them (pipeline.set_timesteps), no ``scale_model_input`` (their
pipelines call none), and an adapter that lets the engine call a transformer as it calls a UNet."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
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
        """Each job's input (and, to inpaint, its masked input) through the VAE encoder, one pass per output size;
        sampled per job in image_latents, in its pipeline's order."""
        encoded: dict[Job, Any] = {}
        by_size: dict[tuple[int, int], list[Job]] = {}
        for job in jobs:
            by_size.setdefault((job.params.height, job.params.width), []).append(job)
        for (height, width), group in by_size.items():
            pixels, owners = [], []
            for job in group:
                p = job.params
                image = self.image_processor.preprocess(p.image, height=height, width=width).to(torch.float32)
                encoded[job] = {}
                pixels.append(image)
                owners.append((job, "image"))
                if p.mask is not None:
                    mask = self.mask_processor.preprocess(p.mask, height=height, width=width)
                    encoded[job]["mask"] = mask
                    pixels.append(image * (mask < 0.5))
                    owners.append((job, "masked"))
            batch = torch.cat(pixels).to(device=self.device, dtype=self.latent_dtype).to(self.vae.dtype)
            for (job, name), posterior in zip(owners, posteriors(self.vae, batch), strict=True):
                encoded[job][name] = posterior
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
            return self.pack(scheduler.scale_noise(init, timesteps[:1], noise).to(dtype)), {}
        if p.strength == 1.0 and not self.inpaint_noises_at_full_strength:
            latents = noise
        else:
            latents = scheduler.scale_noise(init, timesteps[:1], noise)
        mask = torch.nn.functional.interpolate(encoded["mask"], size=init.shape[-2:]).to(self.device, dtype)
        self._sample(encoded["masked"], generator)  # unused by these transformers; its draw moves the generator on
        inputs = {
            "mask": self.pack_mask(mask, init.shape[1]),
            "image_latents": self.pack(init),
            "noise": self.pack(noise),
        }
        return self.pack(latents.to(dtype)), inputs

    def pack_mask(self, mask: torch.Tensor, channels: int) -> torch.Tensor:
        """The latent-size mask as the latents are laid out (FLUX packs it with the latents' channels)."""
        return mask

    def advance(self, job: Job, noise: torch.Tensor) -> None:
        super().advance(job, noise)
        work: DenoiseWork = job.work
        if "image_latents" not in work.inputs:
            return
        # Inpainting: the picture, noised to the next step, goes back outside the mask after every step.
        kept = work.inputs["image_latents"]
        step = job.steps_done - 1
        if step < len(work.timesteps) - 1:
            # The pipelines pass torch.tensor([timesteps[i + 1]]); after a step scale_noise reads its step index,
            # not the value, so the device slice does the same without a copy to the host.
            kept = work.scheduler.scale_noise(kept, work.timesteps[step + 1 : step + 2], work.inputs["noise"])
        mask = work.inputs["mask"]
        work.latents = (1 - mask) * kept + mask * work.latents

    def leaves_host_free(self, params: Iterable[GenerationParams]) -> bool:
        # Inpainting's scale_noise copies the scheduler's host sigmas to the device every step.
        listed = list(params)
        return not any(p.mode == "inpaint" for p in listed) and super().leaves_host_free(listed)

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
