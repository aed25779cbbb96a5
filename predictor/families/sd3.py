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

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from predictor import builtin
from predictor.families.base import Builtin, Encoded, Family, Loaded, ServedPipeline, truncated, with_negatives
from predictor.families.flow import FlowMatchingModel, resolution_shift
from predictor.jobs import Job

logger = logging.getLogger(__name__)

T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length


def _call_sd3(transformer: Any, sample: torch.Tensor, timesteps: torch.Tensor, **inputs: Any) -> Any:
    return transformer(
        hidden_states=sample,
        timestep=timesteps,
        encoder_hidden_states=inputs["encoder_hidden_states"],
        pooled_projections=inputs["pooled_projections"],
        return_dict=False,
    )


class StableDiffusion3Model(FlowMatchingModel):
    family_fields = frozenset({"prompt_3", "negative_prompt_3"})

    call_transformer = staticmethod(_call_sd3)

    def __init__(self, loaded: Loaded) -> None:
        super().__init__(loaded)
        if self.pipe.text_encoder_3 is None:
            logger.info("%s has no T5 encoder (text_encoder_3): prompts condition it through CLIP only", loaded.source)

    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size

    @property
    def max_image_size(self) -> int | None:
        """SD3's position embedding ends at ``pos_embed_max_size`` patches a side."""
        pos_embed = getattr(self.denoiser.config, "pos_embed_max_size", None)
        return int(pos_embed) * self.size_multiple if pos_embed else None

    def prompt_windows(self) -> dict[str, int]:
        windows = {"prompt": self.pipe.tokenizer.model_max_length, "prompt_2": self.pipe.tokenizer_2.model_max_length}
        if self.pipe.text_encoder_3 is not None:
            windows["prompt_3"] = self.max_text_tokens
        return windows

    def taken_fields(self, windows: dict[str, int]) -> frozenset[str]:
        return self.family_fields if "prompt_3" in windows else frozenset()

    @classmethod
    def component_overrides(
        cls, index: dict[str, Any], source: str, local: bool, revision: str | None
    ) -> dict[str, Any]:
        """The T5 encoder when model_index.json has it null or the directory lacks its folder (left out to save
        9.5 GB): diffusers runs without it when it is passed as None; any other missing component stays an error."""
        if not local:
            return {}
        listed = index.get("text_encoder_3")
        named = isinstance(listed, list | tuple) and bool(listed) and listed[0] is not None
        if named and (Path(source) / "text_encoder_3" / "config.json").is_file():
            return {}
        logger.info("'%s' has no text_encoder_3: loading SD3 without its T5 encoder", source)
        return {"text_encoder_3": None, "tokenizer_3": None}

    def set_timesteps(
        self, scheduler: SchedulerMixin, steps: int, height: int, width: int, device: torch.device | None = None
    ) -> None:
        """StableDiffusion3Pipeline's schedule: the checkpoint's shift, ``mu`` only with dynamic shifting."""
        config, pipe = scheduler.config, self.pipe
        kwargs = {}
        if config.get("use_dynamic_shifting", None):
            patch = pipe.transformer.config.patch_size
            tokens = (height // pipe.vae_scale_factor // patch) * (width // pipe.vae_scale_factor // patch)
            kwargs["mu"] = resolution_shift(config, tokens, default_max_shift=1.16)
        pipeline_stable_diffusion_3.retrieve_timesteps(scheduler, steps, device or self.device, sigmas=None, **kwargs)

    def native_row_shape(self) -> tuple[int, ...]:
        size = self.native_size // self.pipe.vae_scale_factor
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
            shape = (len(texts), self.max_text_tokens, pipe.transformer.config.joint_attention_dim)
            return torch.zeros(shape, device=self.device, dtype=pipe.text_encoder.dtype)
        ids = pipe.tokenizer_3(
            texts, padding="max_length", max_length=self.max_text_tokens, truncation=True, return_tensors="pt"
        ).input_ids
        return pipe.text_encoder_3(ids.to(self.device))[0].to(pipe.text_encoder_3.dtype)

    def encode_prompts(self, jobs: list[Job]) -> list[Encoded]:
        pipe = self.pipe
        guided = [job for job in jobs if job.params.uses_guidance]
        (firsts, seconds, thirds), negative_row = with_negatives(
            jobs,
            guided,
            lambda p: (p.prompt, p.prompt_2 or p.prompt, p.prompt_3 or p.prompt),
            lambda p: (
                p.negative_prompt or "",
                p.negative_prompt_2 or p.negative_prompt or "",
                p.negative_prompt_3 or p.negative_prompt or "",
            ),
        )
        hidden_1, pooled_1 = self._clip(0, firsts)
        hidden_2, pooled_2 = self._clip(1, seconds)
        t5 = self._t5(thirds)
        clip = torch.cat([hidden_1, hidden_2], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        sequences = torch.cat([clip, t5], dim=-2)
        pooled = torch.cat([pooled_1, pooled_2], dim=-1)
        rows: list[Encoded] = []
        for index, job in enumerate(jobs):
            p = job.params
            job.prompt_truncated = (
                truncated(pipe.tokenizer, p.prompt)
                or truncated(pipe.tokenizer_2, p.prompt_2 or p.prompt)
                or (
                    pipe.text_encoder_3 is not None
                    and truncated(pipe.tokenizer_3, p.prompt_3 or p.prompt, self.max_text_tokens)
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

    def latents_for_vae(self, latents: torch.Tensor, dtype: torch.dtype, jobs: list[Job] | None = None) -> torch.Tensor:
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
        tokens = self.pipe.tokenizer_max_length + self.max_text_tokens
        inputs = {
            "encoder_hidden_states": torch.zeros((rows, tokens, config.joint_attention_dim), **zeros),
            "pooled_projections": torch.zeros((rows, config.pooled_projection_dim), **zeros),
        }
        return sample, timesteps, inputs


FAMILY = Family(
    name="sd3",
    model=StableDiffusion3Model,
    pipelines=(
        ServedPipeline(
            pipeline_class=StableDiffusion3Pipeline,
            description="Stable Diffusion 3 and 3.5 (medium, large, large-turbo)",
            default_guidance_scale=7.0,
        ),
    ),
    cuda_dtype=torch.bfloat16,  # trained and shipped in bfloat16
    long_text_tokens=T5_TOKENS,
    builtins={
        "tiny-sd3": Builtin(StableDiffusion3Pipeline, builtin.build_tiny_sd3),
        "sd35-arch": Builtin(StableDiffusion3Pipeline, builtin.build_sd35_arch, full_size=True),
        "sd35-medium-arch": Builtin(StableDiffusion3Pipeline, builtin.build_sd35_medium_arch, full_size=True),
    },
)
