"""FLUX.2: klein (4B and 9B, distilled and base) and dev (32B). A text encoder's hidden states from three layers,
side by side, condition a transformer over latents patchified 2x2 and normalised by the VAE's batch-norm
statistics, with flow matching. Text to image, and edits by reference images (``image=[...]``).

The specification it matches row for row is diffusers' ``Flux2KleinPipeline.__call__`` and ``Flux2Pipeline.__call__``:

- klein: each prompt goes through the Qwen3 tokenizer's chat template (``enable_thinking=False``), padded to
  ``max_sequence_length`` (512) tokens; the caption is the encoder's hidden states of layers 9, 18 and 27, side by
  side, for every token (padding included), with 4-axis text position ids;
- dev: each prompt follows the pipeline's system message through the Mistral 3 processor's chat template, padded
  to 512 tokens; the caption is the hidden states of layers 10, 20 and 30 side by side;
- latents ``(4 * c, h / 16, w / 16)`` drawn with the request's CPU generator in the text encoder's dtype, packed to
  tokens, each with its 4-axis position id; rows of one size share a call (the transformer takes one row's ids);
- each job's schedule is its pipeline's: sigmas ``linspace(1, 1/n, n)`` shifted by the empirical ``mu`` of the
  image's token count and the step count, from index 0; the transformer takes ``t / 1000``;
- the distilled klein checkpoints take no guidance; the base ones guide above 1 against the negative prompt (``""``,
  the pipeline's only one), mixed as ``negative + scale * (positive - negative)``; dev is guidance-distilled: the
  scale is an input of the transformer, one value per row;
- the decode un-normalises with the VAE's batch-norm statistics and unpatchifies before the VAE;
- reference images are encoded (the posterior's mode: no draw from the generator), their tokens appended to the
  image's in every call with ids offset in time, and only the image's tokens kept from the output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2 import pipeline_flux2, pipeline_flux2_klein
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from predictor import builtin
from predictor.families.base import Builtin, Encoded, Family, ServedPipeline, with_negatives
from predictor.families.flow import FlowMatchingModel
from predictor.jobs import Job
from predictor.processors import PixtralTextProcessor
from predictor.request import GenerationParams

TEXT_TOKENS = 512  # both pipelines' default max_sequence_length
HIDDEN_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's default text_encoder_out_layers
DEV_HIDDEN_LAYERS = (10, 20, 30)  # Flux2Pipeline's


def _call_flux2(transformer: Any, sample: torch.Tensor, timesteps: torch.Tensor, **inputs: Any) -> Any:
    # Rows of one call share a size, a text length and their references' layout: the transformer takes the first
    # row's ids. Reference tokens follow the image's, and only the image's come out.
    hidden, ids = sample, inputs["img_ids"]
    if "reference_latents" in inputs:
        hidden = torch.cat([sample, inputs["reference_latents"]], dim=1)
        ids = torch.cat([ids, inputs["reference_ids"]], dim=1)
    out = transformer(
        hidden_states=hidden.to(transformer.dtype),
        timestep=timesteps / 1000,
        guidance=inputs.get("guidance"),  # dev's: one scale a row; klein's: none
        encoder_hidden_states=inputs["encoder_hidden_states"],
        txt_ids=inputs["txt_ids"],
        img_ids=ids,
        return_dict=False,
    )[0]
    return (out[:, : sample.shape[1]],)


class Flux2Model(FlowMatchingModel):
    image_size_factor = 2  # the image processor works in multiples of 16: the VAE's 8 and the 2x2 patches

    call_transformer = staticmethod(_call_flux2)

    @property
    def _dev(self) -> bool:
        return isinstance(self.pipe, Flux2Pipeline)

    @property
    def _distilled(self) -> bool:
        return not self._dev and bool(self.pipe.config.is_distilled)

    @classmethod
    def component_overrides(
        cls, index: dict[str, Any], source: str, local: bool, revision: str | None
    ) -> dict[str, Any]:
        """FLUX.2-dev's ``tokenizer`` folder as a text-only processor (see ``PixtralTextProcessor``)."""
        if index.get("_class_name") != Flux2Pipeline.__name__:
            return {}
        processor = PixtralTextProcessor.from_pretrained(
            source, subfolder="tokenizer", revision=revision, local_files_only=local
        )
        return {"tokenizer": processor}

    def modes(self) -> frozenset[str]:
        return frozenset({"text", "edit"})  # its input images are references (image=[...]), not img2img

    def shape_key(self, params: GenerationParams) -> Any:
        # Reference tokens lengthen a row's sequence: rows share a call with the same references' sizes only.
        return (params.height, params.width, tuple(reference.size for reference in params.references))

    def guidance_kind(self) -> str:
        # dev takes the scale as an input; the distilled klein checkpoints ignore one (diffusers warns); the base
        # ones guide above 1.
        if self._dev:
            return "embedded"
        return "none" if self._distilled else "cfg"

    def prompt_windows(self) -> dict[str, int]:
        return {"prompt": self.max_text_tokens}

    def set_timesteps(
        self, scheduler: SchedulerMixin, steps: int, height: int, width: int, device: torch.device | None = None
    ) -> None:
        """Flux2KleinPipeline's schedule: its own sigmas and the empirical shift of the token and step counts."""
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        patch = self.pipe.vae_scale_factor * 2
        mu = pipeline_flux2_klein.compute_empirical_mu((height // patch) * (width // patch), steps)
        pipeline_flux2_klein.retrieve_timesteps(scheduler, steps, device or self.device, sigmas=sigmas, mu=mu)

    def timestep_row(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.latent_dtype).reshape(1)  # the pipeline casts t to the latents' dtype, then divides

    def guidance_scale(self, params: GenerationParams) -> float:
        return params.guidance_scale

    def _latent_grid(self, pixels: int) -> int:
        return pixels // (self.pipe.vae_scale_factor * 2)  # patchified latents: one token a 2x2 patch

    def native_row_shape(self) -> tuple[int, ...]:
        size = self._latent_grid(self.native_size)
        return (size * size, self.pipe.transformer.config.in_channels)

    def _encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """Every text's caption in one encoder call, and whether each was cut at the token window."""
        pipe, window = self.pipe, self.max_text_tokens
        if self._dev:  # the processor's chat template, after the pipeline's system message
            conversations = pipeline_flux2.format_input(prompts=texts, system_message=pipe.system_message)
            # diffusers passes padding and truncation beside the template's arguments; transformers takes them as
            # processor_kwargs (and warns, on every call, when given otherwise): the same tokens either way.
            template = {"add_generation_prompt": False, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
            padded = {"padding": "max_length", "truncation": True, "max_length": window}
            tokens = pipe.tokenizer.apply_chat_template(conversations, processor_kwargs=padded, **template)
            untruncated = pipe.tokenizer.apply_chat_template(
                conversations, processor_kwargs={"padding": True}, **template
            )
            lengths, layers = untruncated.attention_mask.sum(dim=1).tolist(), DEV_HIDDEN_LAYERS
        else:
            templated = [
                pipe.tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}],
                    tokenize=False,
                    add_generation_prompt=True,
                    enable_thinking=False,
                )
                for text in texts
            ]
            tokens = pipe.tokenizer(
                templated, padding="max_length", max_length=window, truncation=True, return_tensors="pt"
            )
            lengths, layers = [len(ids) for ids in pipe.tokenizer(templated).input_ids], HIDDEN_LAYERS
        output = pipe.text_encoder(
            input_ids=tokens.input_ids.to(self.device),
            attention_mask=tokens.attention_mask.to(self.device),
            output_hidden_states=True,
            use_cache=False,
        )
        stacked = torch.stack([output.hidden_states[k] for k in layers], dim=1).to(pipe.text_encoder.dtype)
        rows, depth, length, width = stacked.shape
        cut = [length > window for length in lengths]
        return stacked.permute(0, 2, 1, 3).reshape(rows, length, depth * width), cut

    def encode_prompts(self, jobs: list[Job]) -> list[Encoded]:
        # diffusers' rule: guidance above 1 on the klein base checkpoints, against "" (a negative prompt when given).
        guided = [] if self._distilled or self._dev else [job for job in jobs if job.params.guidance_scale > 1]
        (texts,), negative_row = with_negatives(
            jobs, guided, lambda p: (p.prompt,), lambda p: (p.negative_prompt or "",)
        )
        captions, cut = self._encode_texts(texts)
        text_ids = self.pipe._prepare_text_ids(captions[:1]).to(self.device)
        rows: list[Encoded] = []
        for index, job in enumerate(jobs):
            job.prompt_truncated = cut[index]
            shared = {"txt_ids": text_ids, "img_ids": self._image_ids(job.params.height, job.params.width)}
            if self._dev:  # the pipeline's guidance input: float32, whatever the latents' dtype
                shared["guidance"] = torch.full([1], job.params.guidance_scale, device=self.device, dtype=torch.float32)
            if job.params.references:
                shared["reference_latents"], shared["reference_ids"] = self._references(job.params.references)
            other = negative_row.get(id(job))
            uncond = None if other is None else {"encoder_hidden_states": captions[other : other + 1], **shared}
            rows.append(({"encoder_hidden_states": captions[index : index + 1], **shared}, uncond))
        return rows

    def _references(self, references: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The references' tokens and ids, prepared as the pipeline prepares its ``image`` list: scaled down to
        1024x1024's area when larger, cropped to the 16 px multiple, encoded (the posterior's mode) in the VAE's
        dtype, patchified and normalised; each reference's ids a time offset of its own."""
        processor, multiple = self.pipe.image_processor, self.pipe.vae_scale_factor * 2
        tensors = []
        for reference in references:
            image = reference
            if image.width * image.height > 1024 * 1024:
                image = processor._resize_to_target_area(image, 1024 * 1024)
            width, height = image.width // multiple * multiple, image.height // multiple * multiple
            tensors.append(processor.preprocess(image, height=height, width=width, resize_mode="crop"))
        latents, ids = self.pipe.prepare_image_latents(
            images=tensors, batch_size=1, generator=None, device=self.device, dtype=self.vae.dtype
        )
        return latents.to(self.latent_dtype), ids

    def _image_ids(self, height: int, width: int) -> torch.Tensor:
        grid = torch.zeros((1, 1, self._latent_grid(height), self._latent_grid(width)))
        return self.pipe._prepare_latent_ids(grid).to(self.device)

    def initial_latents(self, job: Job, scheduler: SchedulerMixin, generator: torch.Generator) -> torch.Tensor:
        p = job.params
        shape = (1, self.pipe.transformer.config.in_channels, self._latent_grid(p.height), self._latent_grid(p.width))
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.latent_dtype)
        return self.pipe._pack_latents(latents)

    def final_latents(self, jobs: list[Job]) -> torch.Tensor:
        p = jobs[0].params  # one decode holds one batch group: one size
        packed = torch.cat([job.work.latents for job in jobs])
        ids = self._image_ids(p.height, p.width).expand(len(jobs), -1, -1)
        # klein's unpacking, for dev too: the same scatter, given the grid's size rather than finding it on the device
        unpack = Flux2KleinPipeline._unpack_latents_with_ids
        return unpack(packed, ids, self._latent_grid(p.height), self._latent_grid(p.width))

    def latents_for_vae(self, latents: torch.Tensor, dtype: torch.dtype, jobs: list[Job] | None = None) -> torch.Tensor:
        bn, eps = self.vae.bn, self.vae.config.batch_norm_eps
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps).to(latents.device, latents.dtype)
        return self.pipe._unpatchify_latents(latents * std + mean).to(dtype)

    def example_inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        config, size = self.pipe.transformer.config, self.native_size
        zeros = {"device": self.device, "dtype": self.latent_dtype}
        captions = torch.zeros((rows, self.max_text_tokens, config.joint_attention_dim), **zeros)
        inputs = {
            "encoder_hidden_states": captions,
            "txt_ids": self.pipe._prepare_text_ids(captions[:1]).to(self.device).expand(rows, -1, -1),
            "img_ids": self._image_ids(size, size).expand(rows, -1, -1),
        }
        if self._dev:
            inputs["guidance"] = torch.full((rows,), 4.0, device=self.device, dtype=torch.float32)
        return torch.zeros((rows, *self.native_row_shape()), **zeros), torch.full((rows,), 500.0, **zeros), inputs


