"""Qwen-Image (and its 2512 checkpoint): a Qwen2.5-VL encoder's last hidden states, each prompt at its own length,
condition a double-stream transformer over latents packed in 2x2 patches, with flow matching and true CFG.

The specification it matches row for row is diffusers' ``QwenImagePipeline.__call__``:

- each prompt goes into the pipeline's describe-the-image template and through the encoder; the template's first
  34 tokens are dropped, and the prompt's own tokens, at most ``max_sequence_length`` (512), are its caption;
  captions of different lengths in one call are padded with zeros and masked, as the pipeline pads a batch;
- latents ``(1, 16, h, w)`` per image (one video frame) in the encoder's dtype, drawn with the request's CPU
  generator, then packed; the transformer takes ``t / 1000`` and each image's ``img_shapes``;
- each job's schedule is its pipeline's: sigmas ``linspace(1, 1/n, n)`` shifted by ``mu`` from the image's token
  count, from index 0;
- ``true_cfg_scale`` above 1 (the pipeline's default is 4) with a negative prompt adds a row conditioned on it,
  mixed as ``negative + scale * (positive - negative)`` and then rescaled, token by token, to the positive row's
  norm; the model takes no ``guidance_scale``;
- the decode un-normalises with the VAE's per-channel mean and std and takes the one frame of its video VAE;
- img2img and inpainting are ``QwenImageImg2ImgPipeline``'s and ``QwenImageInpaintPipeline``'s, computed as the
  other flow-matching families compute theirs (``FlowMatchingModel``), the picture encoded as one frame and
  normalised with the same statistics (default strength 0.6; inpainting noises the picture even at strength 1).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline
from diffusers.configuration_utils import FrozenDict
from diffusers.pipelines.qwenimage import pipeline_qwenimage, pipeline_qwenimage_edit_plus
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from predictor import builtin
from predictor.families.base import Builtin, Encoded, Family, ServedPipeline, with_negatives
from predictor.families.flow import PackedFlowModel, resolution_shift
from predictor.jobs import Job
from predictor.processors import QwenVLImageProcessor
from predictor.request import GenerationParams, at_area

TEXT_TOKENS = 512  # QwenImagePipeline's default max_sequence_length (it refuses more than 1024)


def _call_qwen(transformer: Any, sample: torch.Tensor, timesteps: torch.Tensor, **inputs: Any) -> Any:
    """The pipeline's call: captions padded with zeros to the longest and masked (no mask when all are equal, as
    the pipeline drops an all-ones mask), each row's image shape."""
    captions: list[torch.Tensor] = inputs["encoder_hidden_states"]
    longest = max(len(caption) for caption in captions)
    states = torch.stack([torch.cat([c, c.new_zeros(longest - len(c), c.shape[1])]) for c in captions])
    mask = None
    if any(len(caption) != longest for caption in captions):
        ones = [torch.ones(len(c), dtype=torch.long, device=c.device) for c in captions]
        mask = torch.stack([torch.cat([one, one.new_zeros(longest - len(one))]) for one in ones])
    # Edits: the input images' latents follow the image's in every row's sequence, and only the image's come out.
    hidden = sample if "image_latents" not in inputs else torch.cat([sample, inputs["image_latents"]], dim=1)
    out = transformer(
        hidden_states=hidden,
        timestep=timesteps / 1000,
        guidance=None,
        encoder_hidden_states_mask=mask,
        encoder_hidden_states=states,
        img_shapes=inputs["img_shapes"],
        return_dict=False,
    )[0]
    return (out[:, : sample.shape[1]],)


class FrameVAE(torch.nn.Module):
    """Qwen-Image's video VAE as the runner calls an image VAE: latents ``(rows, 16, h, w)`` decode as one frame
    each (the pipeline decodes ``(rows, 16, 1, h, w)`` and takes frame 0); ``config.latent_channels`` is its
    ``z_dim``."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae
        self.config = FrozenDict({**vae.config, "latent_channels": vae.config.z_dim})

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def decode(self, latents: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        return (self.vae.decode(latents.unsqueeze(2), return_dict=False)[0][:, :, 0],)

    def encode(self, images: torch.Tensor, return_dict: bool = True) -> SimpleNamespace:
        """The posterior of pictures ``(rows, 3, H, W)``, each one frame: its mean and std without the frame axis
        (a draw from it takes as many values from a generator as the pipeline's five-dimensional one)."""
        posterior = self.vae.encode(images.unsqueeze(2)).latent_dist
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=posterior.mean[:, :, 0], std=posterior.std[:, :, 0]))


