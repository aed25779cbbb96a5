"""Stable Diffusion pipelines built in-process, with random weights and no download.

``builtin:tiny``       a tiny SD pipeline with SD v1's structure (CLIP tokenizer + text encoder, UNet, VAE
                       with latent scale factor 8) and SD v1's scheduler config; for tests and smoke runs.
                       It produces noise.
``builtin:sd-v1-arch`` the full-size SD v1 architecture (860M UNet, ViT-L/14 text encoder, 84M VAE); for GPU
                       benchmarks without weights: its timings stand for the real model's.

Both are seeded, so the same builtin is the same pipeline in every process.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("tiny", "sd-v1-arch")
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


def _byte_level_tokenizer(max_length: int = 77) -> CLIPTokenizer:
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
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _text_encoder(tokenizer: CLIPTokenizer, **config: int | str) -> CLIPTextModel:
    text_config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=77,
        **config,
    )
    return CLIPTextModel(text_config)


def build_tiny() -> StableDiffusionPipeline:
    torch.manual_seed(_SEED)
    tokenizer = _byte_level_tokenizer()
    text_encoder = _text_encoder(
        tokenizer,
        vocab_size=max(1000, len(tokenizer)),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
    )
    unet = UNet2DConditionModel(
        sample_size=8,  # 8 latents x scale factor 8: native size 64x64
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),  # four blocks: latent scale factor 8, as in SD
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD_V1_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sd_v1_arch(device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
    """SD v1's exact architecture, random weights, initialised straight on ``device``."""
    torch.manual_seed(_SEED)
    tokenizer = _byte_level_tokenizer()
    with torch.device(device):
        text_encoder = _text_encoder(
            tokenizer,
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD_V1_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device=device, dtype=dtype)


def build_builtin(name: str, device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
    if name == "tiny":
        pipe = build_tiny()
        if dtype != torch.float32:  # built in float32; cast only when asked to
            pipe.to(dtype=dtype)
        return pipe.to(device)
    if name == "sd-v1-arch":
        return build_sd_v1_arch(device, dtype)
    raise ValueError(f"unknown builtin model '{BUILTIN_PREFIX}{name}'; choose one of {', '.join(BUILTINS)}")
