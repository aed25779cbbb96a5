"""Stable Diffusion 1.x and 2.x: a CLIP text encoder, a UNet over 4-channel latents, a VAE, an optional safety
checker. SD 2.x differs only in what its checkpoint says: an OpenCLIP encoder, a 768 native size and, for the
768 models, ``prediction_type: v_prediction``, which each job's scheduler takes from the checkpoint's config.

The specification it matches row for row is diffusers' ``StableDiffusionPipeline.__call__``: prompts encoded
by ``encode_prompt``, latents drawn by ``randn_tensor`` with the request's CPU generator and scaled by the
scheduler's ``init_noise_sigma``, classifier-free guidance over an unconditional and a conditional row, and for
LCM-distilled UNets (``time_cond_proj_dim``) the guidance scale as an embedding instead of guidance rows.

``UNetRunner`` holds what every UNet family shares (SDXL's runner builds on it): the denoiser and decoder calls,
the float32 VAE fallback, and ``--compile``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Hashable
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from predictor.config import EngineConfig
from predictor.jobs import Job
from predictor.pipeline import LoadedPipeline, make_scheduler
from predictor.runners.base import Conditioning, ModelRunner
from predictor.runners.compiled import (
    CompiledDecoder,
    CompiledDenoiser,
    compile_cache_counts,
    compile_phases,
)
from predictor.schemas import GenerationParams

logger = logging.getLogger(__name__)


def truncated(tokenizer: Any, text: str) -> bool:
    """Whether ``text`` is longer than the tokenizer's window (77 tokens for CLIP), so the encoder sees only part."""
    max_tokens = tokenizer.model_max_length
    return len(tokenizer(text, truncation=True, max_length=max_tokens + 1).input_ids) > max_tokens


class UNetRunner(ModelRunner):
    """What the UNet families share: latents drawn as diffusers draws them, the (compiled or eager) UNet and VAE
    decoder, the float32 VAE fallback. A subclass says how prompts become each row's conditioning."""

    host_free_schedulers = frozenset({"dpmpp_2m", "dpmpp_2m_karras", "euler", "lms"})

    def __init__(self, loaded: LoadedPipeline, config: EngineConfig) -> None:
        super().__init__(loaded, config)
        self._unet: Any = None  # a CompiledDenoiser once warmed up with --compile
        self._decoder: Any = None  # a CompiledDecoder once warmed up with --compile
        self._vae_float32: Any = None  # made on the first float16 overflow
        self.vae: Any = loaded.pipe.vae  # the VAE this runner decodes with (SDXL's may be a float32 copy)

    # ---- what a UNet family defines ------------------------------------------------------------

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype diffusers draws the latents in (its prompt embeddings' dtype)."""
        return self.pipe.text_encoder.dtype

    def example_conditioning(self, rows: int) -> dict[str, Any]:
        """Conditioning of the right shapes for ``rows`` rows, to compile and record graphs with before serving."""
        pipe = self.pipe
        hidden = pipe.unet.config.cross_attention_dim
        tokens = (pipe.tokenizer or pipe.tokenizer_2).model_max_length
        shape = (rows, tokens, hidden)
        example = {"encoder_hidden_states": torch.zeros(shape, device=self.device, dtype=self.latent_dtype)}
        return self._with_guidance_embedding(example, [0.0] * rows)

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

    def _scaled_for_vae(self, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Latents as the VAE decoder takes them, in ``dtype``."""
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

    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        if self._unet is not None and self._at_native_size(sample):
            return self._unet(sample, timesteps, **conditioning)
        return self.pipe.unet(sample, timesteps, **conditioning, return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        scaled = self._scaled_for_vae(latents, self.vae.dtype)
        if self._decoder is not None and self._at_native_size(latents):
            return self._decoder(scaled)
        return self.vae.decode(scaled, return_dict=False)[0]

    def decode_float32(self, latents: torch.Tensor) -> torch.Tensor:
        if self._vae_float32 is None:
            logger.warning("the float16 VAE overflowed; decoding such images in float32 from now on")
            self._vae_float32 = copy.deepcopy(self.vae).to(torch.float32)
        return self._vae_float32.decode(self._scaled_for_vae(latents, torch.float32), return_dict=False)[0]

    # ---- --compile ---------------------------------------------------------------------------------

    def _at_native_size(self, latents: torch.Tensor) -> bool:
        """Compiled graphs exist for the native resolution only; other sizes run eagerly rather than compile
        at request time (which would stall every request and, past dynamo's limit, fail)."""
        size = self.loaded.native_size // self.pipe.vae_scale_factor
        return tuple(latents.shape[-2:]) == (size, size)

    def warm_up(self) -> None:
        if self.config.compile:
            self._compile()

    def _compile(self) -> None:
        """torch.compile the UNet and the VAE decoder, then run them so no request compiles or records a graph."""
        pipe, device, config = self.pipe, self.device, self.config
        started = time.perf_counter()
        # CUDA graphs replay fixed shapes; they exist on CUDA only. Guided images take two rows each.
        cuda_graphs = device.type == "cuda" and (
            config.compile_mode == "reduce-overhead" or config.compile_backend == "cudagraphs"
        )
        unet = CompiledDenoiser(pipe.unet, config, max_rows=2 * config.max_batch_size, cuda_graphs=cuda_graphs)
        decoder = CompiledDecoder(self.vae.decode, config)
        size = self.loaded.native_size // pipe.vae_scale_factor
        channels = pipe.unet.config.in_channels

        def unet_inputs(rows: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
            sample = torch.zeros((rows, channels, size, size), device=device, dtype=self.latent_dtype)
            timesteps = torch.full((rows,), 500.0, device=device)
            return sample, timesteps, self.example_conditioning(rows)

        unet_compile_s, unet_sizes_s = unet.warm_up(unet_inputs, self._synchronize)
        decoder_started = time.perf_counter()
        vae = self.vae
        decoder(torch.zeros((1, vae.config.latent_channels, size, size), device=device, dtype=vae.dtype))
        self._synchronize()
        finished = time.perf_counter()
        self._unet, self._decoder = unet, decoder
        hits, misses = compile_cache_counts()
        logger.info(
            "compiled the UNet (%s) and the VAE decoder in %.1f s (%s, mode %s; compile cache: %d hits, %d misses): "
            "UNet %.1f s, %s %.1f s, VAE decoder %.1f s; %s",
            unet.describe(),
            finished - started,
            config.compile_backend,
            config.compile_mode,
            hits,
            misses,
            unet_compile_s,
            "recording CUDA graphs" if unet.cuda_graphs else "running every batch size",
            unet_sizes_s,
            finished - decoder_started,
            compile_phases(),
        )

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


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
