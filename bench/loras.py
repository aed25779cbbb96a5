"""Per-request LoRA adapters under concurrent load: what adapters cost, and the two ways to batch them.

Makes --adapters random LoRA adapters (rank --rank) for the model, starts the real server with them in --lora_dir
(one process per configuration, the same flags otherwise) and drives POST /generate with N concurrent clients,
measuring side by side in one run:

- no adapters: the same load with no 'loras' in the requests;
- adapters, mixed: each client's requests name one of the adapters, rows with different adapters share a denoiser
  call (--lora_batching mixed, the default);
- adapters, grouped: the same requests, a call per adapter set (--lora_batching grouped);
- adapters, serial: the same requests one at a time (--max_batch_size 1);
- half with adapters: every other request names none, the others one each (mixed): the latency of the requests
  without adapters, against the first configuration's, is what sharing calls with adapted rows costs them.

With --compile, three more (each server compiles before it is ready; the compiled-graphs gauge is read when it
says ready and after the load, and must not have moved):

- compiled, no adapters / compiled, adapters: the first two above under --compile (adapters in fixed slots);
- compiled, swapping: two slots for the four adapters, one adapter a request: adapters swap in and out all along.

Last, the time to put an adapter into the model (a swap: the least recently used one out, the file read, the
weights in), in this process: eager (PEFT's layers) and into --compile's slots.

    python bench/loras.py                                        # CPU: builtin:tiny, 64x64, 8 clients, 4 adapters
    python bench/loras.py --compile                              # and the compiled configurations
    python bench/loras.py --model_id builtin:sdxl-arch --size 1024 --steps 30 --clients 16 --requests 64 --compile
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import measure_server, median


def make_adapters(model_id: str, directory: Path, count: int, rank: int, device: str | None = None) -> list[str]:
    """``count`` random adapters of ``rank`` for a builtin, saved in ``directory`` as adapter-0, adapter-1, ..."""
    import torch

    from predictor.families import BUILTIN_PREFIX, build_builtin
    from predictor.testing import save_random_lora

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = build_builtin(model_id.removeprefix(BUILTIN_PREFIX), device, dtype)
    names = [f"adapter-{index}" for index in range(count)]
    for index, name in enumerate(names):
        save_random_lora(pipe, directory, name, seed=index, rank=rank, alpha=rank)
    del pipe
    return names


def measure_swaps(model_id: str, directory: Path, names: list[str], rounds: int) -> dict[str, float]:
    """Median seconds to bring an adapter into the model, one slot (or one loaded adapter) for all of them, so every
    call swaps: into --compile's slots, then eagerly into PEFT's layers. Also how much memory the slots take."""
    import torch

    from predictor.loading import LoadedPipeline, load_pipeline
    from predictor.logs import install_log_filters
    from predictor.lora import RowAdapters

    install_log_filters()  # in this process as in the server's: no line per component an adapter leaves alone

    def fresh() -> LoadedPipeline:
        return load_pipeline(None, model_id, None, lora_dir=str(directory))

    def adapters(loaded: LoadedPipeline, slots: bool) -> RowAdapters:
        return RowAdapters(loaded.pipe, loaded.denoiser, loaded.loras, max_loaded=1, slots=slots)

    loaded = fresh()
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)

    def swaps(adapters: RowAdapters) -> list[float]:
        times = []
        for turn in range(rounds * len(names)):
            sync()
            started = time.perf_counter()
            failed = adapters.load([((names[turn % len(names)], 1.0),)])
            sync()
            times.append(time.perf_counter() - started)
            assert not failed, failed
        return times[len(names) :]  # the first round reads files from disk; the rest from the page cache

    with torch.inference_mode():
        slotted = adapters(loaded, slots=True)
        started = time.perf_counter()
        slotted.install_for_compile(max_rows=16)
        install_s = time.perf_counter() - started
        slot_s, slot_bytes = median(swaps(slotted)), slotted.slot_bytes
        del slotted, loaded
        eager_s = median(swaps(adapters(fresh(), slots=False)))
    return {"slots": slot_s, "eager": eager_s, "install": install_s, "slot_mib": slot_bytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_id", default="builtin:tiny", help="a builtin (its adapters are made here)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, help="default: 2 for the tiny builtins (their layers are 32-64 wide), 16")
    parser.add_argument("--batch", type=int, default=8, help="--max_batch_size of the batching configurations")
    parser.add_argument("--compile", action="store_true", help="also the compiled configurations (slow to start)")
    parser.add_argument("--swap_rounds", type=int, default=3, help="adapter swaps timed: this many per adapter")
    parser.add_argument("--log", help="write each server's log to LOG.bsN.log")
    parser.add_argument("server_args", nargs="*", help="more server flags, after --")
    options = parser.parse_args()
    rank = options.rank or (2 if "tiny" in options.model_id else 16)

    with tempfile.TemporaryDirectory() as scratch:
        names = make_adapters(options.model_id, Path(scratch), options.adapters, rank)
        plain = {"prompt": "a lighthouse at dusk", "num_inference_steps": options.steps}
        plain |= {"width": options.size, "height": options.size, "seed": 1}
        adapted = [{**plain, "seed": index, "loras": [{"name": name}]} for index, name in enumerate(names)]
        server_args = list(options.server_args)
        configurations = {
            "no adapters": (options.batch, plain, ["--lora_dir", scratch]),
            "adapters, mixed": (options.batch, adapted, ["--lora_dir", scratch, "--lora_batching", "mixed"]),
            "adapters, grouped": (options.batch, adapted, ["--lora_dir", scratch, "--lora_batching", "grouped"]),
            "adapters, serial": (1, adapted, ["--lora_dir", scratch]),
            "half with adapters": (
                options.batch,
                [item for other in adapted for item in (plain, other)],
                ["--lora_dir", scratch],
            ),
        }
        if options.compile:
            compiled = ["--lora_dir", scratch, "--compile"]
            configurations |= {
                "compiled, no adapters": (options.batch, plain, compiled),
                "compiled, adapters": (options.batch, adapted, compiled),
                "compiled, swapping": (
                    options.batch,
                    adapted,
                    [*compiled, "--max_loaded_loras", "2", "--max_loras_per_request", "1"],
                ),
            }
        results = {}
        by_body: dict[int, list[float]] = {}
        for label, (batch, body, flags) in configurations.items():
            results[label] = measure_server(
                options.model_id,
                batch,
                body,
                options.clients,
                options.requests,
                [*server_args, *flags],
                options.log,
                by_body if label == "half with adapters" else None,
            )
            found = results[label]
            graphs = f"  graphs {found['graphs_ready']:.0f} -> {found['graphs_after']:.0f}"
            print(
                f"{label:21s} {found['images_per_s']:7.2f} images/s  p50 {found['p50']:.2f} s  p95 {found['p95']:.2f} s"
                f"  lone {found['lone']:.3f} s  CPU {found['cpu_ms_per_image']:.1f} ms/image"
                + (graphs if "compiled" in label else ""),
                flush=True,
            )
        swaps = measure_swaps(options.model_id, Path(scratch), names, options.swap_rounds)
    base = results["no adapters"]["images_per_s"]
    print(
        f"model {options.model_id}, {options.size}x{options.size}, {options.steps} steps, {options.clients} clients, "
        f"{options.requests} requests, {options.adapters} adapters of rank {rank}"
    )
    for label in ("adapters, mixed", "adapters, grouped"):
        rate = results[label]["images_per_s"]
        serial = results["adapters, serial"]["images_per_s"]
        print(f"{label}: {rate / base:.2f}x the throughput without adapters, {rate / serial:.2f}x serial")
    if options.compile:
        compiled_base = results["compiled, no adapters"]["images_per_s"]
        for label in ("compiled, adapters", "compiled, swapping"):
            rate = results[label]["images_per_s"]
            print(f"{label}: {rate / compiled_base:.2f}x compiled without adapters, {rate / base:.2f}x eager without")
        print(f"compiled, no adapters: {compiled_base / base:.2f}x eager without adapters")
    print(
        f"adapter swap (one out, one in): {swaps['slots'] * 1000:.1f} ms into --compile's slots, "
        f"{swaps['eager'] * 1000:.1f} ms eager; reading all {options.adapters} to make the slots: "
        f"{swaps['install']:.2f} s, slots of 1 adapter: {swaps['slot_mib']:.1f} MiB"
    )
    plain_in_mix = median([latency for index, found in by_body.items() if index % 2 == 0 for latency in found])
    alone = results["no adapters"]["p50"]
    print(
        f"requests without adapters, half the load naming one: p50 {plain_in_mix:.2f} s against {alone:.2f} s "
        f"with no adapters anywhere ({plain_in_mix / alone:.2f}x)"
    )


if __name__ == "__main__":
    main()
