"""Which files of a diffusers pipeline directory the server reads, and what each way of delivering them moves.

    python -m predictor.weights plan DIR [--variant auto|none|fp16]   # bytes per delivery path, allow patterns
    python -m predictor.weights stage DIR OUT [--variant ...]          # copy only those files (for a modelcar)

The server reads ``model_index.json`` and, for each component it names, the configs and tokenizer files and the
safetensors weights of one variant (``--variant``): never pickles (``.bin``), single-file checkpoints
(``.ckpt``, top-level ``.safetensors``), ONNX, Flax or OpenVINO copies, which a whole repository also holds.
Standard library only: the modelcar build (``docker/model.Dockerfile``) runs it without the server's packages.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

MODEL_INDEX = "model_index.json"
# Configs, tokenizer vocabularies and merges, sentencepiece models.
_SMALL_FILE_SUFFIXES = (".json", ".txt", ".model")


_SHARD = re.compile(r"-\d{5}-of-\d{5}$")  # transformers' shard suffix: model-00001-of-00002


def _is_weights(name: str) -> bool:
    """Safetensors weights or their shard index (``model.safetensors.index[.fp16].json``)."""
    return name.endswith(".safetensors") or (".safetensors." in name and name.endswith(".json") and ".index" in name)


def _variant_of(name: str) -> str | None:
    """The variant a weights file belongs to, as diffusers names them (``pipeline_loading_utils``): ``fp16`` for
    ``model.fp16.safetensors``, ``model.fp16-00001-of-00002.safetensors``, the legacy
    ``model-00001-of-00002.fp16.safetensors``, ``model.safetensors.index.fp16.json`` and the legacy
    ``model.safetensors.fp16.index.json``; None for the plain files (``model-00001-of-00002.safetensors``)."""
    if name.endswith(".safetensors"):
        stem = name.removesuffix(".safetensors")
        if "." not in stem:
            return None
        return _SHARD.sub("", stem.split(".", 1)[1]) or None
    rest = name.split(".safetensors", 1)[1]  # ".index.json", ".index.fp16.json" or ".fp16.index.json"
    parts = [part for part in rest.split(".") if part and part not in ("index", "json")]
    return parts[0] if parts else None


def components_of(index: dict) -> list[str]:
    """The components a ``model_index.json`` names with a class (``[library, class]``), in its order."""
    return [
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and None not in value
    ]


def components(root: Path) -> list[str]:
    return components_of(json.loads((root / MODEL_INDEX).read_text(encoding="utf-8")))


def choose_variant(files: list[str], names: list[str], variant: str) -> str | None:
    """The variant to read, from a checkpoint's file list (paths relative to its root) and its components.
    ``auto``: fp16 when every component with weights has it, else the plain files (what the server does for a
    float16 load); ``none``: the plain files; otherwise that variant, which every such component must have."""
    if variant == "none":
        return None
    weighted: dict[str, set[str | None]] = {}
    wanted_components = set(names)
    for path in files:
        component, _, name = path.rpartition("/")
        if component in wanted_components and _is_weights(name):
            weighted.setdefault(component, set()).add(_variant_of(name))
    wanted = "fp16" if variant == "auto" else variant
    if weighted and all(wanted in variants for variants in weighted.values()):
        return wanted
    if variant == "auto":
        return None
    missing = sorted(name for name, variants in weighted.items() if wanted not in variants)
    raise ValueError(f"variant '{wanted}' is missing for {', '.join(missing) or 'every component'}")


def resolve_variant(root: Path, variant: str) -> str | None:
    files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    return choose_variant(files, components(root), variant)


def needed_files(root: Path, variant: str = "auto") -> list[Path]:
    """The files the server reads from ``root``, relative to it."""
    return _files_of(root, resolve_variant(root, variant))


def _files_of(root: Path, chosen: str | None) -> list[Path]:
    """``model_index.json``, each component's configs and tokenizer files, and its ``chosen`` variant's weights."""
    files = [Path(MODEL_INDEX)]
    for component in components(root):
        directory = root / component
        if not directory.is_dir():
            continue
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            name = path.name
            if _is_weights(name):
                if _variant_of(name) == chosen:
                    files.append(path.relative_to(root))
            elif name.endswith(_SMALL_FILE_SUFFIXES):
                files.append(path.relative_to(root))
    return files


@dataclass(frozen=True)
class Plan:
    whole_files: int
    whole_bytes: int
    needed: list[Path]
    needed_bytes: int
    variant: str | None


def plan(root: Path, variant: str = "auto") -> Plan:
    every = [p for p in root.rglob("*") if p.is_file() and ".git" not in p.relative_to(root).parts]
    chosen = resolve_variant(root, variant)
    needed = _files_of(root, chosen)
    return Plan(
        whole_files=len(every),
        whole_bytes=sum(p.stat().st_size for p in every),
        needed=needed,
        needed_bytes=sum((root / p).stat().st_size for p in needed),
        variant=chosen,
    )


def stage(root: Path, out: Path, variant: str = "auto") -> list[Path]:
    """Copy the files the server reads into ``out`` (a fresh directory), keeping their layout."""
    files = needed_files(root, variant)
    for relative in files:
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / relative, target)
    return files


def _size(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.2f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m predictor.weights", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("plan", "print the bytes each delivery path moves"), ("stage", "copy the needed files")):
        command = commands.add_parser(name, help=text)
        command.add_argument("directory", type=Path, help="a diffusers pipeline directory (model_index.json)")
        if name == "stage":
            command.add_argument("out", type=Path, help="where to copy the files the server reads")
        command.add_argument("--variant", default="auto", help="auto (default), none, or a variant name (fp16)")
    args = parser.parse_args(argv)
    if not (args.directory / MODEL_INDEX).is_file():
        parser.error(f"{args.directory} holds no {MODEL_INDEX}")
    try:
        if args.command == "stage":
            files = stage(args.directory, args.out, args.variant)
            print(f"staged {len(files)} files in {args.out}")
            return 0
        result = plan(args.directory, args.variant)
    except ValueError as exc:
        parser.error(str(exc))
    needed = f"{len(result.needed)} files, {_size(result.needed_bytes)}"
    print(f"weights variant read: {result.variant or 'plain (no variant)'}")
    print(
        f"storageUri hf:// or s3://, no patterns (the whole directory):  {result.whole_files} files, "
        f"{_size(result.whole_bytes)}"
    )
    print(f"storage initializer with STORAGE_ALLOW_PATTERNS:              {needed}")
    print(f"modelcar image (oci://), pulled once per node and cached:     {needed}")
    print(f"ratio whole / needed: {result.whole_bytes / max(result.needed_bytes, 1):.2f}x")
    print("STORAGE_ALLOW_PATTERNS=" + json.dumps([str(path) for path in result.needed]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
