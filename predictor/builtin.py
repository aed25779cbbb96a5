"""Pipelines built in-process, with random weights and no download.

Tiny ones, for tests and smoke runs (seconds on a CPU; they produce noise):
``builtin:tiny``       SD v1's structure (CLIP tokenizer + text encoder, UNet, VAE with latent scale factor 8)
                       and SD v1's scheduler config.
``builtin:tiny-sd2``   SD 2.x's: a v-prediction scheduler config, linear attention projections, OpenCLIP padding.
``builtin:tiny-inpaint`` an SD 1.x inpainting checkpoint's: the UNet also reads the mask and the masked image.
``builtin:tiny-sdxl``  SDXL's: two text encoders (the second with a projection, for the pooled embedding), a UNet
                       with the text-and-time added embedding, SDXL's scheduler and VAE config.
``builtin:tiny-sdxl-inpaint`` an SDXL inpainting checkpoint's: the same with a UNet that reads the mask and the
                       masked image (diffusers/stable-diffusion-xl-1.0-inpainting-0.1's structure).
``builtin:tiny-flux``  FLUX.1-schnell's: CLIP (pooled) and T5 encoders, a FLUX transformer over packed latents,
                       schnell's scheduler config (no resolution shift), no guidance embedding.
``builtin:tiny-flux-dev`` FLUX.1-dev's: the same with the guidance embedding and dev's resolution shift.
``builtin:tiny-sd3``   SD 3.5's: two CLIP encoders with projections, a T5 encoder, an MMDiT transformer with
                       SD 3.5 medium's dual-attention and RMS-norm layers, SD3's shift-3 scheduler.
``builtin:tiny-zimage`` Z-Image's: a Qwen3 encoder behind its chat template, the Z-Image transformer, FLUX.1's VAE.
``builtin:tiny-flux2-klein`` FLUX.2-klein's (distilled; ``-base``: with guidance): Qwen3's layers 9, 18 and 27, the
                       FLUX.2 transformer and VAE (batch-norm statistics drawn at random).
``builtin:tiny-flux2-dev`` FLUX.2-dev's: a Mistral 3 encoder (layers 10, 20 and 30) behind its chat template, the
                       FLUX.2 transformer with the guidance embedding.

Full-size architectures, for GPU benchmarks without weights (their timings stand for the real model's):
``builtin:sd-v1-arch`` SD v1 (860M UNet, ViT-L/14 text encoder, 84M VAE), native 512.
``builtin:sd2-arch``   SD 2.1 (866M UNet, OpenCLIP ViT-H/14 text encoder), v-prediction, native 768.
``builtin:sdxl-arch``  SDXL base 1.0 (2.6B UNet, ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders), native 1024.
``builtin:flux-arch``  FLUX.1-dev (11.9B transformer with the guidance embedding, T5-XXL, CLIP ViT-L/14), 1024.
``builtin:flux-schnell-arch`` FLUX.1-schnell (the same without the guidance embedding), 1024.
``builtin:sd35-arch``  SD 3.5 large (8.1B MMDiT, CLIP ViT-L/14 and ViT-bigG/14 with projections, T5-XXL), 1024.
``builtin:sd35-medium-arch`` SD 3.5 medium (2.5B MMDiT-X), 1024.
``builtin:zimage-arch`` Z-Image(-Turbo) (6.15B transformer, Qwen3-4B), 1024.
``builtin:flux2-klein-4b-arch`` FLUX.2-klein-4B (3.88B transformer, Qwen3-4B, FLUX.2 VAE), 1024.
``builtin:flux2-dev-arch`` FLUX.2-dev (32.2B transformer, Mistral-Small-3.1-24B), 1024.

All are seeded, so the same builtin is the same pipeline in every process. Each family's module
(``predictor.families``) names the builtins that stand for it; ``builtin:NAME`` is resolved and built there.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from predictor.processors import PixtralTextProcessor, QwenVLImageProcessor

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
# black-forest-labs/FLUX.1-schnell's and FLUX.1-dev's: dev shifts its schedule by the image's token count.
FLUX_SCHNELL_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}
FLUX_DEV_SCHEDULER_CONFIG = {**FLUX_SCHNELL_SCHEDULER_CONFIG, "shift": 3.0, "use_dynamic_shifting": True}
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}
# stabilityai/stable-diffusion-3.5-large's and -medium's.
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}


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


def _vae(
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    sample_size: int,
    latent_channels: int = 4,
    **config: Any,
) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=block_out_channels,  # four blocks: latent scale factor 8, as in SD
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
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


def _tiny_unet(in_channels: int = 4, **config: Any) -> UNet2DConditionModel:
    """Two blocks, one with cross-attention; the family's own fields in ``config``."""
    return UNet2DConditionModel(
        sample_size=8,  # 8 latents x scale factor 8: native size 64x64
        in_channels=in_channels,
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


def build_tiny_inpaint() -> StableDiffusionInpaintPipeline:
    """An SD 1.x inpainting checkpoint's structure: the UNet also reads the mask (1 channel) and the masked image's
    latents (4), as runwayml/stable-diffusion-inpainting's does."""
    torch.manual_seed(_SEED)
    tokenizer = _byte_level_tokenizer()
    unet = _tiny_unet(cross_attention_dim=32, attention_head_dim=8, in_channels=9)
    return StableDiffusionInpaintPipeline(
        vae=_tiny_vae(),
        text_encoder=_tiny_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD_V1_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd2() -> StableDiffusionPipeline:
    torch.manual_seed(_SEED)
    tokenizer = _byte_level_tokenizer(pad_token="!")
    unet = _tiny_unet(cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True)
    text_encoder = _tiny_text_encoder(tokenizer, hidden_act="gelu")
    return _sd_pipeline(text_encoder, tokenizer, unet, _tiny_vae(), DDIMScheduler.from_config(SD2_SCHEDULER_CONFIG))


def build_tiny_sdxl(
    in_channels: int = 4, pipeline_class: type[DiffusionPipeline] = StableDiffusionXLPipeline
) -> DiffusionPipeline:
    torch.manual_seed(_SEED)
    tokenizer = _byte_level_tokenizer()
    tokenizer_2 = _byte_level_tokenizer(pad_token="!")
    text_encoder = _tiny_text_encoder(tokenizer)
    text_encoder_2 = _tiny_text_encoder(tokenizer_2, CLIPTextModelWithProjection, projection_dim=32)
    unet = _tiny_unet(
        in_channels=in_channels,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids of 8 features, and the pooled text
        cross_attention_dim=64,  # the two encoders' hidden states side by side
    )
    return pipeline_class(
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


def build_tiny_sdxl_inpaint() -> StableDiffusionXLInpaintPipeline:
    """An SDXL inpainting checkpoint's structure: the UNet also reads the mask (1 channel) and the masked image's
    latents (4); no aesthetic-score conditioning (``requires_aesthetics_score`` false), as the published one."""
    pipe = build_tiny_sdxl(in_channels=9, pipeline_class=StableDiffusionXLInpaintPipeline)
    assert isinstance(pipe, StableDiffusionXLInpaintPipeline)
    return pipe


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


def _vit_big_g_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    """OpenCLIP ViT-bigG/14's text tower with its projection: SDXL's and SD3's second text encoder."""
    return _text_encoder(
        tokenizer,
        CLIPTextModelWithProjection,
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_attention_heads=20,
        num_hidden_layers=32,
        hidden_act="gelu",
        projection_dim=1280,
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
        text_encoder_2 = _vit_big_g_text_encoder(tokenizer_2)
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


def _t5_tokenizer(max_length: int) -> T5TokenizerFast:
    """A T5 (SentencePiece Unigram) tokenizer over single characters: printable ASCII and a few word pieces, the
    rest <unk> as in T5's own vocabulary; every character is a token, so long prompts truncate early."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(c), -5.0) for c in range(ord("!"), ord("~") + 1)]
    pieces += [("\u2581" + word, -3.0) for word in ("a", "the", "of", "and", "in", "photo", "cat")]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _t5_encoder(tokenizer: T5TokenizerFast, **config: Any) -> T5EncoderModel:
    base: dict[str, Any] = {
        "vocab_size": max(len(tokenizer), 64),
        "feed_forward_proj": "gated-gelu",  # T5 v1.1, as FLUX and SD3 ship it
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "tie_word_embeddings": False,
        "is_encoder_decoder": False,
        "use_cache": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return T5EncoderModel(T5Config(**{**base, **config}))


def _t5_xxl(tokenizer: T5TokenizerFast) -> T5EncoderModel:
    """google/t5-v1_1-xxl's encoder: FLUX's and SD3's text_encoder (4.76B parameters)."""
    return _t5_encoder(tokenizer, vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)


def _tiny_t5(tokenizer: T5TokenizerFast, d_model: int) -> T5EncoderModel:
    return _t5_encoder(tokenizer, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4)


def _flux_pipeline(**components: Any) -> FluxPipeline:
    return FluxPipeline(image_encoder=None, feature_extractor=None, **components)


def _build_tiny_flux(guidance: bool) -> FluxPipeline:
    torch.manual_seed(_SEED)
    tokenizer = _byte_level_tokenizer()
    tokenizer_2 = _t5_tokenizer(512)
    pipe = _flux_pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(
            FLUX_DEV_SCHEDULER_CONFIG if guidance else FLUX_SCHNELL_SCHEDULER_CONFIG
        ),
        vae=_tiny_vae(**FLUX_VAE),
        text_encoder=_tiny_text_encoder(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=_tiny_t5(tokenizer_2, 32),
        tokenizer_2=tokenizer_2,
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels in 2x2 packed patches
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # the T5 encoder's width
            pooled_projection_dim=32,  # the CLIP encoder's
            guidance_embeds=guidance,
            axes_dims_rope=(4, 4, 8),
        ),
    )
    # FluxPipeline fixes its default size at 128 latents (1024 px); the tiny one is made for 64 px. Saved to
    # disk and loaded again, it is 1024 px again.
    pipe.default_sample_size = 8
    return pipe


def build_tiny_flux() -> FluxPipeline:
    return _build_tiny_flux(guidance=False)


def build_tiny_flux_dev() -> FluxPipeline:
    return _build_tiny_flux(guidance=True)


def build_tiny_sd3() -> StableDiffusion3Pipeline:
    torch.manual_seed(_SEED)
    tokenizer = _byte_level_tokenizer()
    tokenizer_2 = _byte_level_tokenizer(pad_token="!")
    tokenizer_3 = _t5_tokenizer(256)
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
        vae=_tiny_vae(latent_channels=16, **SD3_VAE),  # SD3's 16 latent channels (its inpainting pipeline needs them)
        text_encoder=_tiny_text_encoder(tokenizer, CLIPTextModelWithProjection, projection_dim=32),
        tokenizer=tokenizer,
        text_encoder_2=_tiny_text_encoder(tokenizer_2, CLIPTextModelWithProjection, projection_dim=32),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_tiny_t5(tokenizer_3, 64),
        tokenizer_3=tokenizer_3,
        transformer=SD3Transformer2DModel(
            sample_size=8,  # 8 latents x 8: native 64 px
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=64,  # the T5 width; the two CLIP widths side by side (32 + 32) are padded to it
            caption_projection_dim=32,
            pooled_projection_dim=64,  # both CLIP projections side by side
            pos_embed_max_size=64,  # sizes up to 64 patches x 2 x 8 = 1024 px
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ),
    )


def _flux_arch(device: torch.device, dtype: torch.dtype, guidance: bool) -> FluxPipeline:
    torch.manual_seed(_SEED)
    tokenizer = _byte_level_tokenizer()
    tokenizer_2 = _t5_tokenizer(512)
    with torch.device(device):
        text_encoder = _vit_l_text_encoder(tokenizer)
        text_encoder_2 = _t5_xxl(tokenizer_2)
        transformer = FluxTransformer2DModel(guidance_embeds=guidance)  # the defaults are FLUX.1's
        vae = _vae((128, 256, 512, 512), 2, 1024, latent_channels=16, **FLUX_VAE)
    pipe = _flux_pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(
            FLUX_DEV_SCHEDULER_CONFIG if guidance else FLUX_SCHNELL_SCHEDULER_CONFIG
        ),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return pipe.to(device=device, dtype=dtype)


def build_flux_arch(device: torch.device, dtype: torch.dtype) -> FluxPipeline:
    """FLUX.1-dev's exact architecture, random weights, made on ``device`` (24 GB in bfloat16: not in host RAM)."""
    return _flux_arch(device, dtype, guidance=True)


def build_flux_schnell_arch(device: torch.device, dtype: torch.dtype) -> FluxPipeline:
    return _flux_arch(device, dtype, guidance=False)


def _sd35_arch(device: torch.device, dtype: torch.dtype, **transformer: Any) -> StableDiffusion3Pipeline:
    torch.manual_seed(_SEED)
    tokenizer = _byte_level_tokenizer()
    tokenizer_2 = _byte_level_tokenizer(pad_token="!")
    tokenizer_3 = _t5_tokenizer(256)
    with torch.device(device):
        text_encoder = _vit_l_text_encoder(tokenizer, CLIPTextModelWithProjection)
        text_encoder_2 = _vit_big_g_text_encoder(tokenizer_2)
        text_encoder_3 = _t5_xxl(tokenizer_3)
        denoiser = SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            attention_head_dim=64,
            joint_attention_dim=4096,
            pooled_projection_dim=2048,
            qk_norm="rms_norm",
            **transformer,
        )
        vae = _vae((128, 256, 512, 512), 2, 1024, latent_channels=16, **SD3_VAE)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        transformer=denoiser,
    )
    return pipe.to(device=device, dtype=dtype)


