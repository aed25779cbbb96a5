"""What reference images cost a batch (models that edit by reference, FLUX.2-klein, Qwen-Image-Edit): one server
with step-level batching and one serial (--max_batch_size 1), each driven by N concurrent clients with the same
request mixes, side by side in one run:

- text: prompts alone;
- 1 reference, 2 references: edits, every request with the same references' sizes (they share calls);
- text + 1 reference: half of each, which share no call (reference tokens lengthen the sequence).

An edit-only checkpoint (Qwen-Image-Edit) runs the edits alone, against one reference.

    python bench/references.py                                        # CPU: builtin:tiny-flux2-klein, 64x64
    python bench/references.py --model_id builtin:flux2-klein-4b-arch --size 1024 --clients 16 --requests 64
    python bench/references.py --model_id builtin:tiny-qwenimage-edit-plus --requests 16
"""

from __future__ import annotations

import argparse

import httpx
from common import measure_load, picture, running_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_id", default="builtin:tiny-flux2-klein")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=8)
    options = parser.parse_args()

    reference = picture(options.size)
    text = {"prompt": "a lighthouse at dusk", "num_inference_steps": options.steps}
    text |= {"width": options.size, "height": options.size}
    one = {**text, "image": reference}
    two = {**text, "image": [reference, reference]}
    mixes = {"text": text, "1 reference": one, "2 references": two, "text + 1 reference": [text, one]}

    results: dict[tuple[str, int], dict[str, float]] = {}
    for batch in (options.batch_size, 1):
        flags = ("--model_id", options.model_id, "--model_dir", "/nonexistent", "--max_batch_size", str(batch))
        with running_server(*flags, "--max_queue", "64", "--warmup_steps", "0") as server:
            modes = httpx.get(f"{server.base}/v1/models/sd/schedulers", timeout=30).json()["modes"]
            if "text" not in modes:  # an edit-only checkpoint (Qwen-Image-Edit): edits alone, the first the baseline
                mixes = {"1 reference": one, "2 references": two}
            for name, body in mixes.items():
                results[(name, batch)] = measure_load(server, body, options.clients, options.requests)

    print(
        f"\nmodel {options.model_id}, {options.size}x{options.size}, {options.steps} steps, {options.clients} clients"
    )
    baseline = next(iter(mixes))
    print(f"{'requests':22}{'batching img/s':>16}{'serial img/s':>14}{'batching/serial':>17}{'vs ' + baseline:>19}")
    text_rate = results[(baseline, options.batch_size)]["images_per_s"]
    for name in mixes:
        batched, serial = results[(name, options.batch_size)]["images_per_s"], results[(name, 1)]["images_per_s"]
        print(f"{name:22}{batched:16.2f}{serial:14.2f}{batched / serial:16.2f}x{batched / text_rate:18.2f}x")


if __name__ == "__main__":
    main()
