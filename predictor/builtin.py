"""Pipelines built in-process, with random weights and no download.

Tiny ones, for tests and smoke runs (seconds on a CPU; they produce noise):
``builtin:tiny``       SD v1's structure (CLIP tokenizer + text encoder, UNet, VAE with latent scale factor 8)
                       and SD v1's scheduler config.
``builtin:tiny-sd2``   SD 2.x's: a v-prediction scheduler config, linear attention projections, OpenCLIP padding.
``builtin:tiny-sdxl``  SDXL's: two text encoders (the second with a projection, for the pooled embedding), a UNet
                       with the text-and-time added embedding, SDXL's scheduler and VAE config.

Full-size architectures, for GPU benchmarks without weights (their timings stand for the real model's):
``builtin:sd-v1-arch`` SD v1 (860M UNet, ViT-L/14 text encoder, 84M VAE), native 512.
``builtin:sd2-arch``   SD 2.1 (866M UNet, OpenCLIP ViT-H/14 text encoder), v-prediction, native 768.
``builtin:sdxl-arch``  SDXL base 1.0 (2.6B UNet, ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders), native 1024.

All are seeded, so the same builtin is the same pipeline in every process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

BUILTIN_PREFIX = "builtin:"
_SEED = 0

# The scheduler config CompVis/stable-diffusion-v1-4 ships. DDIM and friends read these fields:
# without clip_sample=False / set_alpha_to_one=False / steps_offset=1 they drift from SD's behaviour.
SD_V1_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# stabilityai/stable-diffusion-2-1's: DDIM over the same betas, trained to predict v rather than the noise.
SD2_SCHEDULER_CONFIG = {**SD_V1_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
# stabilityai/stable-diffusion-xl-base-1.0's.
SDXL_SCHEDULER_CONFIG = {
    **SD_V1_SCHEDULER_CONFIG,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
SDXL_VAE_SCALING_FACTOR = 0.13025


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's byte-to-symbol table: printable bytes stand for themselves, the rest move past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _byte_level_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP BPE tokenizer with only the 512 byte-level base symbols and a few merges.

    Any text tokenizes (every byte has a symbol, as in the real CLIP vocabulary), so prompts of any
    language work and long prompts truncate at 77 tokens exactly as with the real tokenizer.
    """
    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>")]
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_list))}
    # transformers 5's CLIPTokenizer takes the vocabulary and merges directly; merges must be tuples.
    # OpenCLIP's tokenizers (SD 2.x, SDXL's second) pad with "!" rather than the end-of-text token.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token=pad_token)


def _text_encoder(tokenizer: CLIPTokenizer, cls: type = CLIPTextModel, **config: int | str) -> CLIPTextModel:
    text_config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=77,
        **config,
    )
    return cls(text_config)


def _vae(block_out_channels: tuple[int, ...], layers_per_block: int, sample_size: int, **config: Any) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=block_out_channels,  # four blocks: latent scale factor 8, as in SD
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=layers_per_block,
        sample_size=sample_size,
        **config,
    )


def _tiny_vae(**config: Any) -> AutoencoderKL:
    return _vae((8, 8, 16, 16), 1, 64, norm_num_groups=4, **config)


def _tiny_text_encoder(tokenizer: CLIPTokenizer, cls: type = CLIPTextModel, **config: Any) -> CLIPTextModel:
    return _text_encoder(
        tokenizer,
        cls,
        vocab_size=max(1000, len(tokenizer)),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        **config,
    )


def _sd_pipeline(text_encoder, tokenizer, unet, vae, scheduler) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_unet(**config: Any) -> UNet2DConditionModel:
    """Two blocks, one with cross-attention; the family's own fields in ``config``."""
    return UNet2DConditionModel(
        sample_size=8,  # 8 latents x scale factor 8: native size 64x64
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        **config,
    )


def build_tiny() -> StableDiffusionPipeline:
    torch.manual_seed(_SEED)
    tokenizer = _byte_level_tokenizer()
    unet = _tiny_unet(cross_attention_dim=32, attention_head_dim=8)
    return _sd_pipeline(
        _tiny_text_encoder(tokenizer), tokenizer, unet, _tiny_vae(), PNDMScheduler.from_config(SD_V1_SCHEDULER_CONFIG)
    )


def build_tiny_sd2() -> StableDiffusionPipeline:
    torch.manual_seed(_SEED)
    tokenizer = _byte_level_tokenizer(pad_token="!")
    unet = _tiny_unet(cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True)
    text_encoder = _tiny_text_encoder(tokenizer, hidden_act="gelu")
    return _sd_pipeline(text_encoder, tokenizer, unet, _tiny_vae(), DDIMScheduler.from_config(SD2_SCHEDULER_CONFIG))


