"""Per-request LoRA adapters: each image equals diffusers' pipeline after ``load_lora_weights`` + ``set_adapters``
with the same names and scales (an image without adapters equals plain ``pipe(...)``), alone and in batches that
mix adapter sets, in both batching modes; adapters in diffusers' format and kohya's, with and without text-encoder
weights; the least recently used adapter out past --max_loaded_loras; and every bad adapter or request a 400 that
says why, the server serving everyone else."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    Flux2KleinPipeline,
    FluxPipeline,
    QwenImagePipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    ZImagePipeline,
)
from safetensors.torch import load_file, save_file

from predictor.builtin import (
    build_tiny,
    build_tiny_flux2_klein,
    build_tiny_flux_dev,
    build_tiny_qwenimage,
    build_tiny_sdxl,
    build_tiny_zimage,
)
from predictor.errors import InvalidRequest, LoadError
from predictor.loading import load_pipeline
from predictor.request import GenerationRequest, Limits, resolve
from predictor.testing import (
    TOLERANCE,
    assert_alone_and_mixed_equal,
    diffusers_image,
    diffusers_image_job,
    pixels,
    running_engine,
    save_random_lora,
)


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """builtin:tiny on disk, and a LoRA directory for it: style (UNet only), ink (UNet and text encoder)."""
    model = tmp_path_factory.mktemp("tiny")
    pipe = build_tiny()
    pipe.save_pretrained(model, safe_serialization=True)
    loras = tmp_path_factory.mktemp("loras")
    save_random_lora(pipe, loras, "style", seed=1)
    save_random_lora(pipe, loras, "ink", seed=2, rank=2, alpha=4, text_encoders=True)
    return model, loras


def _resolved(loaded, **body):
    traits = loaded.traits
    return resolve(GenerationRequest(**body), Limits().for_model(traits), traits, adapters=loaded.loras)


def _references(model: Path, loras: Path, cls, names: list[str]):
    """diffusers' own pipelines: a plain one, and one with every adapter loaded under its file's name."""
    plain = cls.from_pretrained(model, use_safetensors=True, dtype=torch.float32, safety_checker=None)
    adapted = cls.from_pretrained(model, use_safetensors=True, dtype=torch.float32, safety_checker=None)
    for name in names:
        adapted.load_lora_weights(str(loras / f"{name}.safetensors"), adapter_name=name)
    for pipe in (plain, adapted):
        pipe.set_progress_bar_config(disable=True)
    return plain, adapted


def _expected(plain, adapted, p) -> np.ndarray:
    if not p.loras:
        return diffusers_image(plain, p)
    adapted.set_adapters([name for name, _ in p.loras], adapter_weights=[scale for _, scale in p.loras])
    return diffusers_image(adapted, p)


@pytest.mark.parametrize("batching", ["mixed", "grouped"])
def test_adapters_equal_diffusers_alone_and_in_mixed_batches(sd_dirs: tuple[Path, Path], batching: str) -> None:
    model, loras = sd_dirs
    loaded = load_pipeline(str(model), "not/used", None, "cpu", "float32", lora_dir=str(loras))
    plain, adapted = _references(model, loras, StableDiffusionPipeline, ["style", "ink"])
    sets = [
        [{"name": "style"}],
        [],
        [{"name": "ink", "scale": 0.8}],
        [{"name": "style", "scale": 0.5}, {"name": "ink", "scale": 1.5}],
        [{"name": "style", "scale": -0.7}],
        [],
        [{"name": "ink", "scale": 1.5}, {"name": "style", "scale": 0.5}],
        [{"name": "style"}],
    ]
    cases = []
    for i, chosen in enumerate(sets):
        body = {"prompt": f"a boat {i}", "seed": i, "num_inference_steps": 4, "guidance_scale": [6.0, 1.0][i % 3 == 2]}
        if chosen:
            body["loras"] = chosen
        cases.append(_resolved(loaded, **body))
    expected = [_expected(plain, adapted, case) for case in cases]
    # The adapters change the picture: the test would not pass with them ignored.
    assert np.abs(expected[0] - diffusers_image(plain, cases[0])).max() > 10
    assert_alone_and_mixed_equal(loaded, cases, expected, join_at_step=1, tolerance=TOLERANCE, lora_batching=batching)


def _as_kohya(source: Path, target: Path) -> None:
    """The same adapter in kohya's naming (lora_unet_*/lora_te_*, lora_down/lora_up, an alpha per layer)."""
    weights, converted = load_file(str(source)), {}
    for key, tensor in weights.items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}[component]
        stem = prefix + module.replace(".", "_")
        converted[f"{stem}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor
        if kind.startswith("A"):
            rank = tensor.shape[0]
            converted[f"{stem}.alpha"] = torch.tensor(float(rank * 2))  # alpha/r 2, as the diffusers file's 8/4
    save_file(converted, str(target))


def test_kohya_files_load_as_diffusers_loads_them(sd_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    model, loras = sd_dirs
    _as_kohya(loras / "style.safetensors", tmp_path / "style-kohya.safetensors")
    loaded = load_pipeline(str(model), "not/used", None, "cpu", "float32", lora_dir=str(tmp_path))
    plain, adapted = _references(model, tmp_path, StableDiffusionPipeline, ["style-kohya"])
    cases = [
        _resolved(loaded, prompt="kohya", seed=3, num_inference_steps=3, loras=[{"name": "style-kohya", "scale": 0.9}]),
        _resolved(loaded, prompt="none", seed=4, num_inference_steps=3),
    ]
    expected = [_expected(plain, adapted, case) for case in cases]
    with running_engine(loaded) as engine:
        for case, want in zip(cases, expected, strict=True):
            assert np.abs(pixels(engine.generate(case, timeout=60).image) - want).max() <= TOLERANCE


def test_least_recently_used_adapter_goes_out_and_comes_back(sd_dirs: tuple[Path, Path]) -> None:
    """With room for one adapter: each request's adapter goes in, the other out; two running at once both stay in
    (a running image's adapter is never taken out), and every image is still diffusers'."""
    model, loras = sd_dirs
    loaded = load_pipeline(str(model), "not/used", None, "cpu", "float32", lora_dir=str(loras))
    plain, adapted = _references(model, loras, StableDiffusionPipeline, ["style", "ink"])
    cases = [
        _resolved(loaded, prompt=f"turn {i}", seed=i, num_inference_steps=3, loras=[{"name": name}])
        for i, name in enumerate(["style", "ink", "style", "ink"])
    ]
    with running_engine(loaded, max_loaded_loras=1) as engine:
        for case in cases:
            got = pixels(engine.generate(case, timeout=60).image)
            assert np.abs(got - _expected(plain, adapted, case)).max() <= TOLERANCE
            assert engine.runner.adapters.loaded == [case.loras[0][0]]
        assert loaded.loras.loaded_names() == ["ink"]
        together = engine.submit(cases[:2])
        for case, future in zip(cases[:2], together, strict=True):
            assert np.abs(pixels(future.result(timeout=60).image) - _expected(plain, adapted, case)).max() <= TOLERANCE
        assert sorted(engine.runner.adapters.loaded) == ["ink", "style"]  # past the bound while both ran
        engine.generate(cases[1], timeout=60)
        assert engine.runner.adapters.loaded == ["ink"]  # back to the bound once nothing needs style


@pytest.mark.parametrize(("batching", "calls"), [("mixed", 3), ("grouped", 9)])
def test_batching_modes_share_calls_as_they_say(sd_dirs: tuple[Path, Path], batching: str, calls: int) -> None:
    """Three adapter sets at once, 3 steps: mixed makes one UNet call a step, grouped one per set."""
    model, loras = sd_dirs
    loaded = load_pipeline(str(model), "not/used", None, "cpu", "float32", lora_dir=str(loras))
    sets = [[{"name": "style"}], [{"name": "ink"}], []]
    cases = [
        _resolved(loaded, prompt=f"p{i}", seed=i, num_inference_steps=3, **({"loras": chosen} if chosen else {}))
        for i, chosen in enumerate(sets)
    ]
    counted: list[int] = []
    hook = loaded.pipe.unet.register_forward_hook(lambda module, args, output: counted.append(len(args[0])))
    try:
        with running_engine(loaded, lora_batching=batching) as engine:
            engine.generate(cases[0], timeout=60)  # loads style; then count a batch of all three
            counted.clear()
            for future in engine.submit(cases):
                future.result(timeout=60)
    finally:
        hook.remove()
    assert len(counted) == calls, counted
    assert sum(counted) == 3 * 2 * 3  # three guided images (two rows each), three steps


def _with_two_adapters(pipe, tmp_path: Path, cls):
    """``pipe`` on disk with two adapters (style: rank 4 with text-encoder weights; light: rank 2), loaded with them
    in --lora_dir; and diffusers' own pipelines (plain, adapted)."""
    model, loras = tmp_path / "model", tmp_path / "loras"
    pipe.save_pretrained(model, safe_serialization=True)
    save_random_lora(pipe, loras, "style", seed=5, text_encoders=True)
    save_random_lora(pipe, loras, "light", seed=6, rank=2, alpha=2)
    loaded = load_pipeline(str(model), "not/used", None, "cpu", "float32", lora_dir=str(loras))
    return loaded, *_references(model, loras, cls, ["style", "light"])


@pytest.mark.parametrize(
    ("build", "cls"),
    [
        (build_tiny_sdxl, StableDiffusionXLPipeline),
        (build_tiny_flux_dev, FluxPipeline),
        (build_tiny_zimage, ZImagePipeline),
        (build_tiny_flux2_klein, Flux2KleinPipeline),
        (build_tiny_qwenimage, QwenImagePipeline),
    ],
)
def test_transformer_family_adapters_equal_diffusers(build, cls, tmp_path: Path) -> None:
    loaded, plain, adapted = _with_two_adapters(build(), tmp_path, cls)
    traits = loaded.traits
    # The tiny builtins' size: saved and loaded again, FLUX and Z-Image default to 1024 px.
    common = {"num_inference_steps": 3, "guidance_scale": traits.default_guidance_scale, "width": 64, "height": 64}
    cases = [
        _resolved(loaded, prompt="a", seed=1, loras=[{"name": "style", "scale": 0.7}], **common),
        _resolved(loaded, prompt="b", seed=2, **common),
        _resolved(loaded, prompt="c", seed=3, loras=[{"name": "light"}, {"name": "style", "scale": 1.2}], **common),
        _resolved(loaded, prompt="d", seed=4, loras=[{"name": "light", "scale": 0.5}], **common),
    ]
    expected = [_expected(plain, adapted, case) for case in cases]
    assert_alone_and_mixed_equal(loaded, cases, expected, join_at_step=1, tolerance=TOLERANCE)


def test_the_adapter_command_makes_one_the_server_serves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's offline walk: ``python -m predictor.make_lora`` writes an adapter for builtin:tiny, and a
    server with --lora_dir lists it as usable and changes the picture with it."""
    from predictor.make_lora import main

    assert main(["--model_id", "builtin:tiny", "--out", str(tmp_path / "loras"), "--name", "style"]) == 0
    assert "style.safetensors" in capsys.readouterr().out
    loaded = load_pipeline(None, "builtin:tiny", None, "cpu", "float32", lora_dir=str(tmp_path / "loras"))
    assert [(e["name"], e["available"]) for e in loaded.loras.describe()] == [("style", True)]
    plain = _resolved(loaded, prompt="a harbour", seed=3, num_inference_steps=2)
    styled = _resolved(loaded, prompt="a harbour", seed=3, num_inference_steps=2, loras=[{"name": "style"}])
    with running_engine(loaded) as engine:
        images = [pixels(future.result(timeout=60).image) for future in engine.submit([plain, styled])]
    assert np.abs(images[0] - images[1]).max() > 0


def test_bad_files_are_listed_with_the_reason_and_refused_by_name(sd_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    model, good = sd_dirs
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "style.safetensors").write_bytes((good / "style.safetensors").read_bytes())
    (loras / "broken.safetensors").write_bytes(b"not a safetensors file")
    save_file({"weight": torch.zeros(2)}, str(loras / "plain.safetensors"))
    save_random_lora(build_tiny(), loras, "big", seed=8, rank=16)
    (loras / "bad name.safetensors").write_bytes((good / "style.safetensors").read_bytes())
    (tmp_path / "outside.safetensors").write_bytes((good / "style.safetensors").read_bytes())
    os.symlink(tmp_path / "outside.safetensors", loras / "escape.safetensors")
    os.symlink(loras / "style.safetensors", loras / "alias.safetensors")  # a link inside the directory is fine
    (loras / "notes.txt").write_text("not an adapter")
    save_random_lora(build_tiny_sdxl(), loras, "xl", seed=7, rank=1)  # another architecture: found at first use
    limit = (loras / "style.safetensors").stat().st_size
    assert (loras / "xl.safetensors").stat().st_size <= limit < (loras / "big.safetensors").stat().st_size
    loaded = load_pipeline(str(model), "not/used", None, "cpu", "float32", lora_dir=str(loras), max_lora_bytes=limit)
    listed = {entry["name"]: entry for entry in loaded.loras.describe()}
    assert sorted(listed) == ["alias", "bad name", "big", "broken", "escape", "plain", "style", "xl"]
    assert [name for name, entry in listed.items() if entry["available"]] == ["alias", "style", "xl"]
    reasons = {name: entry.get("reason", "") for name, entry in listed.items()}
    assert "not a readable safetensors file" in reasons["broken"]
    assert "no LoRA weights" in reasons["plain"]
    assert "over --max_lora_bytes" in reasons["big"]
    assert "outside --lora_dir" in reasons["escape"]
    assert "letters, digits" in reasons["bad name"]

    for chosen, words in (
        ([{"name": "nothere"}], "unknown LoRA 'nothere'; available: alias, style, xl"),
        ([{"name": "broken"}], "LoRA 'broken' cannot be used: not a readable safetensors file"),
        ([{"name": "style"}, {"name": "style"}], "names 'style' twice"),
        ([{"name": c} for c in ["style", "alias", "xl", "style", "alias"]], "at most 4 (--max_loras_per_request)"),
    ):
        with pytest.raises(InvalidRequest, match=words.replace("(", r"\(").replace(")", r"\)")) as error:
            _resolved(loaded, prompt="a", loras=chosen)
        assert error.value.param == "loras"

    xl = _resolved(loaded, prompt="a", seed=1, num_inference_steps=2, loras=[{"name": "xl"}])
    fine = _resolved(loaded, prompt="b", seed=2, num_inference_steps=2, loras=[{"name": "alias"}])
    with running_engine(loaded) as engine:
        wrong, right = engine.submit([xl, fine])
        with pytest.raises(InvalidRequest, match="LoRA 'xl' cannot be used: it does not fit this model") as error:
            wrong.result(timeout=60)
        assert error.value.status_code == 400
        assert right.result(timeout=60).image.size == (64, 64)  # the image beside it is made
        after = _resolved(loaded, prompt="c", seed=3, num_inference_steps=2)
        plain, _ = _references(model, good, StableDiffusionPipeline, [])
        # The failed load left nothing behind: a plain image is still plain diffusers'.
        assert np.abs(pixels(engine.generate(after, timeout=60).image) - diffusers_image(plain, after)).max() <= 1
    with pytest.raises(InvalidRequest, match="LoRA 'xl' cannot be used: it does not fit"):  # refused from now on
        _resolved(loaded, prompt="a", loras=[{"name": "xl"}])


def test_requests_naming_adapters_without_a_lora_dir_are_refused(sd_dirs: tuple[Path, Path]) -> None:
    loaded = load_pipeline(str(sd_dirs[0]), "not/used", None, "cpu", "float32")
    with pytest.raises(InvalidRequest, match="serves no LoRA adapters"):
        _resolved(loaded, prompt="a", loras=[{"name": "style"}])
    assert _resolved(loaded, prompt="a", loras=[]).loras == ()


def test_a_missing_lora_dir_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="is not a directory"):
        load_pipeline(None, "builtin:tiny", None, "cpu", "float32", lora_dir=str(tmp_path / "missing"))


def test_every_protocol_takes_loras_on_a_server(sd_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """/generate, v1, v2 (parameters, as JSON text), the OpenAI SDK (extra_body), OpenAI edits (a form field) and
    the command-line client name adapters the same way and get the same image; GET .../loras lists them; an
    unknown name is a 400 everywhere, and the server goes on."""
    import base64
    import io
    import json
    import subprocess
    import sys

    import httpx
    import openai
    from PIL import Image

    from predictor.testing import decode_image, free_port, start_server, stop_server, wait_ready

    loras = sd_dirs[1]
    port = free_port()
    log = tmp_path / "server.log"
    flags = ("--model_id", "builtin:tiny", "--model_dir", str(tmp_path / "none"), "--lora_dir", str(loras))
    process = start_server(*flags, "--default_steps", "3", port=port, log=log)
    base = f"http://127.0.0.1:{port}"
    chosen = [{"name": "ink", "scale": 0.8}, {"name": "style", "scale": 0.5}]
    body = {"prompt": "a fox", "seed": 11, "loras": chosen}
    try:
        wait_ready(process, port, log)
        listed = httpx.get(f"{base}/v1/models/sd/loras", timeout=30).json()
        assert [entry["name"] for entry in listed["loras"]] == ["ink", "style"]
        assert all(entry["available"] for entry in listed["loras"])
        assert (listed["max_loras_per_request"], listed["batching"]) == (4, "mixed")
        assert (listed["max_loaded"], listed["slots"]) == (8, False)

        generated = httpx.post(f"{base}/generate", json=body, timeout=60)
        assert generated.status_code == 200, generated.text
        image = decode_image(generated.content)
        plain = decode_image(httpx.post(f"{base}/generate", json={**body, "loras": []}, timeout=60).content)
        assert np.abs(image - plain).max() > 10  # the adapters took effect
        assert sorted(httpx.get(f"{base}/v1/models/sd/loras", timeout=30).json()["loaded"]) == ["ink", "style"]

        v1 = httpx.post(f"{base}/v1/models/sd:predict", json={"instances": [body]}, timeout=60).json()
        assert np.array_equal(decode_image(base64.b64decode(v1["predictions"][0]["image"]["b64"])), image)
        v2_body = {
            "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a fox"]}],
            "parameters": {"seed": 11, "loras": json.dumps(chosen)},
        }
        v2 = httpx.post(f"{base}/v2/models/sd/infer", json=v2_body, timeout=60).json()
        assert np.array_equal(decode_image(base64.b64decode(v2["outputs"][0]["data"][0])), image)

        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        result = client.images.generate(model="sd", prompt="a fox", extra_body={"seed": 11, "loras": chosen})
        assert np.array_equal(decode_image(base64.b64decode(result.data[0].b64_json)), image)
        picture = io.BytesIO()
        Image.new("RGB", (64, 64), (30, 160, 90)).save(picture, format="PNG")
        edit = {"seed": 11, "loras": json.dumps(chosen)}
        edited = client.images.edit(image=("in.png", picture.getvalue(), "image/png"), prompt="a fox", extra_body=edit)
        same = {**body, "image": base64.b64encode(picture.getvalue()).decode()}
        expected = decode_image(httpx.post(f"{base}/generate", json=same, timeout=60).content)
        assert np.array_equal(decode_image(base64.b64decode(edited.data[0].b64_json)), expected)

        output = tmp_path / "cli.png"
        command = [sys.executable, "-m", "predictor.client", "a fox", "-o", str(output), "--url", base, "--seed", "11"]
        cli = subprocess.run([*command, "--lora", "ink:0.8", "--lora", "style:0.5"], capture_output=True, text=True)
        assert cli.returncode == 0, cli.stderr
        assert np.array_equal(decode_image(output.read_bytes()), image)

        unknown = {**body, "loras": [{"name": "nothere"}]}
        refused = httpx.post(f"{base}/generate", json=unknown, timeout=30)
        assert refused.status_code == 400
        assert refused.json()["error"] == "unknown LoRA 'nothere'; available: ink, style"
        assert refused.json()["param"] == "loras"
        with pytest.raises(openai.BadRequestError, match="unknown LoRA 'nothere'"):
            client.images.generate(model="sd", prompt="a fox", extra_body={"loras": [{"name": "nothere"}]})
        v2_body["parameters"]["loras"] = '[{"name": "nothere"}]'
        assert httpx.post(f"{base}/v2/models/sd/infer", json=v2_body, timeout=30).status_code == 400
        bad_scale = httpx.post(f"{base}/generate", json={**body, "loras": [{"name": "ink", "scale": 5}]}, timeout=30)
        assert bad_scale.status_code == 400 and bad_scale.json()["param"] == "loras.0.scale"
        assert httpx.post(f"{base}/generate", json=body, timeout=60).status_code == 200
    finally:
        assert stop_server(process) == 0


def test_compile_needs_a_slot_for_every_adapter_a_request_may_name(capsys) -> None:
    from predictor.config import parse_settings

    with pytest.raises(SystemExit) as exited:
        parse_settings(["--lora_dir", "/tmp", "--compile", "--max_loaded_loras", "2"])
    assert exited.value.code == 2
    assert "--max_loras_per_request (4) must not exceed it (2)" in capsys.readouterr().err
    flags = ["--lora_dir", "/tmp", "--compile", "--max_loaded_loras", "2", "--max_loras_per_request", "2"]
    _, settings = parse_settings(flags)
    assert settings.engine.compile and settings.engine.max_loaded_loras == 2


def _save_with_nan(source: Path, target: Path) -> None:
    """``source``'s adapter with one weight NaN (and its metadata kept)."""
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    weights = load_file(str(source))
    first = next(key for key in weights if key.startswith("unet."))
    weights[first][0, 0] = float("nan")
    save_file(weights, str(target), metadata=metadata)


def _fresh_dynamo() -> None:
    """Dynamo's caches are per process and it does not guard on module hooks (skip_nnmodule_hook_guards): a graph
    traced by an earlier test for a denoiser of the same class without the slots' hooks would serve this one. A
    server compiles its one denoiser once, after the hooks are in."""
    torch._dynamo.reset()


def test_compiled_denoiser_swaps_adapters_in_its_slots_without_recompiling(
    sd_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """--compile: three adapters (ranks 4, 2 and 8; one with text-encoder weights) through two slots. Every image,
    alone and in batches that mix adapters, equals diffusers'; loading and swapping adapters compiles nothing after
    warm-up; the UNet keeps the very modules it was compiled with. Adapters that do not fit, or hold a NaN (which
    would reach every row of a slotted call), are refused at start with the reason."""
    from peft.tuners.lora import LoraLayer

    model, good = sd_dirs
    loras = tmp_path / "loras"
    loras.mkdir()
    for name in ("style", "ink"):
        (loras / f"{name}.safetensors").write_bytes((good / f"{name}.safetensors").read_bytes())
    save_random_lora(build_tiny(), loras, "wide", seed=9, rank=8, alpha=4)
    save_random_lora(build_tiny_sdxl(), loras, "xl", seed=7, rank=1)
    _save_with_nan(good / "style.safetensors", loras / "spoilt.safetensors")
    loaded = load_pipeline(str(model), "not/used", None, "cpu", "float32", lora_dir=str(loras))
    plain, adapted = _references(model, loras, StableDiffusionPipeline, ["style", "ink", "wide"])
    sets = [
        [{"name": "style"}],
        [],
        [{"name": "ink", "scale": 0.8}],
        [{"name": "wide", "scale": -0.7}],
        [{"name": "style", "scale": 0.5}, {"name": "ink", "scale": 1.5}],
        [{"name": "wide"}],
    ]
    cases = [
        _resolved(loaded, prompt=f"p{i}", seed=i, num_inference_steps=3, **({"loras": chosen} if chosen else {}))
        for i, chosen in enumerate(sets)
    ]
    modules = dict(loaded.pipe.unet.named_modules())
    config = {"compile": True, "compile_backend": "eager", "max_loaded_loras": 2, "max_batch_size": 4}
    _fresh_dynamo()
    with running_engine(loaded, **config) as engine:
        after_warmup = engine.runner.compiled_graphs()
        reasons = {entry["name"]: entry.get("reason", "") for entry in loaded.loras.describe()}
        assert "does not fit this model" in reasons["xl"] and "not all finite" in reasons["spoilt"]
        alone = [pixels(engine.generate(case, timeout=120).image) for case in cases]
        together = [pixels(future.result(timeout=120).image) for future in engine.submit(cases)]
        assert engine.runner.compiled_graphs() == after_warmup, "an adapter load or swap compiled a graph"
        assert len(engine.runner.adapters.loaded) == 2
    assert dict(loaded.pipe.unet.named_modules()) == modules
    assert not any(isinstance(module, LoraLayer) for module in loaded.pipe.unet.modules())
    for case, one, batched in zip(cases, alone, together, strict=True):
        want = _expected(plain, adapted, case)
        assert np.abs(one - want).max() <= TOLERANCE and np.abs(batched - want).max() <= TOLERANCE


@pytest.mark.parametrize(
    ("build", "pipeline_class"),
    [
        (build_tiny_flux_dev, FluxPipeline),
        (build_tiny_zimage, ZImagePipeline),
        (build_tiny_qwenimage, QwenImagePipeline),
    ],
)
def test_compiled_transformers_take_adapters_in_slots(tmp_path: Path, build, pipeline_class) -> None:
    """FLUX's whole transformer compiled, Z-Image's and Qwen-Image's blocks compiled by region: adapters in slots
    either way."""
    loaded, plain, adapted = _with_two_adapters(build(), tmp_path, pipeline_class)
    loaded.pipe.default_sample_size = 8  # saved to disk, the native size is the pipeline's 1024: compile at 64
    _fresh_dynamo()
    common = {"num_inference_steps": 2, "guidance_scale": loaded.traits.default_guidance_scale}
    cases = [  # prompts of different lengths: Z-Image's captions are ragged
        _resolved(loaded, prompt="a", seed=1, loras=[{"name": "style", "scale": 0.7}], **common),
        _resolved(loaded, prompt="b with a longer prompt than the others", seed=2, **common),
        _resolved(loaded, prompt="c c", seed=3, loras=[{"name": "light"}, {"name": "style", "scale": 1.2}], **common),
    ]
    with running_engine(loaded, compile=True, compile_backend="eager", max_batch_size=4) as engine:
        after_warmup = engine.runner.compiled_graphs()
        got = [pixels(future.result(timeout=120).image) for future in engine.submit(cases)]
        assert engine.runner.compiled_graphs() == after_warmup
    for case, image in zip(cases, got, strict=True):
        assert np.abs(image - _expected(plain, adapted, case)).max() <= TOLERANCE


def test_image_jobs_take_adapters_as_diffusers_image_pipelines_do(sd_dirs: tuple[Path, Path]) -> None:
    """img2img and inpainting with an adapter, batched together, equal diffusers' img2img and inpainting pipelines
    after load_lora_weights + set_adapters."""
    import base64
    import io

    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    from PIL import Image

    model, loras = sd_dirs
    loaded = load_pipeline(str(model), "not/used", None, "cpu", "float32", lora_dir=str(loras))

    def png(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    common = {"prompt": "a", "seed": 3, "num_inference_steps": 4, "image": png(picture)}
    img2img = _resolved(loaded, **common, loras=[{"name": "ink", "scale": 0.7}])
    inpaint = _resolved(loaded, **common, mask=png(Image.fromarray(mask)), loras=[{"name": "style"}])
    with running_engine(loaded) as engine:
        got = [pixels(future.result(timeout=60).image) for future in engine.submit([img2img, inpaint])]
    pipelines = [StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline]
    for cls, p, image in zip(pipelines, [img2img, inpaint], got, strict=True):
        reference = cls.from_pretrained(model, use_safetensors=True, dtype=torch.float32, safety_checker=None)
        reference.set_progress_bar_config(disable=True)
        ((name, scale),) = p.loras
        reference.load_lora_weights(str(loras / f"{name}.safetensors"), adapter_name=name)
        reference.set_adapters([name], adapter_weights=[scale])
        assert np.abs(image - diffusers_image_job(reference, p)).max() <= TOLERANCE


@pytest.mark.parametrize(
    ("loras", "param", "words"),
    [
        ("not json", "loras", "must be a list like"),
        ([{"name": "../escape"}], "loras.0.name", "must be an adapter's name"),
        ([{"name": "style", "scale": 4.5}], "loras.0.scale", "must be at most 4"),
        ([{"name": "style", "scale": -4.5}], "loras.0.scale", "must be at least -4"),
        ([{"name": "style", "scale": float("nan")}], "loras.0.scale", "finite"),
        ([{"name": "style", "weight": 1}], "loras.0.weight", "unknown field"),
        ([{"name": f"a{i}"} for i in range(17)], "loras", "at most 16"),
    ],
)
def test_malformed_loras_are_400s_naming_the_field(loras, param: str, words: str) -> None:
    from predictor.request import parse_request

    with pytest.raises(InvalidRequest, match=words) as error:
        parse_request({"prompt": "a", "loras": loras}, Limits())
    assert error.value.param == param and error.value.status_code == 400


def test_residency_lets_the_least_recently_used_go_never_one_a_live_job_holds() -> None:
    """Past --max_loaded_loras the least recently used adapter goes, but never one an unfinished job holds: a
    decoding job's stays until its images are answered (on CUDA its last step may still be reading it). With slots
    the bound is hard: a load must first find an adapter no live job holds."""
    from predictor.jobs import Job, JobState
    from predictor.lora import Residency
    from predictor.testing import params

    def job(*names: str) -> Job:
        return Job(params(loras=tuple((name, 1.0) for name in names)), "key", submitted_at=0.0)

    residency = Residency(max_loaded=1)
    for name in ("a", "b", "c"):
        residency.added(name)
    residency.used("a")
    assert residency.loaded == ["b", "c", "a"]
    decoding = job("b")
    residency.hold([decoding])
    for state in (JobState.ADMITTED, JobState.RUNNING, JobState.DECODING):
        decoding.move_to(state)
    busy = residency.in_use([(("c", 0.5),)])
    assert busy == {"b", "c"}
    assert residency.surplus(busy) == ["a"]  # b and c stay past the bound while needed
    decoding.move_to(JobState.FINISHED)
    assert residency.in_use() == set()
    assert residency.surplus(set()) == ["b", "c"]

    slots = Residency(max_loaded=2, capacity=2)
    slots.added("a")
    assert not slots.full()
    slots.added("b")
    assert slots.full()
    assert slots.idle({"a"}) == "b"
    assert slots.idle({"a", "b"}) is None


def test_the_lora_package_imports_nothing_above_it() -> None:
    """predictor.lora sits below the runner and the loader: it may import the error types, the device predicates,
    the request definitions, the job type and the batch scheduler's AdapterLimit, and nothing else of the server,
    function-level imports included (each such import once hid a cycle)."""
    import ast

    allowed = {"predictor.device", "predictor.errors", "predictor.request", "predictor.jobs", "predictor.batching"}
    package = Path(__file__).resolve().parents[1] / "predictor" / "lora"
    found: dict[str, set[str]] = {}
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("predictor") and not name.startswith("predictor.lora"):
                    found.setdefault(name, set()).add(path.name)
    assert found, "the walk found no import at all"
    assert set(found) <= allowed, {name: files for name, files in found.items() if name not in allowed}


def test_third_party_noise_is_filtered_once_and_the_rest_passes() -> None:
    """Warnings about nothing wrong (a scheduler per request from another class's config, every component an
    adapter leaves alone, PIL without torchvision) are dropped; anything else those loggers say passes."""
    import logging

    from predictor.logs import install_log_filters

    install_log_filters()
    install_log_filters()  # twice: still one filter each
    noisy = {
        "diffusers.configuration_utils": "The config attributes {'clip_sample': False} were passed to "
        "FlowMatchEulerDiscreteScheduler, but are not expected and will be ignored.",
        "diffusers.loaders.peft": "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'.",
        "diffusers.loaders.lora_base": "No LoRA keys associated to CLIPTextModel found.",
        "transformers.utils.import_utils": "CLIPImageProcessor requires torchvision; falling back to PIL",
    }
    for name, message in noisy.items():
        logger = logging.getLogger(name)
        assert sum(type(f).__name__ == "_DropMessages" for f in logger.filters) == 1, name
        record = logger.makeRecord(name, logging.WARNING, __file__, 0, message, (), None)
        assert not logger.filter(record), name
        other = logger.makeRecord(name, logging.WARNING, __file__, 0, "something else went wrong", (), None)
        assert logger.filter(other), name
