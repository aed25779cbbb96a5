"""Start-up work that overlaps the imports of the serving stack.

Importing torch, diffusers, transformers and kserve takes most of a cold start (about 10 s on a GPU host), and
the interpreter is busy with it all that time. Two other parts of a start wait on the kernel and the driver
rather than on the interpreter, so they run beside the imports in a background thread instead of after them:

- reading the weight files into the page cache (asked of the kernel; no bytes pass through Python), so
  ``from_pretrained`` finds them in memory even on a cold disk;
- starting CUDA: the context, and the cuBLAS, cuDNN and attention libraries a first generation would otherwise
  load inside the warm-up.

Neither is needed for correctness: the loader does the same on its own, and any failure here is only logged.
``PREDICTOR_EARLY_DEVICE_START=0`` turns the CUDA part off.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt")


def prefetch_weights(model_dir: str | None) -> int:
    """Ask the kernel to read the pipeline's files ahead; returns how many bytes were asked for."""
    if not model_dir or not hasattr(os, "posix_fadvise"):
        return 0
    root = Path(model_dir)
    if not (root / "model_index.json").is_file():
        return 0
    asked = 0
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not path.name.endswith(_WEIGHT_SUFFIXES):
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            asked += os.fstat(fd).st_size
        except OSError:
            pass
        finally:
            os.close(fd)
    return asked


def start_device(dtype_flag: str) -> bool:
    """Create the CUDA context and load the libraries the first generation needs. False: no CUDA here."""
    import torch

    if not torch.cuda.is_available():
        return False
    torch.cuda.init()
    dtype = torch.float32 if dtype_flag == "float32" else torch.bfloat16 if dtype_flag == "bfloat16" else torch.float16
    with torch.inference_mode():
        x = torch.randn(64, 64, device="cuda", dtype=dtype)
        (x @ x).sum()  # cuBLAS (and cuBLASLt) loaded, a handle made
        image = torch.randn(1, 8, 16, 16, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
        weight = torch.randn(8, 8, 3, 3, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
        torch.nn.functional.conv2d(image, weight, padding=1)  # cuDNN loaded, a handle made
        q = torch.randn(1, 1, 64, 64, device="cuda", dtype=dtype)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    torch.cuda.synchronize()
    return True


def start_in_background(model_dir: str | None, device_flag: str, dtype_flag: str) -> threading.Thread:
    """Prefetch the weights and start CUDA while the caller goes on importing."""

    def run() -> None:
        started = time.perf_counter()
        try:
            asked = prefetch_weights(model_dir)
            if asked:
                logger.info("prefetching %.1f GB of weights from %s", asked / 1e9, model_dir)
            early_cuda = os.environ.get("PREDICTOR_EARLY_DEVICE_START", "1") != "0"
            if early_cuda and device_flag != "cpu" and start_device(dtype_flag):
                logger.info("CUDA started in the background in %.1f s", time.perf_counter() - started)
        except Exception as exc:  # the loader repeats all of this and reports real errors
            logger.debug("background start-up failed: %s", exc, exc_info=True)

    thread = threading.Thread(target=run, name="early-start", daemon=True)
    thread.start()
    return thread