class QwenImageModel(PackedFlowModel):
    inpaint_noises_at_full_strength = True  # QwenImageInpaintPipeline noises the picture even at strength 1
    family_fields = frozenset({"true_cfg_scale"})
    compile_by_region = True  # each prompt at its own length: a graph of fixed shapes would recompile for each
    call_transformer = staticmethod(_call_qwen)

    @classmethod
    def component_overrides(
        cls, index: dict[str, Any], source: str, local: bool, revision: str | None
    ) -> dict[str, Any]:
        """Qwen-Image-Edit's ``processor`` folder as a processor of prompts and still images (``QwenVLImageProcessor``:
        transformers builds a ``Qwen2VLProcessor`` only with torchvision, for its video processor)."""
        if index.get("_class_name") not in (QwenImageEditPipeline.__name__, QwenImageEditPlusPipeline.__name__):
            return {}
        processor = QwenVLImageProcessor.from_pretrained(
            source, subfolder="processor", revision=revision, local_files_only=local
        )
        return {"processor": processor}

    def decoding_vae(self, vae: Any) -> Any:
        return FrameVAE(vae)

    @property
    def latent_dtype(self) -> torch.dtype:
        return self.pipe.text_encoder.dtype  # the pipeline draws latents in the prompt embeddings' dtype

    def guidance_kind(self) -> str:
        return "none"  # guidance_scale is for guidance-distilled checkpoints; Qwen-Image guides by true CFG

    def prompt_windows(self) -> dict[str, int]:
        # The edit pipelines keep every token of the prompt and its images (the text encoder's window).
        return {"prompt": self.pipe.tokenizer_max_length if self._edit else self.max_text_tokens}

    def set_timesteps(
        self, scheduler: SchedulerMixin, steps: int, height: int, width: int, device: torch.device | None = None
    ) -> None:
        """QwenImagePipeline's schedule: its own sigmas (a scheduler that takes none cannot run it, and is not
        offered) and a shift ``mu`` from the image's token count."""
        config = scheduler.config
        sigmas = np.linspace(1.0, 1 / steps, steps)
        tokens = (height // (self.pipe.vae_scale_factor * 2)) * (width // (self.pipe.vae_scale_factor * 2))
        mu = resolution_shift(config, tokens)
        pipeline_qwenimage.retrieve_timesteps(scheduler, steps, device or self.device, sigmas=sigmas, mu=mu)

    def guidance_scale(self, params: GenerationParams) -> float:
        return params.true_cfg_scale

    def mix_guidance(self, uncond: torch.Tensor, text: torch.Tensor, params: GenerationParams) -> torch.Tensor:
        """The pipeline's true CFG: the mix, rescaled token by token to the positive prediction's norm."""
        mixed = uncond + params.true_cfg_scale * (text - uncond)
        return mixed * (torch.norm(text, dim=-1, keepdim=True) / torch.norm(mixed, dim=-1, keepdim=True))

    def _image_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (1, self._latent_size(height) // 2, self._latent_size(width) // 2)

    def native_row_shape(self) -> tuple[int, ...]:
        size = self._latent_size(self.native_size) // 2
        return (size * size, self.pipe.transformer.config.in_channels)

    def _encode_texts(self, texts: list[str]) -> tuple[list[torch.Tensor], list[bool]]:
        """Each text's caption (its own tokens after the template's, at most the window), in one encoder call; and
        whether each was cut."""
        pipe, drop = self.pipe, self.pipe.prompt_template_encode_start_idx
        templated = [pipe.prompt_template_encode.format(text) for text in texts]
        tokens = pipe.tokenizer(
            templated,
            max_length=pipe.tokenizer_max_length + drop,
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        hidden = pipe.text_encoder(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
        ).hidden_states[-1]
        masks = tokens.attention_mask.bool()
        captions = [hidden[i][masks[i]][drop:][: self.max_text_tokens] for i in range(len(texts))]
        lengths = [len(ids) - drop for ids in pipe.tokenizer(templated).input_ids]
        return [c.to(pipe.text_encoder.dtype) for c in captions], [n > self.max_text_tokens for n in lengths]

    def encode_prompts(self, jobs: list[Job]) -> list[Encoded]:
        if self._edit:
            return [self._encode_edit(job) for job in jobs]
        # diffusers' rule: true CFG with true_cfg_scale above 1 and a negative prompt.
        guided = [job for job in jobs if job.params.true_cfg_scale > 1 and job.params.negative_prompt is not None]
        (texts,), negative_row = with_negatives(jobs, guided, lambda p: (p.prompt,), lambda p: (p.negative_prompt,))
        captions, cut = self._encode_texts(texts)
        rows: list[Encoded] = []
        for index, job in enumerate(jobs):
            p = job.params
            job.prompt_truncated = cut[index]
            shapes = [[self._image_shape(p.height, p.width)]]
            other = negative_row.get(id(job))
            uncond = None if other is None else {"encoder_hidden_states": [captions[other]], "img_shapes": shapes}
            rows.append(({"encoder_hidden_states": [captions[index]], "img_shapes": shapes}, uncond))
        return rows

    # ---- Qwen-Image-Edit and Edit-Plus: input images through the encoder (as image tokens) and the VAE ----

    @property
    def _edit(self) -> bool:
        return isinstance(self.pipe, QwenImageEditPipeline | QwenImageEditPlusPipeline)

    @property
    def _plus(self) -> bool:
        return isinstance(self.pipe, QwenImageEditPlusPipeline)

    def _areas(self) -> tuple[int, int]:
        """The areas (pixels) an input image is resized to for the VAE and for the encoder: Edit-Plus's module
        constants (1024x1024 and 384x384); Edit's 1024x1024 for both."""
        if self._plus:
            return pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE, pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE
        return 1024 * 1024, 1024 * 1024

    def modes(self) -> frozenset[str]:
        # The edit pipeline needs its images (it sizes the output from the last one): an edit-only checkpoint.
        return frozenset({"edit"}) if self._edit else super().modes()

    def reference_rules(self) -> dict[str, Any]:
        if not self._edit:
            return {}
        # QwenImageEditPlusPipeline: one to three images (the model's); QwenImageEditPipeline one. The output at the
        # last one's aspect ratio and the VAE's area; any image it can resize.
        return {
            "max_reference_images": 3 if self._plus else 1,
            "reference_max_area": self._areas()[0],
            "reference_output_size": "last-at-area",
            "reference_min_side": 32,
        }

    def shape_key(self, params: GenerationParams) -> Any:
        # The input images' latents lengthen each row's sequence: rows share a call with the same input layout only.
        return (params.height, params.width, tuple(self._vae_size(image) for image in params.references))

    def _vae_size(self, image: Any) -> tuple[int, int]:
        return at_area(image.size, self._areas()[0])

    def _encode_edit(self, job: Job) -> Encoded:
        """One edit's rows as QwenImageEditPlusPipeline makes them: each image at 384x384's area through the
        encoder after "Picture N:" in the prompt (QwenImageEditPipeline: its one image at 1024x1024's, where its
        template holds it), and at 1024x1024's through the VAE (the posterior's mode: no draw), its latents packed
        after the image's; the negative prompt sees the same images."""
        pipe, p = self.pipe, job.params
        area = self._areas()[1]  # what the encoder sees of each input image
        condition = [pipe.image_processor.resize(image, *reversed(at_area(image.size, area))) for image in p.references]
        guided = p.true_cfg_scale > 1 and p.negative_prompt is not None
        texts = [p.prompt, p.negative_prompt] if guided else [p.prompt]
        captions, cut = zip(*(self._encode_with_images(text, condition) for text in texts), strict=True)
        job.prompt_truncated = cut[0]
        latents, shapes = [], [self._image_shape(p.height, p.width)]
        for image in p.references:
            width, height = self._vae_size(image)
            pixels = pipe.image_processor.preprocess(image, height, width).to(self.device, self.latent_dtype)
            encoded = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean
            latents.append(self.pack(self.latents_from_vae(encoded).to(self.latent_dtype)))
            shapes.append(self._image_shape(height, width))
        shared = {"image_latents": torch.cat(latents, dim=1), "img_shapes": [shapes]}
        cond = {"encoder_hidden_states": [captions[0]], **shared}
        return cond, ({"encoder_hidden_states": [captions[1]], **shared} if guided else None)

    def _encode_with_images(self, text: str, images: list[Any]) -> tuple[torch.Tensor, bool]:
        """A prompt's caption with the images' tokens in it: every token after the template's. The edit pipelines
        cut nothing (their max_sequence_length is only checked), so neither does this: never cut."""
        pipe, drop = self.pipe, self.pipe.prompt_template_encode_start_idx
        pictures = "".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>" for i in range(len(images)))
        if not self._plus:  # QwenImageEditPipeline's template holds its one image's tokens
            pictures = ""
        inputs = pipe.processor(
            text=[pipe.prompt_template_encode.format(pictures + text)], images=images, padding=True, return_tensors="pt"
        ).to(self.device)
        hidden = pipe.text_encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            output_hidden_states=True,
        ).hidden_states[-1]
        caption = hidden[0][inputs["attention_mask"][0].bool()][drop:]
        return caption.to(pipe.text_encoder.dtype), False

    def initial_latents(self, job: Job, scheduler: SchedulerMixin, generator: torch.Generator) -> torch.Tensor:
        p = job.params
        channels = self.pipe.transformer.config.in_channels // 4
        height, width = self._latent_size(p.height), self._latent_size(p.width)
        latents = randn_tensor(
            (1, 1, channels, height, width), generator=generator, device=self.device, dtype=self.latent_dtype
        )
        return self.pipe._pack_latents(latents, 1, channels, height, width)

    def final_latents(self, jobs: list[Job]) -> torch.Tensor:
        p = jobs[0].params  # one decode holds one batch group: one size
        packed = torch.cat([job.work.latents for job in jobs])
        return self.pipe._unpack_latents(packed, p.height, p.width, self.pipe.vae_scale_factor)[:, :, 0]

    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel mean and the inverse of its std, as the pipelines hold them."""
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1).to(like.device, like.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1).to(like.device, like.dtype)
        return mean, inverse_std

    def latents_for_vae(self, latents: torch.Tensor, dtype: torch.dtype, jobs: list[Job] | None = None) -> torch.Tensor:
        latents = latents.to(dtype)
        mean, inverse_std = self._latent_statistics(latents)
        return latents / inverse_std + mean

    def latents_from_vae(self, sample: torch.Tensor) -> torch.Tensor:
        mean, inverse_std = self._latent_statistics(sample)
        return (sample - mean) * inverse_std

    def example_inputs(self, rows: int, ragged: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Captions of the full window, or (``ragged``) each row's 40 tokens shorter than the last, so the call pads
        and masks them, as prompts of different lengths make it do."""
        config, zeros = self.pipe.transformer.config, {"device": self.device, "dtype": self.latent_dtype}
        sample = torch.zeros((rows, *self.native_row_shape()), **zeros)
        timesteps = torch.full((rows,), 500.0, **zeros)
        lengths = [max(self.max_text_tokens - 40 * row * ragged, 1) for row in range(rows)]
        captions = [torch.zeros((n, config.joint_attention_dim), **zeros) for n in lengths]
        shapes = [[self._image_shape(self.native_size, self.native_size)]] * rows
        return sample, timesteps, {"encoder_hidden_states": captions, "img_shapes": shapes}


FAMILY = Family(
    name="qwenimage",
    model=QwenImageModel,
    pipelines=(
        ServedPipeline(
            pipeline_class=QwenImagePipeline,
            description="Qwen-Image and Qwen-Image-2512 (true CFG with a negative prompt)",
            default_guidance_scale=0.0,
            default_true_cfg_scale=4.0,
        ),
        ServedPipeline(
            pipeline_class=QwenImageEditPipeline,
            description="Qwen-Image-Edit (edits one input image; true CFG)",
            default_guidance_scale=0.0,
            default_true_cfg_scale=4.0,
            takes_images=False,
        ),
        ServedPipeline(
            pipeline_class=QwenImageEditPlusPipeline,
            description="Qwen-Image-Edit-2509 and -2511 (edits one to three input images; true CFG)",
            default_guidance_scale=0.0,
            default_true_cfg_scale=4.0,
            takes_images=False,
        ),
    ),
    cuda_dtype=torch.bfloat16,
    long_text_tokens=TEXT_TOKENS,
    builtins={
        "tiny-qwenimage": Builtin(QwenImagePipeline, builtin.build_tiny_qwenimage),
        "qwenimage-arch": Builtin(QwenImagePipeline, builtin.build_qwenimage_arch, full_size=True),
        "tiny-qwenimage-edit": Builtin(QwenImageEditPipeline, builtin.build_tiny_qwenimage_edit),
        "tiny-qwenimage-edit-plus": Builtin(QwenImageEditPlusPipeline, builtin.build_tiny_qwenimage_edit_plus),
        "qwenimage-edit-plus-arch": Builtin(
            QwenImageEditPlusPipeline, builtin.build_qwenimage_edit_plus_arch, full_size=True
        ),
    },
)
