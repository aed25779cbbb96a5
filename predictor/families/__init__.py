"""The model families this server serves, one module each, registered once here.

A family module (``sd``, ``sdxl``, ``flux``, ``sd3``, ``zimage``, ``flux2``, ``qwenimage``) defines its
``FamilyModel`` (traits, schedule and the runner's hooks) and its ``FAMILY``: the diffusers pipeline classes it
serves and its builtins.
Nothing outside this package branches on a family's name or a pipeline class: the loader finds a checkpoint's family
here by the class name in its ``model_index.json``, and everything after asks the family's model.
docs/families.md says what a new family takes.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from predictor.families import flux, flux2, qwenimage, sd, sd3, sdxl, zimage
from predictor.families.base import Builtin, Family, FamilyModel, check_registries

FAMILIES: tuple[Family, ...] = (
    sd.FAMILY,
    sdxl.FAMILY,
    flux.FAMILY,
    sd3.FAMILY,
    zimage.FAMILY,
    flux2.FAMILY,
    qwenimage.FAMILY,
)

BUILTIN_PREFIX = "builtin:"


def _index() -> tuple[dict[str, Family], dict[str, tuple[Family, Builtin]]]:
    by_class: dict[str, Family] = {}
    builtins: dict[str, tuple[Family, Builtin]] = {}
    for family in FAMILIES:
        for served in family.pipelines:
            name = served.pipeline_class.__name__
            if name in by_class:
                raise RuntimeError(f"{name} is served by two families: {by_class[name].name} and {family.name}")
            by_class[name] = family
        for name, entry in family.builtins.items():
            if name in builtins or entry.pipeline_class.__name__ not in by_class:
                raise RuntimeError(f"builtin:{name} is registered twice or builds a pipeline no family serves")
            builtins[name] = (family, entry)
    check_registries([family.model.schedulers for family in FAMILIES])
    return by_class, builtins


_BY_CLASS, _BUILTINS = _index()
BUILTINS: tuple[str, ...] = tuple(_BUILTINS)


def family_for(class_name: str) -> Family | None:
    """The family that serves pipelines of this class (as model_index.json names it); None: none does."""
    return _BY_CLASS.get(class_name)


def served_classes() -> str:
    """Every served pipeline class with what it is, for an error message."""
    return ", ".join(f"{p.pipeline_class.__name__} ({p.description})" for f in FAMILIES for p in f.pipelines)


def builtin_entry(name: str) -> tuple[Family, Builtin]:
    """The family and builder of ``builtin:NAME``; ValueError naming the choices for an unknown one."""
    if name not in _BUILTINS:
        choices = ", ".join(BUILTIN_PREFIX + known for known in BUILTINS)
        raise ValueError(f"unknown builtin model '{BUILTIN_PREFIX}{name}'; choose one of {choices}")
    return _BUILTINS[name]


def build_builtin(name: str, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    """``builtin:NAME`` built with its seeded random weights on ``device`` in ``dtype``, in eval mode."""
    _, entry = builtin_entry(name)
    if entry.full_size:
        pipe = entry.build(device, dtype)
    else:  # built in float32 on the CPU; cast only when asked to
        pipe = entry.build()
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        pipe = pipe.to(device)
    # Models made from a config start in training mode, where T5's dropout makes every call differ; loaded ones
    # start in eval mode, as these must.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


__all__ = [
    "BUILTINS",
    "BUILTIN_PREFIX",
    "FAMILIES",
    "Family",
    "FamilyModel",
    "build_builtin",
    "builtin_entry",
    "family_for",
    "served_classes",
]
