"""The real loader: model dir first, then model id; builtins; devices, dtypes; clear load errors."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from predictor.config import parse_settings
from predictor.errors import LoadError
from predictor.loading import describe_source, load_pipeline, resolve_dtype
from predictor.model import DiffusionModel
from predictor.server import PredictorServer
from predictor.testing import MODEL_NAME, make_settings


def test_model_dir_with_model_index_is_used_first(tiny_model_dir: Path) -> None:
    assert describe_source(str(tiny_model_dir), "builtin:tiny") == str(tiny_model_dir)
    loaded = load_pipeline(str(tiny_model_dir), "CompVis/stable-diffusion-v1-4", None, "cpu")
    assert loaded.source == str(tiny_model_dir)
    assert not loaded.random_weights
    assert loaded.native_size == 64
    assert loaded.pipe.vae_scale_factor == 8


def test_model_id_is_used_when_dir_holds_no_pipeline(tmp_path: Path) -> None:
    assert describe_source(str(tmp_path), "builtin:tiny") == "builtin:tiny"
    assert describe_source("/definitely/missing", "org/repo") == "org/repo"


def test_builtin_tiny_says_it_is_random(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        loaded = load_pipeline(None, "builtin:tiny", None, "cpu")
    assert loaded.random_weights
    assert "RANDOM weights" in caplog.text
    config = loaded.pipe.scheduler.config
    assert (config.clip_sample, config.set_alpha_to_one, config.steps_offset) == (False, False, 1)
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")


def test_unknown_builtin_and_missing_dir_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(
        LoadError, match=r"unknown builtin model 'builtin:huge'; choose one of builtin:tiny, .*tiny-sdxl"
    ):
        load_pipeline(None, "builtin:huge", None, "cpu")
    with pytest.raises(LoadError, match="does not exist"):
        load_pipeline(None, str(tmp_path / "nope"), None, "cpu")


def test_weights_must_be_safetensors(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A pipeline whose UNet exists only as a pickle (.bin) is refused: no pickles are loaded."""
    import shutil

    copy = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, copy)
    unet_dir = copy / "unet"
    state = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(next(unet_dir.glob("*.safetensors"))))
    for file in unet_dir.glob("*.safetensors"):
        file.unlink()
    torch.save(state, unet_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(LoadError):
        load_pipeline(str(copy), "not/used", None, "cpu")


def test_variant_loads_only_the_variant_files(tmp_path: Path) -> None:
    """--variant fp16 loads *.fp16.safetensors: a directory with only those (as a filtered download leaves it)."""
    from predictor.builtin import build_tiny_sdxl
    from predictor.testing import params, pixels, running_engine

    build_tiny_sdxl().to(dtype=torch.float16).save_pretrained(tmp_path, safe_serialization=True, variant="fp16")
    weights = sorted(path.name for path in tmp_path.rglob("*.safetensors"))
    assert weights and all(name.endswith(".fp16.safetensors") for name in weights)
    with pytest.raises(LoadError, match="no file named"):
        load_pipeline(str(tmp_path), "not/used", None, "cpu", "float32")  # the plain files are not there
    loaded = load_pipeline(str(tmp_path), "not/used", None, "cpu", "float32", variant="fp16")
    assert loaded.family.name == "sdxl" and loaded.pipe.unet.dtype == torch.float32
    with running_engine(loaded) as engine:
        assert pixels(engine.generate(params(num_inference_steps=2)).image).std() > 5


def test_auto_variant_loads_fp16_files_for_a_float16_load_when_every_component_has_them(tmp_path: Path) -> None:
    """The plain files and the fp16 ones hold different weights here, so the weights loaded tell which were read."""
    from predictor.builtin import build_tiny

    plain = build_tiny()
    plain.save_pretrained(tmp_path, safe_serialization=True)
    other = build_tiny()
    with torch.no_grad():
        for parameter in other.unet.parameters():
            parameter.add_(1.0)
    other.to(dtype=torch.float16).save_pretrained(tmp_path, safe_serialization=True, variant="fp16")

    def first_unet_weight(dtype: str, variant: str = "auto") -> torch.Tensor:
        loaded = load_pipeline(str(tmp_path), "not/used", None, "cpu", dtype, variant=variant)
        return next(loaded.pipe.unet.parameters()).detach().float()

    plain_weight = next(plain.unet.parameters()).detach()
    other_weight = next(other.unet.parameters()).detach().float()
    assert torch.equal(first_unet_weight("float16"), other_weight)  # auto: fp16 files
    assert torch.equal(first_unet_weight("float32"), plain_weight)  # auto: a float32 load reads the plain files
    assert torch.equal(first_unet_weight("float16", "none"), plain_weight.half().float())


def test_dtype_defaults() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_cuda_requested_without_cuda_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(LoadError, match="no CUDA device"):
        load_pipeline(None, "builtin:tiny", None, "cuda")


def test_not_ready_until_loaded(tiny_model_dir: Path) -> None:
    settings = make_settings(tiny_model_dir, "--default_steps", "2")
    model = DiffusionModel(settings)
    server = PredictorServer(settings, http_port=0, grpc_port=0, enable_grpc=False)
    with TestClient(server.create_app(model), raise_server_exceptions=False) as client:
        assert client.get(f"/v1/models/{MODEL_NAME}").status_code == 503
        response = client.post("/generate", json={"prompt": "too early"})
        assert response.status_code == 503
        assert response.json()["error_type"] == "model_not_ready"
        assert client.post(f"/v1/models/{MODEL_NAME}:predict", json={"instances": [{"prompt": "x"}]}).status_code == 503
        model.load()
        try:
            assert client.get(f"/v1/models/{MODEL_NAME}").status_code == 200
            assert client.post("/generate", json={"prompt": "now"}).status_code == 200
        finally:
            model.stop()
        assert client.get(f"/v1/models/{MODEL_NAME}").status_code == 503


def test_every_documented_flag_parses() -> None:
    root = Path(__file__).resolve().parents[1]
    text = "\n".join(page.read_text(encoding="utf-8") for page in [root / "README.md", *(root / "docs").glob("*.md")])
    flags = sorted(set(re.findall(r"`(--[a-z][a-z0-9_-]*)", text)))
    assert len(flags) >= 40, "the flags page (docs/flags.md) is missing"
    from predictor.config import build_parser

    known = {option for action in build_parser()._actions for option in action.option_strings}
    unknown = [flag for flag in flags if flag not in known]
    assert not unknown, f"the README or docs/ mention flags the server does not have: {unknown}"


def test_the_server_modules_import_without_torch() -> None:
    """What the server imports before it listens: torch and diffusers come with the model's load, so the listener
    is up in about a second."""
    probe = "import sys, predictor.model, predictor.server; print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_workers_above_one_are_refused() -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--workers", "2"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--default_guidance_scale", "31"], "--default_guidance_scale must be within 0..30"),
        (["--default_guidance_scale", "nan"], "--default_guidance_scale must be within 0..30"),
        (["--max_sequence_length", "513"], "--max_sequence_length must be at most 512"),
        (["--default_scheduler", "flow"], "invalid choice: 'flow'"),
    ],
)
def test_per_deployment_defaults_are_checked_at_start(flags: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings(flags)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_turbo_defaults_parse() -> None:
    _, settings = parse_settings(
        ["--default_steps", "1", "--default_guidance_scale", "0", "--default_scheduler", "euler_a"]
    )
    limits = settings.limits
    assert (limits.default_steps, limits.default_guidance_scale, limits.default_scheduler) == (1, 0.0, "euler_a")


def test_model_index_json_is_what_marks_a_model_dir(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert describe_source(str(tmp_path), "builtin:tiny") == str(tmp_path)


def test_flag_defaults_are_the_settings_defaults() -> None:
    """Each default is written once, on its dataclass field: the flags with no arguments give exactly those."""
    from predictor.config import EngineConfig, ModelSource, ServerConfig, Settings
    from predictor.request import Limits

    _, settings = parse_settings([])
    assert settings == Settings(ModelSource(), Limits(), EngineConfig(), ServerConfig())
