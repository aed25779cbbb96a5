"""Stable Diffusion XL (base 1.0, SDXL-Turbo and fine-tunes, inpainting checkpoints): two CLIP text encoders and
size conditioning.

The specification it matches row for row is diffusers' ``StableDiffusionXLPipeline.__call__``:

- each prompt goes through both encoders (``prompt_2`` through the second, defaulting to ``prompt``); the
  penultimate hidden states of both, side by side, condition the UNet's cross-attention, and the second
  encoder's projected output is the pooled ``text_embeds``;
- an absent negative prompt with ``force_zeros_for_empty_prompt`` is all zeros (embeddings and pooled); an
  explicit one, even ``""``, is encoded;
- ``time_ids`` are (original height, width, crop top, left, target height, width) = (h, w, 0, 0, h, w) per
  row, so images of different sizes have different added conditioning (and different latent shapes: they run
  in different batch groups);
- a float16 VAE with ``force_upcast`` (SDXL's own VAE overflows in float16) decodes in float32; the fp16-fixed
  VAE some checkpoints ship has ``force_upcast: false`` and stays in float16.

Image jobs follow ``StableDiffusionXLImg2ImgPipeline`` and ``StableDiffusionXLInpaintPipeline``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

from predictor import builtin
from predictor.errors import LoadError
from predictor.families.base import (
    Builtin,
    Encoded,
    Family,
    Loaded,
    ServedPipeline,
    truncated,
    two_negative_prompts,
    two_prompts,
    vae_posterior_sample,
    with_negatives,
)
from predictor.families.sd import UNetModel
from predictor.jobs import Job

logger = logging.getLogger(__name__)

TIME_IDS = 6  # original size (2), crop coordinates (2), target size (2)


def _per_channel(values: Any, latents: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values).view(1, latents.shape[1], 1, 1).to(latents.device, latents.dtype)


class StableDiffusionXLModel(UNetModel):
    # StableDiffusionXLImg2ImgPipeline's and StableDiffusionXLInpaintPipeline's defaults.
    default_strength = {"img2img": 0.3, "inpaint": 0.9999}

    def __init__(self, loaded: Loaded) -> None:
        super().__init__(loaded)
        pipe = self.pipe
        self._vae_encoder_float32: Any = None  # made on the first image job of a bfloat16 load
        if pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
            # diffusers upcasts the VAE around each decode and casts it back; a float32 copy does that once (84M
            # parameters: 0.3 GB) and leaves the pipeline object as loaded, for anyone else calling it.
            self.vae = copy.deepcopy(pipe.vae).to(torch.float32)
            logger.info("the VAE decodes in float32 (force_upcast: its float16 activations overflow)")

    def check(self) -> None:
        pipe = self.pipe
        if pipe.text_encoder_2 is None or not hasattr(pipe.text_encoder_2, "text_projection"):
            raise LoadError(
                "an SDXL text-to-image checkpoint needs text_encoder_2 with a projection (the pooled embedding)"
            )
        if pipe.config.get("requires_aesthetics_score"):
            raise LoadError(
                "this SDXL checkpoint is conditioned on an aesthetic score (requires_aesthetics_score, as the "
                "refiner is), which this server does not serve; base and inpainting checkpoints are served"
            )
        # diffusers' _get_add_time_ids makes the same check per call; a checkpoint that fails it fails every request.
        expected = pipe.unet.add_embedding.linear_1.in_features
        given = pipe.unet.config.addition_time_embed_dim * TIME_IDS + self._pooled_dim
        if expected != given:
            raise LoadError(
                f"the UNet's added embedding takes {expected} features, but the text encoder's projection and "
                f"{TIME_IDS} time ids make {given}: the checkpoint's configs disagree"
            )

    @property
    def _pooled_dim(self) -> int:
        return int(self.pipe.text_encoder_2.config.projection_dim)

    @property
    def latent_dtype(self) -> torch.dtype:
        return self.pipe.text_encoder_2.dtype

    def prompt_windows(self) -> dict[str, int]:
        return {"prompt": self.pipe.tokenizer.model_max_length, "prompt_2": self.pipe.tokenizer_2.model_max_length}

    def _encoders(self) -> list[tuple[Any, Any]]:
        pipe = self.pipe
        pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
        return [pair for pair in pairs if pair[0] is not None]

    def _encode_texts(self, firsts: list[str], seconds: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both encoders over their texts in one call each: (hidden states side by side, pooled)."""
        hidden: list[torch.Tensor] = []
        pooled = torch.empty(0)
        # With one encoder (no first tokenizer), diffusers feeds it the first prompt.
        for texts, (tokenizer, encoder) in zip((firsts, seconds), self._encoders(), strict=False):
            ids = tokenizer(
                texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            output = encoder(ids.to(self.device), output_hidden_states=True)
            if output[0].ndim == 2:  # the projection's output: the second encoder's, checked at load
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
        return torch.cat(hidden, dim=-1).to(self.latent_dtype), pooled

    def encode_prompts(self, jobs: list[Job]) -> list[Encoded]:
        guided = [job for job in jobs if self.guided(job.params)]
        zero_absent = bool(self.pipe.config.force_zeros_for_empty_prompt)
        encoded_negative = [job for job in guided if not (zero_absent and job.params.negative_prompt is None)]
        (firsts, seconds), negative_row = with_negatives(
            jobs,
            encoded_negative,
            two_prompts,
            two_negative_prompts,
        )
        embeds, pooled = self._encode_texts(firsts, seconds)
        rows: list[Encoded] = []
        for index, job in enumerate(jobs):
            p = job.params
            job.prompt_truncated = any(
                truncated(tokenizer, text)
                for text, (tokenizer, _) in zip((p.prompt, p.prompt_2 or p.prompt), self._encoders(), strict=False)
            )
            size = [p.height, p.width]
            time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=embeds.dtype, device=self.device)
            cond = self._row(embeds[index : index + 1], pooled[index : index + 1], time_ids)
            cond = self.with_guidance_embedding(cond, [p.guidance_scale])
            uncond = None
            if self.guided(p):
                other = negative_row.get(id(job))
                if other is None:  # absent, and the checkpoint zeroes absent negative prompts
                    uncond = self._row(
                        torch.zeros_like(cond["encoder_hidden_states"]), torch.zeros_like(pooled[:1]), time_ids
                    )
                else:
                    uncond = self._row(embeds[other : other + 1], pooled[other : other + 1], time_ids)
            rows.append((cond, uncond))
        return rows

    @staticmethod
    def _row(hidden: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> dict[str, Any]:
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def example_conditioning(self, rows: int) -> dict[str, Any]:
        example = super().example_conditioning(rows)
        zeros = {"device": self.device, "dtype": self.latent_dtype}
        example["added_cond_kwargs"] = {
            "text_embeds": torch.zeros((rows, self._pooled_dim), **zeros),
            "time_ids": torch.full((rows, TIME_IDS), float(self.native_size), **zeros),
        }
        return example

    @property
    def encoder_vae(self) -> Any:
        # StableDiffusionXLImg2ImgPipeline encodes in float32 whenever force_upcast is set, bfloat16 loads included
        # (the decode upcasts for float16 only).
        if not self.pipe.vae.config.force_upcast or self.vae.dtype == torch.float32:
            return self.vae
        if self._vae_encoder_float32 is None:
            self._vae_encoder_float32 = copy.deepcopy(self.pipe.vae).to(torch.float32)
        return self._vae_encoder_float32

    def image_latents_from(
        self, posterior: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator, *, inpainting: bool
    ) -> torch.Tensor:
        """StableDiffusionXLImg2ImgPipeline's image latents: sampled in the VAE's dtype (float32 when it upcasts),
        cast to the latents' dtype, then normalised (latents_mean and latents_std when the VAE has them; its
        inpainting pipeline only scales)."""
        latents = vae_posterior_sample(posterior, generator).to(self.latent_dtype)
        config = self.vae.config
        means, stds = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if inpainting or means is None or stds is None:
            return config.scaling_factor * latents
        return (latents - _per_channel(means, latents)) * config.scaling_factor / _per_channel(stds, latents)

    def latents_for_vae(self, latents: torch.Tensor, dtype: torch.dtype, jobs: list[Job] | None = None) -> torch.Tensor:
        config = self.vae.config
        latents = latents.to(dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return latents / config.scaling_factor
        # Checkpoints whose VAE latents are normalised (Playground v2.5's, for one).
        return latents * _per_channel(std, latents) / config.scaling_factor + _per_channel(mean, latents)


FAMILY = Family(
    name="sdxl",
    model=StableDiffusionXLModel,
    pipelines=(
        ServedPipeline(
            pipeline_class=StableDiffusionXLPipeline,
            description="Stable Diffusion XL (SDXL-Turbo included)",
            default_guidance_scale=5.0,
        ),
        ServedPipeline(
            pipeline_class=StableDiffusionXLInpaintPipeline,
            description="Stable Diffusion XL inpainting checkpoints",
            default_guidance_scale=7.5,
        ),
    ),
    builtins={
        "tiny-sdxl": Builtin(StableDiffusionXLPipeline, builtin.build_tiny_sdxl),
        "tiny-sdxl-inpaint": Builtin(StableDiffusionXLInpaintPipeline, builtin.build_tiny_sdxl_inpaint),
        "sdxl-arch": Builtin(StableDiffusionXLPipeline, builtin.build_sdxl_arch, full_size=True),
    },
)
