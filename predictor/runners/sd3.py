"""Stable Diffusion 3 and 3.5: two CLIP encoders with projections and a T5 encoder condition an MMDiT
transformer, with flow matching.

The specification it matches row for row is diffusers' ``StableDiffusion3Pipeline.__call__``:

- ``prompt``, ``prompt_2`` and ``prompt_3`` (each defaulting to ``prompt``) go through CLIP-L, CLIP-G and T5;
  the CLIP penultimate hidden states side by side, zero-padded to T5's width, come before T5's sequence, and the
  two CLIP projections side by side are the pooled embedding;
- a checkpoint without T5 (``text_encoder_3`` null or its folder left out) gets zeros in its place;
- an absent negative prompt is ``""``, encoded like any other (no zeroing as in SDXL);
- classifier-free guidance above 1 over an unconditional and a conditional row; the schedule is the
  checkpoint's own shift (``mu`` only for schedulers with dynamic shifting).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from predictor.jobs import Job
from predictor.runners.base import Conditioning
from predictor.runners.flow_matching import FlowMatchingRunner, TransformerCall
from predictor.runners.stable_diffusion import truncated


def _call_sd3(transformer: Any, sample: torch.Tensor, timesteps: torch.Tensor, **inputs: Any) -> Any:
    return transformer(
        hidden_states=sample,
        timestep=timesteps,
        encoder_hidden_states=inputs["encoder_hidden_states"],
        pooled_projections=inputs["pooled_projections"],
        return_dict=False,
    )


class StableDiffusion3Runner(FlowMatchingRunner):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._call = TransformerCall(self.pipe.transformer, _call_sd3)
        self._max_tokens = int(self.loaded.max_sequence_length or 256)

    @property
    def denoiser_module(self) -> torch.nn.Module:
        return self._call

    @property
    def latent_dtype(self) -> torch.dtype:
        return self.pipe.text_encoder.dtype

    def native_row_shape(self) -> tuple[int, ...]:
        size = self.loaded.native_size // self.pipe.vae_scale_factor
        return (self.pipe.transformer.config.in_channels, size, size)

    def _clip(self, index: int, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pipe = self.pipe
        tokenizer, encoder = ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))[index]
        ids = tokenizer(
            texts, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        output = encoder(ids.to(self.device), output_hidden_states=True)
        return output.hidden_states[-2].to(pipe.text_encoder.dtype), output[0]

    def _t5(self, texts: list[str]) -> torch.Tensor:
        pipe = self.pipe
        if pipe.text_encoder_3 is None:
            shape = (len(texts), self._max_tokens, pipe.transformer.config.joint_attention_dim)
            return torch.zeros(shape, device=self.device, dtype=pipe.text_encoder.dtype)
        ids = pipe.tokenizer_3(
            texts, padding="max_length", max_length=self._max_tokens, truncation=True, return_tensors="pt"
        ).input_ids
        return pipe.text_encoder_3(ids.to(self.device))[0].to(pipe.text_encoder_3.dtype)

    def encode(self, jobs: list[Job]) -> list[tuple[Conditioning, Conditioning | None]]:
        pipe = self.pipe
        guided = [job for job in jobs if job.params.uses_guidance]
        firsts = [job.params.prompt for job in jobs]
        seconds = [job.params.prompt_2 or job.params.prompt for job in jobs]
        thirds = [job.params.prompt_3 or job.params.prompt for job in jobs]
        for job in guided:
            negative = job.params.negative_prompt or ""
            firsts.append(negative)
            seconds.append(job.params.negative_prompt_2 or negative)
            thirds.append(job.params.negative_prompt_3 or negative)
        hidden_1, pooled_1 = self._clip(0, firsts)
        hidden_2, pooled_2 = self._clip(1, seconds)
        t5 = self._t5(thirds)
        clip = torch.cat([hidden_1, hidden_2], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        sequences = torch.cat([clip, t5], dim=-2)
        pooled = torch.cat([pooled_1, pooled_2], dim=-1)
        negative_row = {id(job): len(jobs) + index for index, job in enumerate(guided)}
        rows: list[tuple[Conditioning, Conditioning | None]] = []
        for index, job in enumerate(jobs):
            p = job.params
            job.prompt_truncated = (
                truncated(pipe.tokenizer, p.prompt)
                or truncated(pipe.tokenizer_2, p.prompt_2 or p.prompt)
                or (
                    pipe.text_encoder_3 is not None
                    and truncated(pipe.tokenizer_3, p.prompt_3 or p.prompt, self._max_tokens)
                )
            )
            cond = {
                "encoder_hidden_states": sequences[index : index + 1],
                "pooled_projections": pooled[index : index + 1],
            }
            other = negative_row.get(id(job))
            uncond = None
            if other is not None:
                uncond = {
                    "encoder_hidden_states": sequences[other : other + 1],
                    "pooled_projections": pooled[other : other + 1],
                }
            rows.append((cond, uncond))
        return rows

    def _scaled_for_vae(self, latents: torch.Tensor, dtype: torch.dtype, jobs: list[Job] | None = None) -> torch.Tensor:
        """StableDiffusion3InpaintPipeline decodes ``latents / scaling_factor`` without adding the VAE's shift (its
        text and img2img pipelines add it): inpainting rows get no shift, each row as its own pipeline decodes."""
        vae = self.vae.config
        scaled = latents.to(dtype) / vae.scaling_factor
        if not jobs or not any(job.params.mode == "inpaint" for job in jobs):
            return scaled + vae.shift_factor
        shifts = [0.0 if job.params.mode == "inpaint" else vae.shift_factor for job in jobs]
        return scaled + torch.tensor(shifts, dtype=dtype).view(-1, 1, 1, 1).to(scaled.device, non_blocking=True)

    def initial_latents(self, job: Job, scheduler: SchedulerMixin, generator: torch.Generator) -> torch.Tensor:
        p, scale = job.params, self.pipe.vae_scale_factor
        shape = (1, self.pipe.transformer.config.in_channels, p.height // scale, p.width // scale)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.latent_dtype)

    def example_inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        config = self.pipe.transformer.config
        zeros = {"device": self.device, "dtype": self.latent_dtype}
        sample = torch.zeros((rows, *self.native_row_shape()), **zeros)
        timesteps = torch.full((rows,), 500.0, device=self.device)
        tokens = self.pipe.tokenizer_max_length + self._max_tokens
        inputs = {
            "encoder_hidden_states": torch.zeros((rows, tokens, config.joint_attention_dim), **zeros),
            "pooled_projections": torch.zeros((rows, config.pooled_projection_dim), **zeros),
        }
        return sample, timesteps, inputs
