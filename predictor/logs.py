"""Third-party log records that read like faults but report nothing wrong, filtered in one place."""

from __future__ import annotations

import logging

# logger name -> the start of (or a phrase in) each message to drop, and why.
_QUIET: dict[str, tuple[str, ...]] = {
    # diffusers warns, at every scheduler made from another class's config, that the other class's fields are
    # ignored: with a scheduler per request that would be a warning per request, about nothing wrong.
    "diffusers.configuration_utils": ("but are not expected and will be ignored",),
    # transformers warns, once per class, that image processors fall back to PIL without torchvision; this server
    # uses no torchvision backend.
    "transformers.utils.import_utils": ("requires torchvision",),
    # diffusers warns about every component a LoRA adapter leaves alone (most adapters touch no text encoder).
    "diffusers.loaders.peft": ("No LoRA keys associated to",),
    "diffusers.loaders.lora_base": ("No LoRA keys associated to",),
}


class _Quiet(logging.Filter):
    def __init__(self, phrases: tuple[str, ...]) -> None:
        super().__init__()
        self.phrases = phrases

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(phrase in message for phrase in self.phrases)


def quiet_third_party() -> None:
    """Install the filters (once: calling again adds nothing)."""
    for name, phrases in _QUIET.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Quiet) for f in logger.filters):
            logger.addFilter(_Quiet(phrases))
