"""The adapters of ``--lora_dir``: one per ``.safetensors`` file, named by its stem.

Each file is checked at start (name, no link out of the directory, size, a readable safetensors header with LoRA
weights). A file that fails is listed with the reason and refused by name; one that turns out not to fit the model
at first use (another family's, another architecture's) is refused from then on. When a request naming an adapter
not in the model is parsed, the kernel is asked to read its file ahead (``prefetch``), so the worker's read comes
from memory. The library is shared by the request threads (checks, prefetch, listing) and the worker (loading).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from predictor.errors import InvalidRequest, LoadError
from predictor.request import LORA_NAME_PATTERN

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
_NAME = re.compile(LORA_NAME_PATTERN)

# A request's adapters: (name, scale) in the order given (PEFT adds active adapters in that order).
LoraSet = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path
    bytes: int
    refused: str | None = None  # why it cannot be used; None: usable

    def describe(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "bytes": self.bytes, "available": self.refused is None}
        if self.refused is not None:
            entry["reason"] = self.refused
        return entry


class LoraLibrary:
    """The adapters of ``--lora_dir``, read once at start."""

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._files: dict[str, LoraFile] = {}
        self._loaded: set[str] = set()  # in the model now (the worker's, read by prefetch and the listing)
        self._scan()

    def _scan(self) -> None:
        if not self.directory.is_dir():
            raise LoadError(f"--lora_dir '{self.directory}' is not a directory")
        root = self.directory.resolve()
        for path in sorted(self.directory.iterdir()):
            if path.suffix != SUFFIX or path.name.startswith("."):
                continue
            name = path.stem
            lora = LoraFile(name, path, 0, self._why_refused(path, root))
            if lora.refused is None:
                lora = LoraFile(name, path, path.stat().st_size)
            self._files[name] = lora
        usable = [lora.name for lora in self._files.values() if lora.refused is None]
        logger.info("LoRA adapters in %s: %s", self.directory, ", ".join(usable) or "none")
        for lora in self._files.values():
            if lora.refused is not None:
                logger.warning("LoRA file %s refused: %s", lora.path.name, lora.refused)

    def _why_refused(self, path: Path, root: Path) -> str | None:
        if not _NAME.match(path.stem):
            return "its name must be letters, digits, '.', '_' and '-' (at most 128), starting with a letter or digit"
        real = path.resolve()
        if not real.is_relative_to(root):
            return "a link to a file outside --lora_dir"
        if not real.is_file():
            return "not a regular file"
        size = real.stat().st_size
        if size > self.max_bytes:
            return f"{size} bytes, over --max_lora_bytes ({self.max_bytes})"
        try:
            from safetensors import safe_open

            with safe_open(str(real), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception as exc:  # safetensors raises its own error types for a bad header
            return f"not a readable safetensors file ({type(exc).__name__})"
        if not any("lora" in key for key in keys):
            return "holds no LoRA weights (no key names 'lora')"
        return None

    # ---- what requests see -------------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [lora.describe() for lora in self._files.values()]

    def check(self, loras: LoraSet, param: str) -> None:
        """A 400 for a name that is not here or cannot be used, listing the usable ones."""
        with self._lock:
            for name, _ in loras:
                lora = self._files.get(name)
                if lora is None:
                    usable = ", ".join(n for n, f in self._files.items() if f.refused is None) or "none"
                    raise InvalidRequest(f"unknown LoRA '{name}'; available: {usable}", param=param)
                if lora.refused is not None:
                    raise InvalidRequest(f"LoRA '{name}' cannot be used: {lora.refused}", param=param)

    def refusal(self, name: str) -> str | None:
        with self._lock:
            lora = self._files.get(name)
            return None if lora is None else lora.refused

    def refuse(self, name: str, reason: str) -> None:
        """Refuse a file from now on (it did not fit the model at first use)."""
        with self._lock:
            lora = self._files[name]
            self._files[name] = LoraFile(lora.name, lora.path, lora.bytes, reason)
        logger.warning("LoRA %s refused: %s", name, reason)

    # ---- the worker's loads ---------------------------------------------------------------------------

    def mark_loaded(self, name: str, loaded: bool) -> None:
        with self._lock:
            (self._loaded.add if loaded else self._loaded.discard)(name)

    def loaded_names(self) -> list[str]:
        with self._lock:
            return sorted(self._loaded)

    def prefetch(self, names: Iterable[str]) -> None:
        """Ask the kernel to read the files of adapters not in the model yet into its page cache, off the worker
        thread and without holding them in this process: the worker's read is then a copy from memory."""
        for name in names:
            with self._lock:
                if name in self._loaded or name not in self._files:
                    continue
                path = self._files[name].path
            try:
                descriptor = os.open(path, os.O_RDONLY)
            except OSError:
                continue  # the worker's load reports it
            try:
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(descriptor)

    def location(self, name: str) -> tuple[str, str]:
        """(directory, file name) of the adapter's file as checked at start, for diffusers' loader (which reads the
        file's own metadata: lora_alpha, rslora, per-layer ranks). Raises OSError when it changed since."""
        with self._lock:
            lora = self._files[name]
        real = lora.path.resolve()
        size = real.stat().st_size
        if not real.is_relative_to(self.directory.resolve()) or size > self.max_bytes:
            raise OSError(f"{lora.path.name} changed since the start: no longer a file within --lora_dir and limits")
        return str(real.parent), real.name
