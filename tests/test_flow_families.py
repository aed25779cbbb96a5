"""FLUX.1 and SD 3.5 (flow-matching transformers) through the same engine: each image equals diffusers' own
pipeline's, alone and in mixed batches; the per-family scheduler registry; the sizes, fields and guidance each
family takes; SD3 without its T5 encoder; the T5 window; the defaults; --compile; the full-size builtins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from predictor.builtin import build_tiny_flux, build_tiny_flux2_klein_base, build_tiny_flux_dev, build_tiny_sd3
from predictor.errors import InvalidRequest, LoadError
from predictor.families import FAMILIES, build_builtin
from predictor.loading import LoadedPipeline, load_pipeline, resolve_dtype
from predictor.request import GenerationRequest, Limits, resolve
from predictor.testing import (
    TOLERANCE,
    assert_alone_and_mixed_equal,
    decode_image,
    diffusers_image,
    diffusers_pipeline,
    free_port,
    mixed_cases,
    params,
    pixels,
    running_engine,
    start_server,
    stop_server,
    wait_ready,
)


def _save(pipe, directory: Path) -> Path:
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    return _save(build_tiny_flux(), tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="module")
def flux_dev_dir(tmp_path_factory) -> Path:
    return _save(build_tiny_flux_dev(), tmp_path_factory.mktemp("tiny-flux-dev"))


@pytest.fixture(scope="module")
def flux2_base_dir(tmp_path_factory) -> Path:
    return _save(build_tiny_flux2_klein_base(), tmp_path_factory.mktemp("tiny-flux2-klein-base"))


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    return _save(build_tiny_sd3(), tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="module")
def sd3_without_t5_dir(sd3_dir: Path, tmp_path_factory) -> Path:
    """The SD3 checkpoint with its T5 encoder left out of the download (model_index.json still names it)."""
    directory = tmp_path_factory.mktemp("tiny-sd3-no-t5")
    shutil.copytree(sd3_dir, directory, dirs_exist_ok=True)
    shutil.rmtree(directory / "text_encoder_3")
    shutil.rmtree(directory / "tokenizer_3")
    return directory


def _load(directory: Path, **flags) -> LoadedPipeline:
    return load_pipeline(str(directory), "not/used", None, "cpu", "float32", **flags)


def _reference(directory: Path, cls, **components):
    return diffusers_pipeline(directory, cls, **components)


def _mixed(loaded, reference, cases, max_sequence_length=None) -> None:
    """Each image equals diffusers' own for the same arguments, alone and with jobs joining after step 2."""
    expected = [diffusers_image(reference, case, max_sequence_length) for case in cases]
    assert_alone_and_mixed_equal(loaded, cases, expected, join_at_step=2, tolerance=TOLERANCE)


def _cases(traits, **extra) -> list:
    """One pair per scheduler the model takes: guided and unguided rows, different guidance values and prompts share
    one transformer call; the rest form groups of other sizes."""

    def second(i: int) -> dict:
        return {"prompt": f"a red fox number {i}", "prompt_2": f"second prompt {i}", **extra.get("b", {})}

    return mixed_cases(traits.schedulers, len(traits.schedulers), first=lambda i: extra.get("a", {}), second=second)


def test_flux_schnell_equals_diffusers_in_mixed_batches(flux_dir: Path) -> None:
    loaded = _load(flux_dir)
    traits = loaded.traits
    assert (traits.family, traits.guidance, traits.default_guidance_scale) == ("flux", "none", 0.0)
    assert traits.schedulers == ("euler", "unipc")  # DPM-Solver refuses a resolution shift without dynamic shifting
    assert (traits.default_scheduler, traits.size_multiple) == ("euler", 16)
    reference = _reference(flux_dir, FluxPipeline)
    true_cfg = {"negative_prompt": "blurry", "negative_prompt_2": "grainy", "true_cfg_scale": 3.0}
    _mixed(loaded, reference, _cases(traits, a={"guidance_scale": 0.0}, b={"guidance_scale": 0.0, **true_cfg}))


def test_flux_dev_embeds_guidance_per_row_and_shifts_per_resolution(flux_dev_dir: Path) -> None:
    loaded = _load(flux_dev_dir)
    traits = loaded.traits
    assert (traits.guidance, traits.default_guidance_scale) == ("embedded", 3.5)
    assert traits.schedulers == ("euler", "dpmpp_2m", "unipc")
    reference = _reference(flux_dev_dir, FluxPipeline)
    cases = _cases(
        traits, a={"guidance_scale": 2.0}, b={"guidance_scale": 5.0, "negative_prompt": "", "true_cfg_scale": 1.5}
    )
    _mixed(loaded, reference, cases)