FAMILY = Family(
    name="flux2",
    model=Flux2Model,
    pipelines=(
        ServedPipeline(
            pipeline_class=Flux2KleinPipeline,
            description="FLUX.2-klein 4B and 9B, distilled and base (text to image; edits by reference images)",
            default_guidance_scale=4.0,
            takes_images=False,
        ),
        ServedPipeline(
            pipeline_class=Flux2Pipeline,
            description="FLUX.2-dev (text to image; edits by reference images; guidance-distilled)",
            default_guidance_scale=4.0,
            takes_images=False,
        ),
    ),
    cuda_dtype=torch.bfloat16,
    long_text_tokens=TEXT_TOKENS,
    builtins={
        "tiny-flux2-klein": Builtin(Flux2KleinPipeline, builtin.build_tiny_flux2_klein),
        "tiny-flux2-klein-base": Builtin(Flux2KleinPipeline, builtin.build_tiny_flux2_klein_base),
        "flux2-klein-4b-arch": Builtin(Flux2KleinPipeline, builtin.build_flux2_klein_4b_arch, full_size=True),
        "tiny-flux2-dev": Builtin(Flux2Pipeline, builtin.build_tiny_flux2_dev),
        "flux2-dev-arch": Builtin(Flux2Pipeline, builtin.build_flux2_dev_arch, full_size=True),
    },
)
