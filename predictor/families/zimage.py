"""Z-Image and Z-Image-Turbo (Tongyi-MAI): a Qwen3 text encoder's second-to-last hidden states, each prompt at its
own length, condition a single-stream transformer over latents in 2x2 patches, with flow matching.

The specification it matches row for row is diffusers' ``ZImagePipeline.__call__``:

- each prompt goes through the tokenizer's chat template (``enable_thinking=True``), is padded to
  ``max_sequence_length`` (512) tokens and encoded; the transformer takes the hidden states of the prompt's own
  tokens only, so rows of different prompt lengths share a call (it takes lists);
- latents ``(16, 2 * (h // 16), 2 * (w // 16))`` in float32, drawn with the request's CPU generator; the
  transformer takes them in its dtype, one frame each, with the timestep ``(1000 - t) / 1000``, and its output,
  negated, is the flow prediction the scheduler steps with;
- each job's schedule is its pipeline's: sigmas ``linspace(1, 1/n, n)`` shifted by ``mu`` from the image's token
  count, from index 0;
- a guidance scale above 0 adds a row conditioned on the negative prompt (``""`` by default), mixed as
  ``positive + scale * (positive - negative)``; Z-Image-Turbo runs at 0, without that row;
- img2img and inpainting are ``ZImageImg2ImgPipeline``'s and ``ZImageInpaintPipeline``'s, computed as the other
  flow-matching families compute theirs (``FlowMatchingModel``): the picture's latents noised by ``scale_noise``
  from ``int(n - n * strength)``, and inpainting's blend outside the mask after each step.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ZImagePipeline
from diffusers.pipelines.z_image import pipeline_z_image
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from predictor import builtin
from predictor.families.base import Builtin, Encoded, Family, ServedPipeline, with_negatives
from predictor.families.flow import FlowMatchingModel, resolution_shift
from predictor.jobs import Job
from predictor.request import GenerationParams

TEXT_TOKENS = 512  # ZImagePipeline's default max_sequence_length


def _call_zimage(transformer: Any, sample: torch.Tensor, timesteps: torch.Tensor, **inputs: Any) -> Any:
    """The pipeline's call: lists of one-frame latents and of caption features; the output stacked in float32 and
    negated, so that the runner's guidance mix and the scheduler see what the pipeline's do."""
    frames = list(sample.to(transformer.dtype).unsqueeze(2).unbind(dim=0))
    out = transformer(frames, (1000 - timesteps) / 1000, inputs["cap_feats"], return_dict=False)[0]
    return (-torch.stack([row.float() for row in out], dim=0).squeeze(2),)


class ZImageModel(FlowMatchingModel):
    image_size_factor = 2  # the image processor works in multiples of 16: the VAE's 8 and the 2x2 patches
    inpaint_noises_at_full_strength = True  # ZImageInpaintPipeline noises the picture even at strength 1
    compile_by_region = True  # each prompt at its own length: a graph of fixed shapes would recompile for each

    call_transformer = staticmethod(_call_zimage)

    @property
    def latent_dtype(self) -> torch.dtype:
        return torch.float32  # the pipeline keeps its latents in float32 whatever the transformer's dtype

    def prompt_windows(self) -> dict[str, int]:
        return {"prompt": self.max_text_tokens}

    def set_timesteps(
        self, scheduler: SchedulerMixin, steps: int, height: int, width: int, device: torch.device | None = None
    ) -> None:
        """ZImagePipeline's schedule: its own sigmas (a list, which the multistep solvers' flow sigmas cannot take,
        so they are not offered: the pipeline fails with them too) and a shift ``mu`` from the image's token count."""
        config = scheduler.config
        sigmas = pipeline_z_image.get_default_z_image_sigmas(steps)
        patch = self.pipe.vae_scale_factor * 2
        tokens = (height // patch) * (width // patch)
        mu = resolution_shift(config, tokens)
        pipeline_z_image.retrieve_timesteps(scheduler, steps, device or self.device, sigmas=sigmas, mu=mu)

    def guidance_scale(self, params: GenerationParams) -> float:
        # The runner mixes negative + s * (positive - negative); the pipeline positive + g * (positive - negative).
        return params.guidance_scale + 1.0

    def timestep_row(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1)  # the call maps it to (1000 - t) / 1000, in float32 as the pipeline does

    def _latent_size(self, pixels: int) -> int:
        return 2 * (pixels // (self.pipe.vae_scale_factor * 2))

    def native_row_shape(self) -> tuple[int, ...]:
        size = self._latent_size(self.native_size)
        return (self.pipe.transformer.config.in_channels, size, size)

    def _templated(self, text: str) -> str:
        messages = [{"role": "user", "content": text}]
        return self.pipe.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
        )

    def _encode_texts(self, texts: list[str]) -> tuple[list[torch.Tensor], list[bool]]:
        """Each text's caption features (its own tokens' hidden states), in one encoder call; and whether each was
        cut at the token window."""
        pipe = self.pipe
        templated = [self._templated(text) for text in texts]
        tokens = pipe.tokenizer(
            templated, padding="max_length", max_length=self.max_text_tokens, truncation=True, return_tensors="pt"
        )
        masks = tokens.attention_mask.to(self.device).bool()
        hidden = pipe.text_encoder(
            input_ids=tokens.input_ids.to(self.device), attention_mask=masks, output_hidden_states=True
        ).hidden_states[-2]
        lengths = [len(ids) for ids in pipe.tokenizer(templated).input_ids]
        return [hidden[i][masks[i]] for i in range(len(texts))], [n > self.max_text_tokens for n in lengths]

    def encode_prompts(self, jobs: list[Job]) -> list[Encoded]:
        # diffusers' rule: guidance (and its negative row, "" by default) for any scale above 0.
        guided = [job for job in jobs if job.params.guidance_scale > 0]
        (texts,), negative_row = with_negatives(
            jobs, guided, lambda p: (p.prompt,), lambda p: (p.negative_prompt or "",)
        )
        features, cut = self._encode_texts(texts)
        rows: list[Encoded] = []
        for index, job in enumerate(jobs):
            job.prompt_truncated = cut[index]
            other = negative_row.get(id(job))
            uncond = None if other is None else {"cap_feats": [features[other]]}
            rows.append(({"cap_feats": [features[index]]}, uncond))
        return rows

    def initial_latents(self, job: Job, scheduler: SchedulerMixin, generator: torch.Generator) -> torch.Tensor:
        p = job.params
        shape = (1, self.pipe.transformer.config.in_channels, self._latent_size(p.height), self._latent_size(p.width))
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def final_latents(self, jobs: list[Job]) -> torch.Tensor:
        return torch.cat([job.work.latents for job in jobs])

    def example_inputs(self, rows: int, ragged: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Captions of the full window, or (``ragged``) each row's 40 tokens shorter than the last, so the
        transformer pads them to different lengths and masks them, as prompts of different lengths make it do."""
        config = self.pipe.transformer.config
        sample = torch.zeros((rows, *self.native_row_shape()), device=self.device, dtype=torch.float32)
        timesteps = torch.full((rows,), 500.0, device=self.device, dtype=torch.float32)
        lengths = [max(self.max_text_tokens - 40 * row * ragged, 1) for row in range(rows)]
        features = [torch.zeros((n, config.cap_feat_dim), device=self.device, dtype=self.pipe.dtype) for n in lengths]
        return sample, timesteps, {"cap_feats": features}


FAMILY = Family(
    name="zimage",
    model=ZImageModel,
    pipelines=(
        ServedPipeline(
            pipeline_class=ZImagePipeline,
            description="Z-Image and Z-Image-Turbo (Turbo: --default_guidance_scale 0 --default_steps 9)",
            default_guidance_scale=5.0,
        ),
    ),
    cuda_dtype=torch.bfloat16,
    long_text_tokens=TEXT_TOKENS,
    builtins={
        "tiny-zimage": Builtin(ZImagePipeline, builtin.build_tiny_zimage),
        "zimage-arch": Builtin(ZImagePipeline, builtin.build_zimage_arch, full_size=True),
    },
)
