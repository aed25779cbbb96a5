"""Time one UNet call under settings that change the kernels, side by side, before paying for a compile.

For ``builtin:sd-v1-arch`` at 512x512 in float16 (eager, so each variant costs seconds, not a compile): the
UNet as the server loads it; with fused QKV projections (one matrix product for q, k and v); with cuDNN
benchmarking its convolution algorithms. Variants alternate in rounds (this host's speed drifts), each figure the
median of CUDA-event timings. Matrix products and convolutions are library calls in inductor's output too, so
a gain here carries over to ``--compile``.

    python bench/unet_variants.py --rows 2 16
"""

from __future__ import annotations

import argparse
import statistics

import torch

from predictor.loading import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_id", default="builtin:sd-v1-arch")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5)
    options = parser.parse_args()
    loaded = load_pipeline(None, options.model_id, None)
    pipe, device, dtype = loaded.pipe, loaded.device, loaded.dtype
    latent = options.size // pipe.vae_scale_factor
    context = pipe.text_encoder.config.hidden_size

    def inputs(rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            torch.randn(rows, pipe.unet.config.in_channels, latent, latent, device=device, dtype=dtype),
            torch.full((rows,), 500.0, device=device),
            torch.randn(rows, pipe.tokenizer.model_max_length, context, device=device, dtype=dtype),
        )

    def timed(rows: int) -> float:
        sample, t, hidden = inputs(rows)
        pipe.unet(sample, t, encoder_hidden_states=hidden)  # warm: algorithm choice, lazy kernel loading
        if device.type != "cuda":
            return 0.0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(options.calls):
            pipe.unet(sample, t, encoder_hidden_states=hidden)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / options.calls

    fused_now = False

    def base() -> None:
        nonlocal fused_now
        if fused_now:
            pipe.unfuse_qkv_projections(vae=False)
            fused_now = False
        torch.backends.cudnn.benchmark = False

    def fused() -> None:
        nonlocal fused_now
        base()
        pipe.fuse_qkv_projections(vae=False)
        fused_now = True

    def cudnn_benchmark() -> None:
        base()
        torch.backends.cudnn.benchmark = True

    variants = {"as loaded": base, "fused qkv": fused, "cudnn benchmark": cudnn_benchmark}
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for _ in range(options.rounds):
            for name, apply in variants.items():
                apply()
                for rows in options.rows:
                    times.setdefault((name, rows), []).append(timed(rows))
    base()
    for rows in options.rows:
        reference = statistics.median(times[("as loaded", rows)])
        for name in variants:
            ms = statistics.median(times[(name, rows)])
            ratio = ms / reference if reference else float("nan")
            print(f"UNet call, {rows:>2} rows, {name:<16} {ms:8.2f} ms   {ratio:.3f}x as loaded")


if __name__ == "__main__":
    main()