def test_sd3_equals_diffusers_in_mixed_batches(sd3_dir: Path) -> None:
    loaded = _load(sd3_dir)
    traits = loaded.traits
    assert (traits.family, traits.guidance, traits.default_guidance_scale) == ("sd3", "cfg", 7.0)
    assert traits.schedulers == ("euler", "heun", "dpmpp_2m", "unipc")
    assert traits.max_prompt_tokens == {"prompt": 77, "prompt_2": 77, "prompt_3": 256}
    reference = _reference(sd3_dir, StableDiffusion3Pipeline)
    third = {
        "prompt_3": "a third prompt",
        "negative_prompt": "dull",
        "negative_prompt_3": "flat",
        "guidance_scale": 4.5,
    }
    _mixed(loaded, reference, _cases(traits, a={"guidance_scale": 0.0}, b=third))


def test_sd3_without_its_t5_encoder_loads_and_equals_diffusers(sd3_without_t5_dir: Path) -> None:
    loaded = _load(sd3_without_t5_dir)
    assert loaded.pipe.text_encoder_3 is None
    traits = loaded.traits
    assert not traits.takes("prompt_3") and "prompt_3" not in traits.max_prompt_tokens
    reference = _reference(sd3_without_t5_dir, StableDiffusion3Pipeline, text_encoder_3=None, tokenizer_3=None)
    cases = [
        params(scheduler="euler", seed=3, num_inference_steps=3),
        params(scheduler="heun", seed=4, guidance_scale=0),
    ]
    _mixed(loaded, reference, cases + cases)
    with pytest.raises(InvalidRequest) as error:
        resolve(GenerationRequest(prompt="a", prompt_3="b"), Limits(), traits)
    assert error.value.param == "prompt_3"


