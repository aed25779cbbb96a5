"""FLUX.1 (schnell, dev and fine-tunes): a CLIP text encoder's pooled output and a T5 encoder's sequence condition
a transformer over latents packed in 2x2 patches, with flow matching.

The specification it matches row for row is diffusers' ``FluxPipeline.__call__``:

- ``prompt`` goes through CLIP (its pooled output), ``prompt_2`` (default: ``prompt``) through T5, padded to
  ``--max_sequence_length`` tokens;
- latents are drawn unpacked with the request's CPU generator, then packed; each row carries the position ids of
  its resolution (``img_ids``) and the text ids (all zeros), which only rows of one size share a call with;
- each job's schedule is its pipeline's: sigmas ``linspace(1, 1/n, n)`` shifted by ``mu`` from the image's token
  count on checkpoints with dynamic shifting (dev); the transformer takes ``t / 1000``;
- guidance-distilled checkpoints (dev) take ``guidance_scale`` as an input, one value per row; schnell takes none;
- ``true_cfg_scale`` above 1 with a negative prompt adds a row conditioned on the negative prompt, mixed as
  ``negative + true_cfg_scale * (positive - negative)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux import pipeline_flux
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from predictor import builtin
from predictor.families.base import (
    Builtin,
    Encoded,
    Family,
    ServedPipeline,
    truncated,
    two_negative_prompts,
    two_prompts,
    with_negatives,
)
from predictor.families.flow import PackedFlowModel, resolution_shift
from predictor.jobs import Job
from predictor.request import GenerationParams

T5_TOKENS = 512  # FluxPipeline's default max_sequence_length


def _call_flux(transformer: Any, sample: torch.Tensor, timesteps: torch.Tensor, **inputs: Any) -> Any:
    # Rows of one call share a size, so their ids are equal: each row carries them, the call takes the first's.
    return transformer(
        hidden_states=sample,
        timestep=timesteps / 1000,
        guidance=inputs.get("guidance"),
        pooled_projections=inputs["pooled_projections"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        txt_ids=inputs["txt_ids"][0],
        img_ids=inputs["img_ids"][0],
        return_dict=False,
    )


class FluxModel(PackedFlowModel):
    inpaint_noises_at_full_strength = True
    family_fields = frozenset({"true_cfg_scale"})
    call_transformer = staticmethod(_call_flux)

    @property
    def latent_dtype(self) -> torch.dtype:
        return self.pipe.text_encoder_2.dtype

    @property
    def _guidance_embedded(self) -> bool:
        return bool(self.pipe.transformer.config.guidance_embeds)

    def guidance_kind(self) -> str:
        # FLUX.1-dev takes the scale as an input of the transformer; FLUX.1-schnell takes none at all.
        return "embedded" if self._guidance_embedded else "none"

    def prompt_windows(self) -> dict[str, int]:
        return {"prompt": self.pipe.tokenizer.model_max_length, "prompt_2": self.max_text_tokens}

    def set_timesteps(
        self, scheduler: SchedulerMixin, steps: int, height: int, width: int, device: torch.device | None = None
    ) -> None:
        """FluxPipeline's schedule: its own sigmas and a shift ``mu`` from the image's token count."""
        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        tokens = (height // (self.pipe.vae_scale_factor * 2)) * (width // (self.pipe.vae_scale_factor * 2))
        mu = resolution_shift(config, tokens)
        pipeline_flux.retrieve_timesteps(scheduler, steps, device or self.device, sigmas=sigmas, mu=mu)

    def guidance_scale(self, params: GenerationParams) -> float:
        return params.true_cfg_scale

    def _image_ids(self, height: int, width: int, rows: int = 1) -> torch.Tensor:
        h, w = self._latent_size(height) // 2, self._latent_size(width) // 2
        ids = self.pipe._prepare_latent_image_ids(1, h, w, self.device, self.latent_dtype)
        return ids.unsqueeze(0).expand(rows, -1, -1)

    def _text_ids(self, rows: int = 1) -> torch.Tensor:
        return torch.zeros(rows, self.max_text_tokens, 3, device=self.device, dtype=self.pipe.text_encoder.dtype)

    def native_row_shape(self) -> tuple[int, ...]:
        size = self._latent_size(self.native_size) // 2
        return (size * size, self.pipe.transformer.config.in_channels)

    def _encode_texts(self, clip_texts: list[str], t5_texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 sequences, CLIP pooled), each encoder in one call over all texts."""
        pipe = self.pipe
        ids = pipe.tokenizer(
            clip_texts, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        pooled = pipe.text_encoder(ids.to(self.device), output_hidden_states=False).pooler_output
        ids_2 = pipe.tokenizer_2(
            t5_texts, padding="max_length", max_length=self.max_text_tokens, truncation=True, return_tensors="pt"
        ).input_ids
        sequences = pipe.text_encoder_2(ids_2.to(self.device), output_hidden_states=False)[0]
        return sequences.to(pipe.text_encoder_2.dtype), pooled.to(pipe.text_encoder.dtype)

    def encode_prompts(self, jobs: list[Job]) -> list[Encoded]:
        pipe = self.pipe
        # diffusers' rule: guidance against a negative prompt only with true_cfg_scale > 1 and a negative prompt.
        guided = [job for job in jobs if job.params.true_cfg_scale > 1 and job.params.negative_prompt is not None]
        (clip_texts, t5_texts), negative_row = with_negatives(
            jobs,
            guided,
            two_prompts,
            two_negative_prompts,
        )
        sequences, pooled = self._encode_texts(clip_texts, t5_texts)
        rows: list[Encoded] = []
        for index, job in enumerate(jobs):
            p = job.params
            job.prompt_truncated = truncated(pipe.tokenizer, p.prompt) or truncated(
                pipe.tokenizer_2, p.prompt_2 or p.prompt, self.max_text_tokens
            )
            shared: dict[str, Any] = {"img_ids": self._image_ids(p.height, p.width), "txt_ids": self._text_ids()}
            if self._guidance_embedded:
                shared["guidance"] = torch.full([1], p.guidance_scale, device=self.device, dtype=torch.float32)
            cond = {
                "encoder_hidden_states": sequences[index : index + 1],
                "pooled_projections": pooled[index : index + 1],
            }
            uncond = None
            other = negative_row.get(id(job))
            if other is not None:
                uncond = {
                    "encoder_hidden_states": sequences[other : other + 1],
                    "pooled_projections": pooled[other : other + 1],
                    **shared,
                }
            rows.append(({**cond, **shared}, uncond))
        return rows

    def initial_latents(self, job: Job, scheduler: SchedulerMixin, generator: torch.Generator) -> torch.Tensor:
        p = job.params
        channels = self.pipe.transformer.config.in_channels // 4
        height, width = self._latent_size(p.height), self._latent_size(p.width)
        latents = randn_tensor(
            (1, channels, height, width), generator=generator, device=self.device, dtype=self.latent_dtype
        )
        return self.pipe._pack_latents(latents, 1, channels, height, width)

    def final_latents(self, jobs: list[Job]) -> torch.Tensor:
        p = jobs[0].params  # one decode holds one batch group: one size
        packed = torch.cat([job.work.latents for job in jobs])
        return self.pipe._unpack_latents(packed, p.height, p.width, self.pipe.vae_scale_factor)

    def example_inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        config, size = self.pipe.transformer.config, self.native_size
        zeros = {"device": self.device, "dtype": self.latent_dtype}
        sample = torch.zeros((rows, *self.native_row_shape()), **zeros)
        timesteps = torch.full((rows,), 500.0, **zeros)
        inputs: dict[str, Any] = {
            "encoder_hidden_states": torch.zeros((rows, self.max_text_tokens, config.joint_attention_dim), **zeros),
            "pooled_projections": torch.zeros((rows, config.pooled_projection_dim), **zeros),
            "img_ids": self._image_ids(size, size, rows).contiguous(),
            "txt_ids": self._text_ids(rows),
        }
        if self._guidance_embedded:
            inputs["guidance"] = torch.full((rows,), 3.5, device=self.device, dtype=torch.float32)
        return sample, timesteps, inputs


FAMILY = Family(
    name="flux",
    model=FluxModel,
    pipelines=(
        ServedPipeline(pipeline_class=FluxPipeline, description="FLUX.1 (schnell and dev)", default_guidance_scale=3.5),
    ),
    cuda_dtype=torch.bfloat16,  # FLUX's activations overflow float16
    long_text_tokens=T5_TOKENS,
    builtins={
        "tiny-flux": Builtin(FluxPipeline, builtin.build_tiny_flux),
        "tiny-flux-dev": Builtin(FluxPipeline, builtin.build_tiny_flux_dev),
        "flux-arch": Builtin(FluxPipeline, builtin.build_flux_arch, full_size=True),
        "flux-schnell-arch": Builtin(FluxPipeline, builtin.build_flux_schnell_arch, full_size=True),
    },
)