def build_sd35_arch(device: torch.device, dtype: torch.dtype) -> StableDiffusion3Pipeline:
    """SD 3.5 large: 38 MMDiT blocks of 38 heads."""
    return _sd35_arch(
        device, dtype, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192
    )


def build_sd35_medium_arch(device: torch.device, dtype: torch.dtype) -> StableDiffusion3Pipeline:
    """SD 3.5 medium: 24 MMDiT-X blocks of 24 heads, the first 13 with a second (image-only) attention."""
    return _sd35_arch(
        device,
        dtype,
        num_layers=24,
        num_attention_heads=24,
        caption_projection_dim=1536,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
    )


# Z-Image-Turbo's scheduler_config.json: a fixed shift, no resolution shift.
ZIMAGE_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
# Qwen3's chat template, the part ZImagePipeline uses: one user turn, then the assistant's turn opened (with
# enable_thinking False, an empty thinking block).
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """A Qwen BPE tokenizer with the 256 byte-level symbols, Qwen's special tokens and its chat template: any text
    tokenizes, as with the real one."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(_byte_symbols()[:256] + specials))}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


# Qwen3-4B's shapes: Z-Image's and FLUX.2-klein-4B's text encoder.
QWEN3_4B = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
}


def _qwen3(tokenizer: Qwen2Tokenizer, cls: type = Qwen3Model, **config: Any) -> Any:
    """A Qwen3 model (``cls``: the bare model, or with its language-model head) whose vocabulary covers
    ``tokenizer``'s."""
    return cls(Qwen3Config(vocab_size=max(len(tokenizer), config.pop("vocab_size", 0)), **config))


