"""What an exception says about the accelerator: out of memory (recoverable), or failed (restart the process).

Torch only: the engine, the runner and LoRA loading all ask these, and none of them is above this module.
"""

from __future__ import annotations

import torch

_DEVICE_ERRORS: tuple[type[BaseException], ...] = (
    (torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()
)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def is_device_error(exc: BaseException) -> bool:
    """An error raised by the accelerator itself (out-of-memory reported as one included)."""
    return isinstance(exc, _DEVICE_ERRORS)


def is_device_failure(exc: BaseException) -> bool:
    """An unrecoverable accelerator error (an out-of-memory reported as one is recoverable)."""
    return is_device_error(exc) and not is_oom(exc)
