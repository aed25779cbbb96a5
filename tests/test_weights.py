"""Weights that fit: which files of a pipeline directory the server reads (``predictor.weights``), staged into a
directory the real loader then serves from, and what each delivery path would move."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from predictor.loading import load_pipeline
from predictor.testing import params, pixels, running_engine, save_hub_like_repository
from predictor.weights import choose_variant, needed_files, plan, stage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hub_like_repository(tmp_path_factory.mktemp("repo"))


def test_only_the_chosen_variants_weights_configs_and_tokenizer_are_needed(repository: Path) -> None:
    fp16 = {str(path) for path in needed_files(repository, "auto")}
    assert fp16 == {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    }
    plain = {str(path) for path in needed_files(repository, "none")}
    assert {name.replace(".fp16.", ".") for name in fp16} == plain
    with pytest.raises(ValueError, match="variant 'bf16' is missing for text_encoder, unet, vae"):
        needed_files(repository, "bf16")


COMPONENTS = ["text_encoder", "unet", "vae", "safety_checker"]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # diffusers' current names for sharded variants, and the legacy ones.
        (
            ["unet/m.fp16-00001-of-00002.safetensors", "unet/m.safetensors.index.fp16.json"],
            "fp16",
        ),
        (
            ["unet/m-00001-of-00002.fp16.safetensors", "unet/m.safetensors.fp16.index.json"],
            "fp16",
        ),
        (["unet/diffusion_pytorch_model-00001-of-00002.safetensors", "unet/x.safetensors.index.json"], None),
        # Every component with weights must have the variant; folders that are no component do not count.
        (["unet/a.fp16.safetensors", "vae/a.fp16.safetensors", "vae_1_0/a.safetensors"], "fp16"),
        (["unet/a.fp16.safetensors", "vae/a.safetensors"], None),
        (["model.fp16.safetensors"], None),  # a single-file checkpoint is no pipeline
    ],
)
def test_auto_variant_follows_diffusers_file_names(files: list[str], expected: str | None) -> None:
    plain_text_encoder = [] if expected is None else ["text_encoder/model.fp16.safetensors"]
    assert choose_variant([*files, *plain_text_encoder], COMPONENTS, "auto") == expected


def test_sharded_fp16_weights_are_staged_with_their_index(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "U"]}')
    unet = tmp_path / "unet"
    unet.mkdir()
    names = [
        "config.json",
        "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "diffusion_pytorch_model.safetensors.index.fp16.json",
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
    ]
    for name in names:
        (unet / name).write_text("{}")
    fp16 = sorted(path.name for path in needed_files(tmp_path, "auto") if path.parent.name == "unet")
    assert fp16 == sorted(names[:4])
    plain = sorted(path.name for path in needed_files(tmp_path, "none") if path.parent.name == "unet")
    assert plain == sorted([names[0], *names[4:]])


@pytest.mark.parametrize(("variant", "dtype"), [("auto", "float16"), ("none", "float32")])
def test_a_staged_directory_is_all_the_server_needs(repository: Path, tmp_path: Path, variant: str, dtype: str) -> None:
    staged = tmp_path / "models"
    stage(repository, staged, variant)
    result = plan(repository, variant)
    assert sum(p.stat().st_size for p in staged.rglob("*") if p.is_file()) == result.needed_bytes
    assert result.whole_bytes > result.needed_bytes
    loaded = load_pipeline(str(staged), "not/used", None, "cpu", dtype)
    with running_engine(loaded) as engine:
        served = pixels(engine.generate(params(num_inference_steps=2)).image)
    original = load_pipeline(str(repository), "not/used", None, "cpu", dtype)
    with running_engine(original) as engine:
        assert (pixels(engine.generate(params(num_inference_steps=2)).image) == served).all()


def test_plan_runs_on_the_standard_library_alone_and_prints_the_allow_patterns(repository: Path) -> None:
    """The modelcar build runs it in a bare Python image: no site-packages here (-S -I)."""
    result = subprocess.run(
        [sys.executable, "-S", "-I", str(ROOT / "predictor" / "weights.py"), "plan", str(repository)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "weights variant read: fp16" in lines
    patterns = json.loads(next(line for line in lines if line.startswith("STORAGE_ALLOW_PATTERNS=")).split("=", 1)[1])
    assert patterns == [str(path) for path in needed_files(repository, "auto")]
    whole = plan(repository)
    assert f"{whole.whole_files} files" in result.stdout and f"{len(whole.needed)} files" in result.stdout