def build_tiny_zimage() -> ZImagePipeline:
    torch.manual_seed(_SEED)
    tokenizer = _qwen_tokenizer()
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(ZIMAGE_SCHEDULER_CONFIG),
        vae=_tiny_vae(latent_channels=16, **FLUX_VAE),  # the FLUX.1 VAE's 16 channels and scaling
        text_encoder=_qwen3(
            tokenizer,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=1024,
        ),
        tokenizer=tokenizer,
        transformer=ZImageTransformer2DModel(
            in_channels=16,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=32,  # the text encoder's width
            axes_dims=[8, 4, 4],  # the head's 16 dimensions
            axes_lens=[1024, 64, 64],
        ),
    )
    # ZImagePipeline fixes its default size at 1024 px; the tiny one is made for 64 px (8 latents of the VAE's 8).
    # Saved to disk and loaded again, it is 1024 px again.
    pipe.default_sample_size = 8
    return pipe


def build_zimage_arch(device: torch.device, dtype: torch.dtype) -> ZImagePipeline:
    """Z-Image(-Turbo)'s shapes: the 6.15B transformer (diffusers' defaults are the released model's), Qwen3-4B's
    text encoder, the FLUX.1 VAE."""
    torch.manual_seed(_SEED)
    tokenizer = _qwen_tokenizer()
    with torch.device(device):
        text_encoder = _qwen3(tokenizer, **QWEN3_4B)
        transformer = ZImageTransformer2DModel()
        vae = _vae((128, 256, 512, 512), 2, 1024, latent_channels=16, **FLUX_VAE)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(ZIMAGE_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return pipe.to(device=device, dtype=dtype)


# FLUX.2's scheduler_config.json: the resolution shift comes from the pipeline's empirical mu.
FLUX2_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def _tiny_flux2_vae() -> AutoencoderKLFlux2:
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 16, 16),  # four blocks: the VAE's factor 8
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    # Batch-norm statistics the latents are normalised with: random, so the decode's un-normalising is tested.
    vae.bn.running_mean.normal_(0, 0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def _tiny_flux2_transformer(guidance: bool) -> Flux2Transformer2DModel:
    transformer = Flux2Transformer2DModel(
        in_channels=16,  # 4 latent channels in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,  # three layers of the 16-wide encoder side by side
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance,
    )
    # diffusers' initialisation leaves a transformer this small nearly blind to its context (reference images moved
    # no pixel by more than one grey level): larger weights, so every input visibly moves the output.
    generator = torch.Generator().manual_seed(_SEED)
    with torch.no_grad():
        for weight in (p for p in transformer.parameters() if p.ndim == 2):
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
    return transformer


def _build_tiny_flux2_klein(distilled: bool) -> Flux2KleinPipeline:
    torch.manual_seed(_SEED)
    tokenizer = _qwen_tokenizer()
    # Layers 9, 18 and 27 are read: 28 layers, each tiny.
    text_encoder = _qwen3(
        tokenizer,
        Qwen3ForCausalLM,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=28,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
    )
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX2_SCHEDULER_CONFIG),
        vae=_tiny_flux2_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=_tiny_flux2_transformer(guidance=False),
        is_distilled=distilled,
    )
    # Flux2KleinPipeline fixes its default size at 128 latents (1024 px); the tiny one is made for 64 px.
    pipe.default_sample_size = 8
    return pipe