def test_sd3_with_a_null_t5_in_its_model_index_loads(sd3_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(sd3_dir, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "text_encoder_3")
    shutil.rmtree(tmp_path / "tokenizer_3")
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    loaded = _load(tmp_path)
    assert loaded.pipe.text_encoder_3 is None
    with running_engine(loaded) as engine:
        assert engine.generate(params(scheduler="euler", num_inference_steps=2)).image.size == (64, 64)


def test_t5_window_truncates_and_matches_diffusers(flux_dir: Path) -> None:
    """The tiny T5 vocabulary makes each character a token: a 40-character prompt passes CLIP's 77 tokens whole
    but not a 16-token T5 window."""
    loaded = _load(flux_dir, max_sequence_length=16)
    assert loaded.traits.max_prompt_tokens == {"prompt": 77, "prompt_2": 16}
    long, short = "x" * 40, "a cat"
    cases = [params(prompt=long, scheduler="euler", seed=1, guidance_scale=0), params(prompt=short, scheduler="euler")]
    reference = _reference(flux_dir, FluxPipeline)
    with running_engine(loaded) as engine:
        results = [f.result(timeout=60) for f in engine.submit(cases)]
    assert [r.prompt_truncated for r in results] == [True, False]
    for result, case in zip(results, cases, strict=True):
        assert np.abs(pixels(result.image) - diffusers_image(reference, case, 16)).max() <= TOLERANCE


def test_max_sequence_length_is_refused_for_models_without_t5(tiny_model_dir: Path) -> None:
    with pytest.raises(LoadError, match="--max_sequence_length is for models with a T5 encoder"):
        _load(tiny_model_dir, max_sequence_length=64)


@pytest.mark.parametrize(
    ("builtin", "body", "param", "words"),
    [
        ("tiny-flux", {"width": 72}, "width", "multiple of 16"),
        ("tiny-sd3", {"height": 88}, "height", "multiple of 16"),
        ("tiny-sd3", {"width": 1040}, "width", "at most 1024"),
        ("tiny-flux", {"scheduler": "ddim"}, "scheduler", "choose one of euler, unipc"),
        ("tiny-flux", {"scheduler": "dpmpp_2m"}, "scheduler", "choose one of euler, unipc"),
        ("tiny", {"scheduler": "heun"}, "scheduler", "choose one of dpmpp_2m"),
        ("tiny-flux", {"prompt_3": "t5"}, "prompt_3", "third text encoder"),
        ("tiny-sd3", {"true_cfg_scale": 2.0, "negative_prompt": "x"}, "true_cfg_scale", "FLUX"),
        ("tiny-flux", {"negative_prompt": "blurry"}, "negative_prompt", "true_cfg_scale above 1"),
        ("tiny-flux", {"true_cfg_scale": 3.0}, "true_cfg_scale", "needs a negative_prompt"),
        ("tiny-flux", {"guidance_scale": 3.5}, "guidance_scale", "distilled without guidance"),
    ],
)
def test_family_rules_are_400s_that_say_why(builtin: str, body: dict, param: str, words: str) -> None:
    traits = load_pipeline(None, f"builtin:{builtin}", None, "cpu", "float32").traits
    request = GenerationRequest.model_validate({"prompt": "a cat", **body})
    with pytest.raises(InvalidRequest) as error:
        resolve(request, Limits(max_image_size=2048).for_model(traits), traits, prefix="instances[0].")
    assert error.value.param == f"instances[0].{param}"
    assert words in error.value.message


def test_flux_dev_takes_guidance_and_defaults_come_from_the_family() -> None:
    traits = load_pipeline(None, "builtin:tiny-flux-dev", None, "cpu", "float32").traits
    limits = Limits().for_model(traits)
    assert (limits.default_scheduler, limits.default_guidance_scale) == ("euler", 3.5)
    resolved = resolve(GenerationRequest(prompt="a", guidance_scale=5.0, width=96, height=64), limits, traits)
    assert (resolved.guidance_scale, resolved.true_cfg_scale, resolved.width) == (5.0, 1.0, 96)


def test_flow_matching_families_default_to_bfloat16_on_cuda() -> None:
    cuda = torch.device("cuda")  # resolve_dtype only reads the device type: no GPU needed
    families = {family.name: family for family in FAMILIES}
    assert resolve_dtype("auto", cuda, families["flux"]) == torch.bfloat16
    assert resolve_dtype("auto", cuda, families["sd3"]) == torch.bfloat16
    assert resolve_dtype("auto", cuda, families["sdxl"]) == torch.float16
    assert resolve_dtype("float16", cuda, families["flux"]) == torch.float16  # --dtype still overrides
    assert resolve_dtype("auto", torch.device("cpu"), families["flux"]) == torch.float32


@pytest.mark.parametrize("directory", ["flux_dev_dir", "sd3_dir", "flux2_base_dir"])
def test_compiled_transformers_never_recompile_and_match_eager(directory: str, request) -> None:
    """--compile through the transformer adapters: one graph for every batch size after warm-up (the eager
    backend: dynamo's capture and guards are inductor's), and the images eager makes."""
    loaded = _load(request.getfixturevalue(directory))
    loaded.pipe.default_sample_size = 8  # saved to disk, FLUX's native size is its pipeline's 1024: compile at 64
    assert loaded.native_size == 64
    jobs = [
        params(prompt=f"c{i}", seed=i, num_inference_steps=2 + i % 2, guidance_scale=[0.0, 6.0][i % 2])
        for i in range(5)
    ]
    if loaded.family.name == "flux":
        jobs = [
            params(prompt=p.prompt, negative_prompt="n", true_cfg_scale=2.0, seed=p.seed) if i % 2 else p
            for i, p in enumerate(jobs)
        ]
    with running_engine(loaded, max_batch_size=4) as engine:
        expected = [pixels(f.result(timeout=60).image) for f in engine.submit(jobs)]
    with running_engine(loaded, max_batch_size=4, compile=True, compile_backend="eager") as engine:
        after_warmup = engine.runner.compiled_graphs()
        served = [pixels(f.result(timeout=60).image) for f in engine.submit(jobs)]
        assert engine.runner.compiled_graphs() == after_warmup, "a batch size compiled after warm-up"
    for got, want in zip(served, expected, strict=True):
        assert np.abs(got - want).max() <= TOLERANCE


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        # FLUX.1-dev's and -schnell's transformers (the guidance embedder is the difference), T5-XXL, CLIP-L.
        ("flux-arch", {"transformer": 11_901_408_320, "text_encoder_2": 4_762_310_656, "vae": 83_819_683}),
        ("flux-schnell-arch", {"transformer": 11_891_178_560, "text_encoder_2": 4_762_310_656}),
        # SD 3.5's parameters; their position embeddings (192² and 384² patches) are buffers, not parameters.
        ("sd35-arch", {"transformer": 8_056_627_520, "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656}),
        ("sd35-medium-arch", {"transformer": 2_243_171_520, "text_encoder": 123_650_304}),
    ],
)
def test_full_size_transformer_builtins_have_the_real_models_parameter_counts(name: str, parameters: dict) -> None:
    pipe = build_builtin(name, torch.device("meta"), torch.bfloat16)
    assert LoadedPipeline(pipe, name, torch.device("meta"), torch.bfloat16, True, 0.0).native_size == 1024
    for component, count in parameters.items():
        assert sum(p.numel() for p in getattr(pipe, component).parameters()) == count, component


def test_flux_server_reports_its_family_and_serves_every_protocol(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    flags = ("--default_steps", "2", "--max_sequence_length", "64")
    process = start_server(
        "--model_id", "builtin:tiny-flux", "--model_dir", str(tmp_path / "none"), *flags, port=port, log=log
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, port, log)
        info = httpx.get(f"{base}/v1/models/sd/schedulers").json()
        assert (info["family"], info["pipeline"], info["guidance"]) == ("flux", "FluxPipeline", "none")
        assert (info["schedulers"], info["default_scheduler"], info["default_guidance_scale"]) == (
            ["euler", "unipc"],
            "euler",
            0.0,
        )
        assert (info["image_size_multiple"], info["max_prompt_tokens"]) == (16, {"prompt": 77, "prompt_2": 64})
        assert info["request_fields"]["true_cfg_scale"] and not info["request_fields"]["prompt_3"]
        body = {"prompt": "a cat", "negative_prompt": "dog", "true_cfg_scale": 2.5, "seed": 7, "width": 96}
        image = httpx.post(f"{base}/generate", json=body, timeout=60)
        assert image.status_code == 200 and decode_image(image.content).shape == (64, 96, 3)
        v1 = httpx.post(f"{base}/v1/models/sd:predict", json={"instances": [{"prompt": "a", "width": 72}]})
        assert v1.status_code == 400 and v1.json()["param"] == "instances[0].width"
        v2 = {
            "inputs": [
                {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a"]},
                {"name": "prompt_3", "shape": [1], "datatype": "BYTES", "data": ["b"]},
            ]
        }
        refused = httpx.post(f"{base}/v2/models/sd/infer", json=v2)
        assert refused.status_code == 400 and refused.json()["param"] == "inputs.prompt_3"
        openai = httpx.post(f"{base}/v1/images/generations", json={"prompt": "a", "size": "64x64", "scheduler": "heun"})
        assert openai.status_code == 400 and "euler, unipc" in openai.json()["error"]["message"]
    finally:
        assert stop_server(process) == 0


def test_flux_bfloat16_mixed_batches_equal_diffusers(flux_dev_dir: Path) -> None:
    """FLUX in the GPU's dtype, on the CPU: batching moves no pixel past one grey level (the VAE decodes image by
    image, as a lone pipeline call does; batched, bfloat16 decodes moved pixels by 2 to 6 levels). SD3's tiny
    transformer in bfloat16 is not batch-invariant on the CPU (an unguided row beside guided ones moved 12
    levels), so it is held to this in float32 only."""
    loaded = load_pipeline(str(flux_dev_dir), "not/used", None, "cpu", "bfloat16")
    reference = FluxPipeline.from_pretrained(flux_dev_dir, use_safetensors=True, dtype=torch.bfloat16)
    reference.set_progress_bar_config(disable=True)
    cases = [
        params(scheduler=name, seed=i, guidance_scale=[0.0, 4.0][i % 2], num_inference_steps=3)
        for i, name in enumerate(loaded.traits.schedulers)
    ]
    true_cfg = params(scheduler="euler", seed=8, negative_prompt="dull", true_cfg_scale=3.0)
    _mixed(loaded, reference, [*cases, true_cfg, params(scheduler="euler", seed=9, width=96, guidance_scale=5.0)])


def test_flux_schedule_starts_at_its_first_step_when_a_strong_shift_repeats_it(flux_dev_dir: Path) -> None:
    """FLUX.1-dev's shift at 2048 px squeezes DPM-Solver's first integer timesteps together; the pipeline starts
    at index 0 (set_begin_index(0)), and so must each job, or it fails at its last step."""
    loaded = _load(flux_dev_dir)
    model = loaded.model
    for name in ("dpmpp_2m", "unipc"):
        scheduler = model.make_scheduler(name)
        model.set_timesteps(scheduler, 60, 2048, 2048)
        assert scheduler.timesteps[0] == scheduler.timesteps[1], "the case this test is about"
        model.set_first_step(scheduler)
        sample = torch.zeros(1, 4, 16)
        for t in scheduler.timesteps:  # every step, as the engine takes them
            sample = scheduler.step(torch.zeros_like(sample), t, sample, return_dict=False)[0]
        assert scheduler.step_index == len(scheduler.timesteps)
