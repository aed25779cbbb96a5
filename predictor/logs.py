"""Filters for third-party log records that report nothing wrong, installed in one place.

``install_log_filters`` is called once by the entry point (``python -m predictor``) and by the test suite; a
library user who wants the same quiet calls it too. Calling it again adds nothing.
"""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    """Drops records whose message contains any of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


# logger name -> what its noise says
_NOISE: dict[str, tuple[str, ...]] = {
    # A scheduler made from another class's config (one per request) warns that the other class's fields are
    # ignored: a warning per request about nothing wrong.
    "diffusers.configuration_utils": ("but are not expected and will be ignored",),
    # Every pipeline component a LoRA adapter leaves alone (most adapters touch no text encoder) gets a line.
    "diffusers.loaders.peft": ("No LoRA keys associated to",),
    "diffusers.loaders.lora_base": ("No LoRA keys associated to",),
    # Image processors fall back to PIL without torchvision, once per class; this server uses no torchvision
    # backend, so the warning only reads like an error.
    "transformers.utils.import_utils": ("requires torchvision",),
}


def install_log_filters() -> None:
    """Quiet the third-party warnings above, and FastAPI's deprecation of the ORJSONResponse KServe's v1 routes
    answer with (a multi-line warning on the first v1 request, about code this server does not own); idempotent."""
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    for name, fragments in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(*fragments))