def build_tiny_flux2_klein() -> Flux2KleinPipeline:
    return _build_tiny_flux2_klein(distilled=True)


def build_tiny_flux2_klein_base() -> Flux2KleinPipeline:
    return _build_tiny_flux2_klein(distilled=False)


def build_flux2_klein_4b_arch(device: torch.device, dtype: torch.dtype) -> Flux2KleinPipeline:
    """FLUX.2-klein-4B's shapes: 5 double-stream and 20 single-stream blocks of 24 heads, on Qwen3-4B's layers 9, 18
    and 27 side by side (7680 wide), the FLUX.2 VAE (32 latent channels)."""
    torch.manual_seed(_SEED)
    tokenizer = _qwen_tokenizer()
    with torch.device(device):
        text_encoder = _qwen3(tokenizer, Qwen3ForCausalLM, **QWEN3_4B)
        transformer = Flux2Transformer2DModel(
            num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False
        )
        vae = AutoencoderKLFlux2()  # diffusers' defaults are FLUX.2's VAE
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX2_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )
    return pipe.to(device=device, dtype=dtype)


# The format of Mistral Small 3's chat template, for text: the system prompt, then each user turn.
MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message.content is string %}{% set text = message.content %}"
    "{% else %}{% set text = message.content | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('') %}{% endif %}"
    "{% if message.role == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message.role == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
