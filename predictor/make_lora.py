"""Make a LoRA adapter with random weights for a model: a test adapter, offline, for trying per-request LoRA on
the builtin models (or any pipeline) without downloading one. It changes the picture from the first step and means
nothing; it is saved in diffusers' format by the pipeline's own ``save_lora_weights``, as a trained one would be.

    python -m predictor.make_lora --model_id builtin:tiny --out ./loras --name style
    python -m predictor --model_id builtin:tiny --lora_dir ./loras     # requests may name "style"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def save_random_lora(
    pipe: Any, directory: Any, name: str, seed: int, rank: int = 4, alpha: int = 8, text_encoders: bool = False
) -> Any:
    """A LoRA adapter with random weights for ``pipe``'s denoiser (attention projections; SD's convolutional
    proj_in too) and, with ``text_encoders``, its CLIP encoders, made with PEFT and saved by the pipeline class's own
    ``save_lora_weights`` (diffusers' format) as ``directory/name.safetensors``. Returns the file's path."""
    import copy
    import inspect

    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    flow = hasattr(pipe, "transformer") and getattr(pipe, "transformer", None) is not None
    denoiser = copy.deepcopy(pipe.transformer if flow else pipe.unet)
    targets = ["to_q", "to_k", "to_v", "to_out.0"] + ([] if flow else ["proj_in"])
    # init_lora_weights=False: B is random too, so the adapter changes the output from the first step.
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
    component = "transformer" if flow else "unet"
    # The adapter's config goes into the file's metadata, as diffusers' training scripts write it: lora_alpha lives
    # nowhere else in a file of diffusers' format.
    layers = {
        f"{component}_lora_layers": get_peft_model_state_dict(denoiser),
        f"{component}_lora_adapter_metadata": denoiser.peft_config["default"].to_dict(),
    }
    # Z-Image's loader takes adapters for its transformer alone.
    takes_encoders = "text_encoder_lora_layers" in inspect.signature(type(pipe).save_lora_weights).parameters
    if text_encoders and takes_encoders:
        for component in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, component, None)
            if encoder is None or (component == "text_encoder_2" and flow):  # FLUX's second encoder is T5
                continue
            encoder = copy.deepcopy(encoder)
            config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            encoder.add_adapter(config)
            layers[f"{component}_lora_layers"] = get_peft_model_state_dict(encoder)
            layers[f"{component}_lora_adapter_metadata"] = config.to_dict()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(directory, weight_name=f"{name}.safetensors", **layers)
    return directory / f"{name}.safetensors"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m predictor.make_lora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model_id", default="builtin:tiny", help="a builtin (builtin:NAME) or a pipeline directory")
    parser.add_argument("--out", required=True, help="the adapters' folder (--lora_dir); made if missing")
    parser.add_argument("--name", required=True, help="the adapter's name: the file NAME.safetensors")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text_encoders", action="store_true", help="adapters for the CLIP text encoders too")
    options = parser.parse_args(argv)

    import torch

    from predictor.families import BUILTIN_PREFIX, build_builtin

    if options.model_id.startswith(BUILTIN_PREFIX):
        pipe = build_builtin(options.model_id.removeprefix(BUILTIN_PREFIX), torch.device("cpu"), torch.float32)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(options.model_id, use_safetensors=True, local_files_only=True)
    path = save_random_lora(
        pipe, options.out, options.name, seed=options.seed, rank=options.rank, text_encoders=options.text_encoders
    )
    print(f"wrote {path}: a random adapter for {options.model_id} (a test adapter; it means nothing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
