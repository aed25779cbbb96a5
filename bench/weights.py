"""What each way of delivering the weights moves, for a full-size builtin saved as a Hub repository holds it.

A diffusers repository on the Hub holds each component several times: float32 safetensors, a pickled ``.bin``
copy and an fp16 variant (and often Flax, ONNX or single-file checkpoints, not made here, so the "whole" figure is
a floor). The server reads one of them (``predictor.weights``). Prints the bytes for a storageUri without
patterns (everything), with STORAGE_ALLOW_PATTERNS, and in a modelcar image.

    python bench/weights.py                               # builtin:sd-v1-arch, about 1 minute and 11 GB of disk
    python bench/weights.py --model_id builtin:tiny       # seconds
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from predictor.loading import load_pipeline
from predictor.weights import plan, stage

# The pickle each component's loader would write (what older repositories hold beside the safetensors).
_PICKLE_NAMES = {"text_encoder": "pytorch_model.bin", "unet": "diffusion_pytorch_model.bin"}


def save_like_the_hub(model_id: str, root: Path) -> None:
    pipe = load_pipeline(None, model_id, None, "cpu", "float32").pipe
    pipe.save_pretrained(root, safe_serialization=True)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            torch.save(module.state_dict(), root / name / _PICKLE_NAMES.get(name, "diffusion_pytorch_model.bin"))
    pipe.to(dtype=torch.float16).save_pretrained(root, safe_serialization=True, variant="fp16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_id", default="builtin:sd-v1-arch")
    parser.add_argument("--out", default=None, help="where to save it (default: a temporary directory, removed)")
    options = parser.parse_args()
    root = Path(options.out or tempfile.mkdtemp(prefix="weights-bench-"))
    try:
        started = time.perf_counter()
        save_like_the_hub(options.model_id, root / "repo")
        print(f"saved {options.model_id} in {time.perf_counter() - started:.0f} s")
        repo = root / "repo"
        rows = []
        for variant in ("auto", "none"):
            result = plan(repo, variant)
            staged = root / f"staged-{variant}"
            stage(repo, staged, variant)
            rows.append((result.variant or "plain", len(result.needed), result.needed_bytes))
        whole = plan(repo)
        print(f"\n{options.model_id}: bytes each path moves at a cold start")
        print(f"{'path':<62}{'files':>7}{'GB':>9}{'vs whole':>10}")
        print(
            f"{'storageUri hf:// without patterns (every file)':<62}{whole.whole_files:>7}"
            f"{whole.whole_bytes / 1e9:>9.2f}{1.0:>9.2f}x"
        )
        for variant, files, size in rows:
            label = f"allow patterns or modelcar image, {variant} weights"
            print(f"{label:<62}{files:>7}{size / 1e9:>9.2f}{size / whole.whole_bytes:>9.2f}x")
    finally:
        if options.out is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