_MISTRAL3_SPECIALS = ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
# Mistral-Small-3.1-24B's shapes: FLUX.2-dev's text encoder (a Pixtral vision tower beside the language model).
MISTRAL3_SMALL_24B = {
    "text_config": {
        "model_type": "mistral",
        "vocab_size": 131072,
        "hidden_size": 5120,
        "intermediate_size": 32768,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rope_theta": 1e9,
    },
    "vision_config": {
        "model_type": "pixtral",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "head_dim": 64,
        "image_size": 1540,
        "patch_size": 14,
    },
    "spatial_merge_size": 2,
    "multimodal_projector_bias": False,
    "tie_word_embeddings": False,
}


def _mistral3_processor() -> Any:
    """FLUX.2-dev's ``tokenizer`` for text: a byte-level tokenizer (any text tokenizes) with Mistral's special
    tokens and the format of its chat template."""
    symbols = [*_byte_symbols()[:256], "<s>", "</s>", "<pad>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(symbols))}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": _MISTRAL3_SPECIALS})
    return PixtralTextProcessor(tokenizer=tokenizer, chat_template=MISTRAL3_CHAT_TEMPLATE)


def _mistral3(processor: Any, **config: Any) -> Mistral3ForConditionalGeneration:
    tokenizer = processor.tokenizer
    text = {**config.pop("text_config")}
    text["vocab_size"] = max(len(tokenizer), text.get("vocab_size", 0))
    image_token = tokenizer.convert_tokens_to_ids("[IMG]")
    return Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, image_token_index=image_token, **config))