def build_tiny_sdxl() -> StableDiffusionXLPipeline:
    torch.manual_seed(_SEED)
    tokenizer = _byte_level_tokenizer()
    tokenizer_2 = _byte_level_tokenizer(pad_token="!")
    text_encoder = _tiny_text_encoder(tokenizer)
    text_encoder_2 = _tiny_text_encoder(tokenizer_2, CLIPTextModelWithProjection, projection_dim=32)
    unet = _tiny_unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids of 8 features, and the pooled text
        cross_attention_dim=64,  # the two encoders' hidden states side by side
    )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(scaling_factor=SDXL_VAE_SCALING_FACTOR, force_upcast=True),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _vit_l_text_encoder(tokenizer: CLIPTokenizer, cls: type = CLIPTextModel) -> CLIPTextModel:
    """CLIP ViT-L/14's text tower: SD v1's text encoder and SDXL's first."""
    return _text_encoder(
        tokenizer,
        cls,
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        hidden_act="quick_gelu",
        projection_dim=768,
    )


def _sd_unet(**config: Any) -> UNet2DConditionModel:
    """SD 1.x and 2.x's 860M UNet layout; the version's own fields (size, context width, heads) in ``config``."""
    return UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        **config,
    )


def build_sd_v1_arch(device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
    """SD v1's exact architecture, random weights, initialised straight on ``device``."""
    torch.manual_seed(_SEED)
    tokenizer = _byte_level_tokenizer()
    with torch.device(device):
        text_encoder = _vit_l_text_encoder(tokenizer)
        unet = _sd_unet(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = _vae((128, 256, 512, 512), 2, 512)
    pipe = _sd_pipeline(text_encoder, tokenizer, unet, vae, PNDMScheduler.from_config(SD_V1_SCHEDULER_CONFIG))
    return pipe.to(device=device, dtype=dtype)


def build_sd2_arch(device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
    """SD 2.1 (768, v-prediction): OpenCLIP ViT-H/14's text tower cut at 23 layers, as the checkpoint ships it."""
    torch.manual_seed(_SEED)
    tokenizer = _byte_level_tokenizer(pad_token="!")
    with torch.device(device):
        text_encoder = _text_encoder(
            tokenizer,
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=23,
            hidden_act="gelu",
            projection_dim=512,
        )
        unet = _sd_unet(
            sample_size=96,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
            upcast_attention=True,
        )
        vae = _vae((128, 256, 512, 512), 2, 768)
    pipe = _sd_pipeline(text_encoder, tokenizer, unet, vae, DDIMScheduler.from_config(SD2_SCHEDULER_CONFIG))
    return pipe.to(device=device, dtype=dtype)


def build_sdxl_arch(device: torch.device, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    """SDXL base 1.0: ViT-L/14 and OpenCLIP ViT-bigG/14 text towers, the 2.6B UNet, SDXL's VAE config."""
    torch.manual_seed(_SEED)
    tokenizer = _byte_level_tokenizer()
    tokenizer_2 = _byte_level_tokenizer(pad_token="!")
    with torch.device(device):
        text_encoder = _vit_l_text_encoder(tokenizer)
        text_encoder_2 = _text_encoder(
            tokenizer_2,
            CLIPTextModelWithProjection,
            vocab_size=49408,
            hidden_size=1280,
            intermediate_size=5120,
            num_attention_heads=20,
            num_hidden_layers=32,
            hidden_act="gelu",
            projection_dim=1280,
        )
        unet = UNet2DConditionModel(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True,
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = _vae((128, 256, 512, 512), 2, 1024, scaling_factor=SDXL_VAE_SCALING_FACTOR, force_upcast=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return pipe.to(device=device, dtype=dtype)


_TINY: dict[str, Callable[[], DiffusionPipeline]] = {
    "tiny": build_tiny,
    "tiny-sd2": build_tiny_sd2,
    "tiny-sdxl": build_tiny_sdxl,
}
_FULL_SIZE: dict[str, Callable[[torch.device, torch.dtype], DiffusionPipeline]] = {
    "sd-v1-arch": build_sd_v1_arch,
    "sd2-arch": build_sd2_arch,
    "sdxl-arch": build_sdxl_arch,
}
BUILTINS = (*_TINY, *_FULL_SIZE)


def build_builtin(name: str, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    if name in _TINY:
        pipe = _TINY[name]()
        if dtype != torch.float32:  # built in float32; cast only when asked to
            pipe.to(dtype=dtype)
        return pipe.to(device)
    if name in _FULL_SIZE:
        return _FULL_SIZE[name](device, dtype)
    choices = ", ".join(BUILTIN_PREFIX + known for known in BUILTINS)
    raise ValueError(f"unknown builtin model '{BUILTIN_PREFIX}{name}'; choose one of {choices}")
