"""Stable Diffusion 1.x and 2.x: a CLIP text encoder, a UNet over 4-channel latents, a VAE, an optional safety
checker. SD 2.x differs only in what its checkpoint says: an OpenCLIP encoder, a 768 native size and, for the
768 models, ``prediction_type: v_prediction``, which each job's scheduler takes from the checkpoint's config.

The specification it matches row for row is diffusers' ``StableDiffusionPipeline.__call__``: prompts encoded
by ``encode_prompt``, latents drawn by ``randn_tensor`` with the request's CPU generator and scaled by the
scheduler's ``init_noise_sigma``, classifier-free guidance over an unconditional and a conditional row, and for
LCM-distilled UNets (``time_cond_proj_dim``) the guidance scale as an embedding instead of guidance rows.

``UNetRunner`` holds what every UNet family shares (SDXL's runner builds on it); ``LatentRunner`` (latent.py)
what every family shares: the denoiser and decoder calls, the float32 VAE fallback, and ``--compile``.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from predictor.config import EngineConfig
from predictor.jobs import Job
from predictor.pipeline import LoadedPipeline, make_scheduler
from predictor.request import GenerationParams
from predictor.runners.base import Conditioning, DenoiseWork
from predictor.runners.latent import LatentRunner, posteriors

logger = logging.getLogger(__name__)


def truncated(tokenizer: Any, text: str, max_tokens: int | None = None) -> bool:
    """Whether ``text`` is longer than the tokenizer's window (77 tokens for CLIP, ``max_tokens`` when given: the
    T5 window a pipeline sets), so the encoder sees only part."""
    max_tokens = max_tokens or tokenizer.model_max_length
    return len(tokenizer(text, truncation=True, max_length=max_tokens + 1).input_ids) > max_tokens


class UNetRunner(LatentRunner):
    """What the UNet families share: latents drawn as diffusers draws them, LCM's guidance embedding, the UNet's
    compile inputs. A subclass says how prompts become each row's conditioning."""

    host_free_schedulers = frozenset({"dpmpp_2m", "dpmpp_2m_karras", "euler", "lms"})

    @property
    def denoiser_module(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def latent_dtype(self) -> torch.dtype:
        return self.pipe.text_encoder.dtype

    def native_row_shape(self) -> tuple[int, ...]:
        size = self.loaded.native_size // self.pipe.vae_scale_factor
        return (self.pipe.unet.config.in_channels, size, size)

    def example_conditioning(self, rows: int) -> dict[str, Any]:
        """Conditioning of the right shapes for ``rows`` rows, to compile and record graphs with before serving."""
        pipe = self.pipe
        hidden = pipe.unet.config.cross_attention_dim
        tokens = (pipe.tokenizer or pipe.tokenizer_2).model_max_length
        shape = (rows, tokens, hidden)
        example = {"encoder_hidden_states": torch.zeros(shape, device=self.device, dtype=self.latent_dtype)}
        return self._with_guidance_embedding(example, [0.0] * rows)

    def example_inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        sample = torch.zeros((rows, *self.native_row_shape()), device=self.device, dtype=self.latent_dtype)
        timesteps = torch.full((rows,), 500.0, device=self.device)
        return sample, timesteps, self.example_conditioning(rows)

    def guided(self, params: GenerationParams) -> bool:
        """Whether a job runs classifier-free guidance rows: LCM-distilled UNets take the scale as an embedding."""
        return params.uses_guidance and self.pipe.unet.config.time_cond_proj_dim is None

    def _with_guidance_embedding(self, cond: dict[str, Any], scales: list[float]) -> dict[str, Any]:
        """An LCM-distilled UNet's ``timestep_cond``: the guidance scale embedded, as diffusers' pipelines do."""
        dim = self.pipe.unet.config.time_cond_proj_dim
        if dim is None:
            return cond
        scale = torch.tensor([s - 1 for s in scales])
        embedding = self.pipe.get_guidance_scale_embedding(scale, embedding_dim=dim)
        return {**cond, "timestep_cond": embedding.to(device=self.device, dtype=self.latent_dtype)}

    def _scaled_for_vae(self, latents: torch.Tensor, dtype: torch.dtype, jobs: list[Job] | None = None) -> torch.Tensor:
        return latents.to(dtype) / self.vae.config.scaling_factor

    # ---- the runner hooks ------------------------------------------------------------------------

    def batch_key(self, params: GenerationParams) -> Hashable:
        return (params.height, params.width)

    def make_scheduler(self, name: str) -> SchedulerMixin:
        return make_scheduler(name, self.pipe.scheduler.config)  # the registry: pipeline.SCHEDULERS

    def initial_latents(self, job: Job, scheduler: SchedulerMixin, generator: torch.Generator) -> torch.Tensor:
        p, scale = job.params, self.pipe.vae_scale_factor
        shape = (1, self.pipe.unet.config.in_channels, p.height // scale, p.width // scale)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.latent_dtype)
        return latents * scheduler.init_noise_sigma

    # ---- img2img and inpainting: diffusers' StableDiffusion(XL)Img2ImgPipeline, StableDiffusionInpaintPipeline ----

    def __init__(self, loaded: LoadedPipeline, config: EngineConfig) -> None:
        super().__init__(loaded, config)
        # The processors diffusers' img2img and inpainting pipelines make (a text-to-image pipeline has no mask one).
        scale = self.pipe.vae_scale_factor
        self.image_processor = VaeImageProcessor(vae_scale_factor=scale)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=scale, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    @property
    def _inpainting_unet(self) -> bool:
        """A UNet with mask and masked-image channels (9 in): an inpainting checkpoint."""
        return self.pipe.unet.config.in_channels != self.pipe.vae.config.latent_channels

    def encode_images(self, jobs: list[Job]) -> dict[Job, Any]:
        """Each image job's preprocessed input, mask and VAE posteriors: one encoder call per output size over
        every image (and masked image) that needs one. The posteriors are sampled per job in ``image_latents``,
        each with its own generator, in the order its pipeline samples them."""
        dtype = self.latent_dtype
        encoded: dict[Job, Any] = {}
        for (height, width), group in self.by_output_size(jobs).items():
            pixels, owners = [], []
            for job in group:
                p = job.params
                image = self.image_processor.preprocess(p.image, height=height, width=width).to(torch.float32)
                entry: dict[str, Any] = {}
                if p.mask is not None:
                    mask = self.mask_processor.preprocess(p.mask, height=height, width=width)
                    entry["mask"] = mask
                    if self._inpainting_unet:  # a 4-channel UNet only needs the masked image's draw, not its latents
                        pixels.append(image * (mask < 0.5))
                        owners.append((job, "masked_posterior"))
                if p.mask is None or not self._inpainting_unet or p.strength < 1.0:
                    pixels.append(image)
                    owners.append((job, "image_posterior"))
                encoded[job] = entry
            if pixels:
                encoder = self.encoder_vae
                batch = torch.cat(pixels).to(device=self.device, dtype=dtype).to(encoder.dtype)
                for (job, name), posterior in zip(owners, posteriors(encoder, batch), strict=True):
                    encoded[job][name] = posterior
        return encoded

    @property
    def encoder_vae(self) -> Any:
        """The VAE that encodes input pictures (SDXL's encodes in float32 when its config says force_upcast)."""
        return self.vae

    def _sample(
        self, posterior: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator, inpainting: bool = False
    ) -> torch.Tensor:
        """diffusers' ``latent_dist.sample(generator)`` for one row, in latent space (times the scaling factor)."""
        mean, std = posterior
        draw = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.vae.config.scaling_factor * (mean + std * draw)

    def image_latents(
        self, job: Job, scheduler: SchedulerMixin, timesteps: torch.Tensor, generator: torch.Generator, encoded: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p, dtype = job.params, self.latent_dtype
        first = timesteps[:1]
        if p.mask is None:  # img2img: the image's latents noised to where the kept schedule starts
            init = self._sample(encoded["image_posterior"], generator).to(dtype)
            noise = randn_tensor(init.shape, generator=generator, device=self.device, dtype=dtype)
            return self.renoise(scheduler, init, noise, first), {}
        # Inpainting, in the order StableDiffusionInpaintPipeline draws: the image's latents (when needed), the
        # noise, then the masked image's latents.
        scale = self.pipe.vae_scale_factor
        shape = (1, self.pipe.vae.config.latent_channels, p.height // scale, p.width // scale)
        from_noise = p.strength == 1.0
        image_latents = None
        if "image_posterior" in encoded:
            # Contiguous, as diffusers' repeat() leaves them: the UNet's kernels follow the memory layout.
            image_latents = self._sample(encoded["image_posterior"], generator, True).to(dtype).contiguous()
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        latents = noise * scheduler.init_noise_sigma
        if not from_noise:
            latents = self.renoise(scheduler, image_latents, noise, first)
        mask = torch.nn.functional.interpolate(encoded["mask"], size=shape[-2:]).to(device=self.device, dtype=dtype)
        if self._inpainting_unet:
            masked = self._sample(encoded["masked_posterior"], generator, True).to(dtype)
            return latents, {"mask": mask, "masked_image_latents": masked}
        # A 4-channel UNet: the masked image's latents go unused, but their draw (in the encoder's dtype, as the
        # pipeline samples them) moves the generator on.
        randn_tensor(shape, generator=generator, device=self.device, dtype=self.encoder_vae.dtype)
        return latents, {"mask": mask, "image_latents": image_latents, "noise": noise}

    @property
    def blends_inpainting(self) -> bool:
        return not self._inpainting_unet

    def model_input(self, work: DenoiseWork, t: torch.Tensor) -> torch.Tensor:
        x = super().model_input(work, t)
        if "masked_image_latents" in work.inputs:  # an inpainting UNet reads the mask and masked image too
            return torch.cat([x, work.inputs["mask"], work.inputs["masked_image_latents"]], dim=1)
        return x


class StableDiffusionRunner(UNetRunner):
    """SD 1.x and 2.x: one CLIP text encoder, whose last hidden state conditions the UNet."""

    def encode(self, jobs: list[Job]) -> list[tuple[Conditioning, Conditioning | None]]:
        pipe = self.pipe
        guided = [job for job in jobs if self.guided(job.params)]
        # An absent negative prompt is "" to SD's pipeline.
        texts = [job.params.prompt for job in jobs] + [job.params.negative_prompt or "" for job in guided]
        embeds, _ = pipe.encode_prompt(texts, self.device, 1, False)
        uncond_row = {id(job): len(jobs) + index for index, job in enumerate(guided)}
        rows: list[tuple[Conditioning, Conditioning | None]] = []
        for index, job in enumerate(jobs):
            job.prompt_truncated = truncated(pipe.tokenizer, job.params.prompt)
            cond = {"encoder_hidden_states": embeds[index : index + 1]}
            cond = self._with_guidance_embedding(cond, [job.params.guidance_scale])
            other = uncond_row.get(id(job))
            uncond = None if other is None else {"encoder_hidden_states": embeds[other : other + 1]}
            rows.append((cond, uncond))
        return rows

    @property
    def has_safety_checker(self) -> bool:
        return self.pipe.safety_checker is not None

    def flag_unsafe(self, images: torch.Tensor, dtype: torch.dtype) -> list[bool] | None:
        _, nsfw = self.pipe.run_safety_checker(images, self.device, dtype)
        return None if nsfw is None else [bool(flag) for flag in nsfw]