def build_tiny_flux2_dev() -> Flux2Pipeline:
    torch.manual_seed(_SEED)
    processor = _mistral3_processor()
    # Layers 10, 20 and 30 are read: 30 layers, each tiny, and a one-layer vision tower.
    text_encoder = _mistral3(
        processor,
        text_config={
            "model_type": "mistral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 30,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "max_position_embeddings": 1024,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "head_dim": 8,
            "image_size": 64,
            "patch_size": 16,
        },
    )
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX2_SCHEDULER_CONFIG),
        vae=_tiny_flux2_vae(),
        text_encoder=text_encoder,
        tokenizer=processor,
        transformer=_tiny_flux2_transformer(guidance=True),
    )
    pipe.default_sample_size = 8  # 64 px, as the other tiny ones (Flux2Pipeline's own is 1024 px)
    return pipe


def build_flux2_dev_arch(device: torch.device, dtype: torch.dtype) -> Flux2Pipeline:
    """FLUX.2-dev's shapes: the 32B transformer (diffusers' defaults: 8 double-stream and 48 single-stream blocks of
    48 heads, guidance embedding) on Mistral-Small-3.1-24B's layers 10, 20 and 30 (15360 wide), the FLUX.2 VAE."""
    torch.manual_seed(_SEED)
    processor = _mistral3_processor()
    with torch.device(device):
        text_encoder = _mistral3(processor, **MISTRAL3_SMALL_24B)
        transformer = Flux2Transformer2DModel()
        vae = AutoencoderKLFlux2()
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX2_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=processor,
        transformer=transformer,
    )
    return pipe.to(device=device, dtype=dtype)


# Qwen-Image's scheduler_config.json: dynamic shifting over the FLUX range, shift 1 (the mu does the shifting).
QWENIMAGE_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}

# Qwen2.5-VL-7B-Instruct's shapes: Qwen-Image's text encoder (its vision tower is loaded, never run here).
QWEN25_VL_7B_TEXT = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128000,
    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
}
QWEN25_VL_7B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "fullatt_block_indexes": [7, 15, 23, 31],
}


