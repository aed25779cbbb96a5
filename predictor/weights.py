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
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

MODEL_INDEX = "model_index.json"
# Configs, tokenizer vocabularies and merges, sentencepiece models.
_SMALL_FILE_SUFFIXES = (".json", ".txt", ".model")


def _is_weights(name: str) -> bool:
    return name.endswith(".safetensors") or ".safetensors.index." in name


def _variant_of(name: str) -> str | None:
    """``fp16`` for ``model.fp16.safetensors`` or ``model.safetensors.index.fp16.json``; None for the plain files
    (sharded plain files are ``model-00001-of-00002.safetensors``)."""
    parts = name.split(".")
    if name.endswith(".safetensors"):
        return parts[-2] if len(parts) >= 3 else None
    return parts[-2] if len(parts) >= 5 else None  # model.safetensors.index[.fp16].json


def components(root: Path) -> list[str]:
    """The components ``model_index.json`` names with a class (``[library, class]``), in its order."""
    index = json.loads((root / MODEL_INDEX).read_text(encoding="utf-8"))
    return [
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and None not in value
    ]


def resolve_variant(root: Path, variant: str) -> str | None:
    """``auto``: fp16 when every weighted component has it, else the plain files (as the server does for a float16
    load); ``none``: the plain files; otherwise that variant, which every weighted component must have."""
    if variant == "none":
        return None
    weighted = {}
    for component in components(root):
        directory = root / component
        names = [p.name for p in directory.iterdir() if p.is_file()] if directory.is_dir() else []
        weights = [name for name in names if _is_weights(name)]
        if weights:
            weighted[component] = {_variant_of(name) for name in weights}
    wanted = "fp16" if variant == "auto" else variant
    complete = bool(weighted) and all(wanted in variants for variants in weighted.values())
    if complete:
        return wanted
    if variant == "auto":
        return None
    missing = sorted(name for name, variants in weighted.items() if wanted not in variants)
    raise ValueError(f"variant '{wanted}' is missing for {', '.join(missing)}")


def needed_files(root: Path, variant: str = "auto") -> list[Path]:
    """The files the server reads from ``root``, relative to it."""
    chosen = resolve_variant(root, variant)
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
    needed = needed_files(root, variant)
    return Plan(
        whole_files=len(every),
        whole_bytes=sum(p.stat().st_size for p in every),
        needed=needed,
        needed_bytes=sum((root / p).stat().st_size for p in needed),
        variant=resolve_variant(root, variant),
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
