"""Stable Diffusion 1.x and 2.x (inpainting checkpoints and Latent Consistency Models included), and what every
UNet family shares (``UNetModel``, which SDXL builds on).

SD 2.x differs only in what its checkpoint says: an OpenCLIP encoder, a 768 native size and, for the 768 models,
``prediction_type: v_prediction``, which each job's scheduler takes from the checkpoint's config.

The specification it matches row for row is diffusers' ``StableDiffusionPipeline.__call__``: prompts encoded by
``encode_prompt``, latents drawn by ``randn_tensor`` with the request's CPU generator and scaled by the scheduler's
``init_noise_sigma``, classifier-free guidance over an unconditional and a conditional row, and for LCM-distilled
UNets (``time_cond_proj_dim``) the guidance scale as an embedding instead of guidance rows. Image jobs follow
``StableDiffusionImg2ImgPipeline`` and ``StableDiffusionInpaintPipeline``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from predictor import builtin
from predictor.families.base import (
    Builtin,
    Encoded,
    Family,
    FamilyModel,
    Loaded,
    SchedulerRegistry,
    ServedPipeline,
    by_output_size,
    posteriors,
    truncated,
    vae_posterior_sample,
    with_negatives,
)
from predictor.jobs import Job
from predictor.request import GenerationParams

# The UNet families' schedulers: name -> (class, overrides on top of the checkpoint's own scheduler config).
UNET_SCHEDULERS: SchedulerRegistry = {
    "dpmpp_2m": (DPMSolverMultistepScheduler, lambda config: {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        lambda config: {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "euler": (EulerDiscreteScheduler, lambda config: {}),
    "euler_a": (EulerAncestralDiscreteScheduler, lambda config: {}),
    "ddim": (DDIMScheduler, lambda config: {}),
    "pndm": (PNDMScheduler, lambda config: {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, lambda config: {}),
    "unipc": (UniPCMultistepScheduler, lambda config: {}),
    "lcm": (LCMScheduler, lambda config: {}),  # for LCM-distilled checkpoints
}


class UNetModel(FamilyModel):
    """What the UNet families share: latents drawn as diffusers draws them, LCM's guidance embedding, inpainting
    UNets (mask channels), image jobs, the UNet's compile inputs."""

    schedulers = UNET_SCHEDULERS
    # Measured on an H200 with the GPU suite: these steps make no host synchronisation.
    host_free_schedulers = frozenset({"dpmpp_2m", "dpmpp_2m_karras", "euler", "lms"})

    def __init__(self, loaded: Loaded) -> None:
        super().__init__(loaded)
        # The processors diffusers' img2img and inpainting pipelines make (a text-to-image pipeline has no mask one).
        scale = self.pipe.vae_scale_factor
        self.image_processor = VaeImageProcessor(vae_scale_factor=scale)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=scale, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    @property
    def inpainting_unet(self) -> bool:
        """A UNet with mask and masked-image channels (9 in): an inpainting checkpoint, which inpaints only."""
        return self.pipe.unet.config.in_channels != self.pipe.vae.config.latent_channels

    def prepare_for_cuda(self) -> None:
        super().prepare_for_cuda()
        self.pipe.unet.to(memory_format=torch.channels_last)  # SDPA is diffusers' default; this helps convolutions

    def modes(self) -> frozenset[str]:
        return frozenset({"inpaint"}) if self.inpainting_unet else super().modes()

    def guided(self, params: GenerationParams) -> bool:
        """Whether a job runs classifier-free guidance rows: LCM-distilled UNets take the scale as an embedding."""
        return params.uses_guidance and self.pipe.unet.config.time_cond_proj_dim is None

    def with_guidance_embedding(self, cond: dict[str, Any], scales: list[float]) -> dict[str, Any]:
        """An LCM-distilled UNet's ``timestep_cond``: the guidance scale embedded, as diffusers' pipelines do."""
        dim = self.pipe.unet.config.time_cond_proj_dim
        if dim is None:
            return cond
        scale = torch.tensor([s - 1 for s in scales])
        embedding = self.pipe.get_guidance_scale_embedding(scale, embedding_dim=dim)
        return {**cond, "timestep_cond": embedding.to(device=self.device, dtype=self.latent_dtype)}

    def initial_latents(self, job: Job, scheduler: SchedulerMixin, generator: torch.Generator) -> torch.Tensor:
        p, scale = job.params, self.pipe.vae_scale_factor
        shape = (1, self.pipe.unet.config.in_channels, p.height // scale, p.width // scale)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.latent_dtype)
        return latents * scheduler.init_noise_sigma

    def model_input(self, work: Any, t: torch.Tensor) -> torch.Tensor:
        x = work.scheduler.scale_model_input(work.latents, t)
        if "masked_image_latents" in work.inputs:  # an inpainting UNet reads the mask and masked image too
            return torch.cat([x, work.inputs["mask"], work.inputs["masked_image_latents"]], dim=1)
        return x

    # ---- image jobs: diffusers' StableDiffusion(XL)Img2ImgPipeline and StableDiffusion(XL)InpaintPipeline -----

    @property
    def encoder_vae(self) -> Any:
        """The VAE that encodes input pictures (SDXL's encodes in float32 when its config says force_upcast)."""
        return self.vae

    def image_latents_from(
        self, posterior: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator, *, inpainting: bool
    ) -> torch.Tensor:
        """An input picture's latents as the family's image pipeline samples them (times the scaling factor)."""
        return self.vae.config.scaling_factor * vae_posterior_sample(posterior, generator)

    @property
    def blends_inpainting(self) -> bool:
        return not self.inpainting_unet

    def encode_images(self, jobs: list[Job]) -> dict[Job, Any]:
        """Each image job's preprocessed input, mask and VAE posteriors: one encoder call per output size over
        every image (and masked image) that needs one. The posteriors are sampled per job in ``image_latents``,
        each with its own generator, in the order its pipeline samples them."""
        dtype = self.latent_dtype
        encoded: dict[Job, Any] = {}
        for (height, width), group in by_output_size(jobs).items():
            pixels, owners = [], []
            for job in group:
                p = job.params
                image = self.image_processor.preprocess(p.image, height=height, width=width).to(torch.float32)
                entry: dict[str, Any] = {}
                if p.mask is not None:
                    mask = self.mask_processor.preprocess(p.mask, height=height, width=width)
                    entry["mask"] = mask
                    if self.inpainting_unet:  # a 4-channel UNet only needs the masked image's draw, not its latents
                        pixels.append(image * (mask < 0.5))
                        owners.append((job, "masked_posterior"))
                if p.mask is None or not self.inpainting_unet or p.strength < 1.0:
                    pixels.append(image)
                    owners.append((job, "image_posterior"))
                encoded[job] = entry
            if pixels:
                encoder = self.encoder_vae
                batch = torch.cat(pixels).to(device=self.device, dtype=dtype).to(encoder.dtype)
                for (job, name), posterior in zip(owners, posteriors(encoder, batch), strict=True):
                    encoded[job][name] = posterior
        return encoded

    def image_latents(
        self, job: Job, scheduler: SchedulerMixin, timesteps: torch.Tensor, generator: torch.Generator, encoded: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p, dtype = job.params, self.latent_dtype
        first = timesteps[:1]
        if p.mask is None:  # img2img: the image's latents noised to where the kept schedule starts
            init = self.image_latents_from(encoded["image_posterior"], generator, inpainting=False).to(dtype)
            noise = randn_tensor(init.shape, generator=generator, device=self.device, dtype=dtype)
            return self.renoise(scheduler, init, noise, first), {}
        # Inpainting, in the order StableDiffusionInpaintPipeline draws: the image's latents (when needed), the
        # noise, then the masked image's latents.
        scale = self.pipe.vae_scale_factor
        shape = (1, self.pipe.vae.config.latent_channels, p.height // scale, p.width // scale)
        image_latents = None
        if "image_posterior" in encoded:
            # Contiguous, as diffusers' repeat() leaves them: the UNet's kernels follow the memory layout.
            posterior = encoded["image_posterior"]
            image_latents = self.image_latents_from(posterior, generator, inpainting=True).to(dtype).contiguous()
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        latents = noise * scheduler.init_noise_sigma
        if p.strength != 1.0:
            latents = self.renoise(scheduler, image_latents, noise, first)
        mask = torch.nn.functional.interpolate(encoded["mask"], size=shape[-2:]).to(device=self.device, dtype=dtype)
        if self.inpainting_unet:
            masked = self.image_latents_from(encoded["masked_posterior"], generator, inpainting=True).to(dtype)
            return latents, {"mask": mask, "masked_image_latents": masked}
        # A 4-channel UNet: the masked image's latents go unused, but their draw (in the encoder's dtype, as the
        # pipeline samples them) moves the generator on.
        randn_tensor(shape, generator=generator, device=self.device, dtype=self.encoder_vae.dtype)
        return latents, {"mask": mask, "image_latents": image_latents, "noise": noise}

    # ---- --compile -----------------------------------------------------------------------------------

    def native_row_shape(self) -> tuple[int, ...]:
        size = self.native_size // self.pipe.vae_scale_factor
        return (self.pipe.unet.config.in_channels, size, size)

    def example_conditioning(self, rows: int) -> dict[str, Any]:
        """Conditioning of the right shapes for ``rows`` rows, to compile and record graphs with before serving."""
        pipe = self.pipe
        hidden = pipe.unet.config.cross_attention_dim
        tokens = (pipe.tokenizer or pipe.tokenizer_2).model_max_length
        example = {
            "encoder_hidden_states": torch.zeros((rows, tokens, hidden), device=self.device, dtype=self.latent_dtype)
        }
        return self.with_guidance_embedding(example, [0.0] * rows)

    def example_inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        sample = torch.zeros((rows, *self.native_row_shape()), device=self.device, dtype=self.latent_dtype)
        timesteps = torch.full((rows,), 500.0, device=self.device)
        return sample, timesteps, self.example_conditioning(rows)


class StableDiffusionModel(UNetModel):
    """SD 1.x and 2.x: one CLIP text encoder, whose last hidden state conditions the UNet."""

    def encode_prompts(self, jobs: list[Job]) -> list[Encoded]:
        guided = [job for job in jobs if self.guided(job.params)]
        # An absent negative prompt is "" to SD's pipeline.
        (texts,), negative_row = with_negatives(
            jobs, guided, lambda p: (p.prompt,), lambda p: (p.negative_prompt or "",)
        )
        embeds, _ = self.pipe.encode_prompt(texts, self.device, 1, False)
        rows: list[Encoded] = []
        for index, job in enumerate(jobs):
            job.prompt_truncated = truncated(self.pipe.tokenizer, job.params.prompt)
            cond = {"encoder_hidden_states": embeds[index : index + 1]}
            cond = self.with_guidance_embedding(cond, [job.params.guidance_scale])
            other = negative_row.get(id(job))
            uncond = None if other is None else {"encoder_hidden_states": embeds[other : other + 1]}
            rows.append((cond, uncond))
        return rows

    @property
    def has_safety_checker(self) -> bool:
        return self.pipe.safety_checker is not None

    def flag_unsafe(self, images: torch.Tensor, dtype: torch.dtype) -> list[bool] | None:
        _, nsfw = self.pipe.run_safety_checker(images, self.device, dtype)
        return None if nsfw is None else [bool(flag) for flag in nsfw]


FAMILY = Family(
    name="sd",
    model=StableDiffusionModel,
    pipelines=(
        ServedPipeline(
            pipeline_class=StableDiffusionPipeline,
            description="Stable Diffusion 1.x and 2.x (SD-Turbo included)",
            default_guidance_scale=7.5,
        ),
        # A UNet with mask and masked-image channels (9 in).
        ServedPipeline(
            pipeline_class=StableDiffusionInpaintPipeline,
            description="Stable Diffusion 1.x and 2.x inpainting checkpoints",
            default_guidance_scale=7.5,
        ),
        # An SD 1.x pipeline whose UNet embeds the guidance scale: SD's computation with the scale embedded.
        ServedPipeline(
            pipeline_class=LatentConsistencyModelPipeline,
            description="Latent Consistency Models distilled from SD 1.x",
            default_guidance_scale=8.5,
            takes_images=False,  # LCM's img2img pipeline is another computation
        ),
    ),
    builtins={
        "tiny": Builtin(StableDiffusionPipeline, builtin.build_tiny),
        "tiny-sd2": Builtin(StableDiffusionPipeline, builtin.build_tiny_sd2),
        "tiny-inpaint": Builtin(StableDiffusionInpaintPipeline, builtin.build_tiny_inpaint),
        "sd-v1-arch": Builtin(StableDiffusionPipeline, builtin.build_sd_v1_arch, full_size=True),
        "sd2-arch": Builtin(StableDiffusionPipeline, builtin.build_sd2_arch, full_size=True),
    },
)