def _qwen25_vl(tokenizer: Qwen2Tokenizer, text: dict[str, Any], vision: dict[str, Any], **config: Any) -> Any:
    text = {**text, "vocab_size": max(len(tokenizer), text.get("vocab_size", 0))}
    text |= {"bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **config))


QWEN_VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]


def _qwen_vl_processor() -> QwenVLImageProcessor:
    """Qwen2.5-VL's processor for Qwen-Image-Edit: the byte-level Qwen tokenizer with the vision tokens, and the
    image processor's defaults (14 px patches, 2x2 merged)."""
    tokenizer = _qwen_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *QWEN_VISION_TOKENS]})
    return QwenVLImageProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer)


def _vision_token_ids(tokenizer: Qwen2Tokenizer) -> dict[str, int]:
    start, pad, end = (tokenizer.convert_tokens_to_ids(token) for token in QWEN_VISION_TOKENS)
    return {"vision_start_token_id": start, "image_token_id": pad, "vision_end_token_id": end}


TINY_QWEN25_VL_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1000000.0},
}
TINY_QWEN25_VL_VISION = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32}


def _qwenimage(cls: type, full_size_on: torch.device | None = None) -> Any:
    """A Qwen-Image pipeline of class ``cls``: tiny (a one-layer vision tower, 64 px), or with the released shapes
    on ``full_size_on`` (the transformer and VAE are diffusers' defaults, the encoder Qwen2.5-VL-7B). The edit
    pipelines also get the vision-language processor: their encoder sees the input images."""
    torch.manual_seed(_SEED)
    edit = cls is not QwenImagePipeline
    processor = _qwen_vl_processor() if edit else None
    tokenizer = processor.tokenizer if processor is not None else _qwen_tokenizer()
    vision_ids = _vision_token_ids(tokenizer) if edit else {}
    if full_size_on is None:
        text_encoder = _qwen25_vl(tokenizer, TINY_QWEN25_VL_TEXT, TINY_QWEN25_VL_VISION, **vision_ids)
        transformer = QwenImageTransformer2DModel(
            in_channels=64,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # the text encoder's width
            axes_dims_rope=(4, 6, 6),  # the head's 16 dimensions
        )
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    else:
        with torch.device(full_size_on):
            text_encoder = _qwen25_vl(tokenizer, QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION, **vision_ids)
            transformer, vae = QwenImageTransformer2DModel(), AutoencoderKLQwenImage()
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(QWENIMAGE_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        **({"processor": processor} if processor is not None else {}),
    )
    if full_size_on is None:
        # The pipelines fix their default size at 1024 px; the tiny ones are made for 64 px (8 latents of the VAE's
        # 8). Saved to disk and loaded again, they are 1024 px again.
        pipe.default_sample_size = 8
    return pipe


def build_tiny_qwenimage() -> QwenImagePipeline:
    return _qwenimage(QwenImagePipeline)


def build_tiny_qwenimage_edit() -> QwenImageEditPipeline:
    """Qwen-Image-Edit's pipeline (the first release): one input image."""
    return _qwenimage(QwenImageEditPipeline)


def build_tiny_qwenimage_edit_plus() -> QwenImageEditPlusPipeline:
    """Qwen-Image-Edit-2509/2511's pipeline: one to three input images."""
    return _qwenimage(QwenImageEditPlusPipeline)


def build_qwenimage_arch(device: torch.device, dtype: torch.dtype) -> QwenImagePipeline:
    """Qwen-Image's shapes: the 20.4B transformer, Qwen2.5-VL-7B and the Qwen-Image VAE."""
    return _qwenimage(QwenImagePipeline, device).to(device=device, dtype=dtype)


def build_qwenimage_edit_plus_arch(device: torch.device, dtype: torch.dtype) -> QwenImageEditPlusPipeline:
    """Qwen-Image-Edit-2509/2511's shapes: Qwen-Image's, with the encoder's vision tower run on each input image."""
    return _qwenimage(QwenImageEditPlusPipeline, device).to(device=device, dtype=dtype)
