"""The weight memory each full-size model needs, counted from its builtin on the meta device (no weights are made):
the README's weight-memory table, printed as Markdown.

    python bench/memory.py

Weights only: activations, which grow with --max_batch_size and the image size, come on top. The float8 figures
count every denoiser weight at one byte (diffusers' layerwise casting keeps its few normalisation and embedding
weights in --dtype, a fraction of a percent more).
"""

from __future__ import annotations

import torch

from predictor.families import build_builtin

# (label, builtin): the full-size builtins whose families offer --storage_dtype and --offload_text_encoders.
MODELS = (
    ("FLUX.1-dev", "flux-arch"),
    ("SD 3.5 large", "sd35-arch"),
    ("Z-Image(-Turbo)", "zimage-arch"),
    ("FLUX.2-klein-4B", "flux2-klein-4b-arch"),
    ("FLUX.2-dev", "flux2-dev-arch"),
    ("Qwen-Image", "qwenimage-arch"),
)
HEADER = (
    "| model | denoiser, bfloat16 | denoiser, float8 | text encoders + VAE, bfloat16 | total, bfloat16 "
    "| total, float8 denoiser | on the GPU with `--offload_text_encoders`, float8 denoiser |"
)


def _gigabytes(parameters: int, bytes_each: int) -> float:
    return parameters * bytes_each / 1e9


def rows() -> list[str]:
    lines = []
    for label, name in MODELS:
        pipe = build_builtin(name, torch.device("meta"), torch.bfloat16)
        counts = {
            component_name: sum(p.numel() for p in component.parameters())
            for component_name, component in pipe.components.items()
            if isinstance(component, torch.nn.Module)
        }
        denoiser = counts.pop("transformer", 0) + counts.pop("unet", 0)
        vae = counts.pop("vae")
        rest = sum(counts.values()) + vae  # the text encoders and the VAE
        cells = (
            _gigabytes(denoiser, 2),
            _gigabytes(denoiser, 1),
            _gigabytes(rest, 2),
            _gigabytes(denoiser, 2) + _gigabytes(rest, 2),
            _gigabytes(denoiser, 1) + _gigabytes(rest, 2),
            _gigabytes(denoiser, 1) + _gigabytes(vae, 2),
        )
        lines.append(f"| {label} (`{name}`) | " + " | ".join(f"{cell:.1f} GB" for cell in cells) + " |")
    return lines


def table() -> str:
    return "\n".join([HEADER, "|---|---:|---:|---:|---:|---:|---:|", *rows()])


if __name__ == "__main__":
    print(table())
