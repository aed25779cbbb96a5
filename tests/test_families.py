"""SD 2.x (v-prediction), SDXL and LCM-distilled checkpoints through the same engine: each image equals diffusers'
own pipeline for that family (alone and inside mixed batches, for every scheduler), family detection from
model_index.json, SDXL's negative-prompt and size conditioning, the float32 VAE, and per-deployment defaults.

Tolerance as in test_engine.py: one uint8 level (a batch's matrix products sum in another order)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from fastapi.testclient import TestClient

from predictor.builtin import (
    SD_V1_SCHEDULER_CONFIG,
    SDXL_SCHEDULER_CONFIG,
    build_tiny,
    build_tiny_sdxl,
)
from predictor.errors import InvalidRequest, LoadError
from predictor.families import FAMILIES, build_builtin
from predictor.families.base import make_scheduler
from predictor.families.sd import UNET_SCHEDULERS as SCHEDULERS
from predictor.loading import LoadedPipeline, load_pipeline
from predictor.model import DiffusionModel
from predictor.request import FAMILY_FIELDS, GenerationRequest, Limits, ModelTraits, resolve
from predictor.testing import (
    MODEL_NAME,
    TOLERANCE,
    StepLog,
    app_client,
    decode_image,
    diffusers_image,
    diffusers_pipeline,
    make_settings,
    params,
    pixels,
    running_engine,
)

SCHEDULER_NAMES = tuple(SCHEDULERS)  # the UNet families' registry


def from_base64(text: str) -> bytes:
    return base64.b64decode(text)


def _reference(directory: Path, cls: type[DiffusionPipeline], dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    return diffusers_pipeline(directory, cls, dtype)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return load_pipeline(str(tiny_sdxl_dir), "not/used", None, "cpu", "float32")


@pytest.fixture(scope="module")
def sdxl_reference(tiny_sdxl_dir):
    return _reference(tiny_sdxl_dir, StableDiffusionXLPipeline)


@pytest.fixture(scope="module")
def sd2(tiny_sd2_dir):
    return load_pipeline(str(tiny_sd2_dir), "not/used", None, "cpu", "float32")


@pytest.fixture(scope="module")
def sd2_reference(tiny_sd2_dir):
    return _reference(tiny_sd2_dir, StableDiffusionPipeline)


class UNetCalls:
    """The batch size of every UNet call, from a forward hook on the real UNet."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.rows: list[tuple[int, tuple[int, int]]] = []
        self._handle = unet.register_forward_pre_hook(self._record)

    def _record(self, module, args) -> None:
        sample = args[0]
        self.rows.append((sample.shape[0], tuple(sample.shape[-2:])))

    def close(self) -> None:
        self._handle.remove()


def _mixed_batch(loaded, reference, target, others) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The target alone, then with ``others`` in flight before it and joining mid-flight; and diffusers' image."""
    expected = diffusers_image(reference, target)
    with running_engine(loaded, max_batch_size=8) as engine:
        alone = pixels(engine.generate(target).image)
        early = engine.submit(others[:2])
        late: list = []

        def join_later(step: int) -> None:
            if step == 2 and not late:
                late.extend(engine.submit(others[2:]))

        log = StepLog()
        mixed = pixels(engine.submit([target], on_progress=log.callback("t", join_later))[0].result(timeout=120).image)
        for future in early + late:
            future.result(timeout=120)
    assert late, "the later jobs joined while the target was running"
    return alone, mixed, expected


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_sdxl_matches_diffusers_alone_and_in_mixed_batches(sdxl, sdxl_reference, scheduler: str) -> None:
    index = SCHEDULER_NAMES.index(scheduler)
    # Every combination of the four texts across the schedulers, under guidance (7.5), where negatives count.
    target = params(
        scheduler=scheduler,
        seed=2000 + index,
        prompt_2="oil on canvas" if index % 2 else None,
        negative_prompt=[None, "", "blurry"][index % 3],
        negative_prompt_2="grainy" if index % 4 < 2 else None,
    )
    others = [
        params(
            prompt=f"other {i}",
            prompt_2=f"style {i}" if i % 2 else None,
            seed=i,
            scheduler=SCHEDULER_NAMES[(index + i + 1) % len(SCHEDULER_NAMES)],
            num_inference_steps=3 + i,
            guidance_scale=[1.0, 4.0, 9.0, 0.0][i % 4],
            negative_prompt=[None, "", "low quality"][i % 3],
            negative_prompt_2="grainy" if i == 2 else None,
            width=[64, 96][i % 2],  # another size: another batch group, taking turns with the target's
        )
        for i in range(5)
    ]
    alone, mixed, expected = _mixed_batch(sdxl, sdxl_reference, target, others)
    assert expected.std() > 5, "the tiny model must produce a varied image for this test to mean anything"
    assert np.abs(alone - expected).max() <= TOLERANCE
    assert np.abs(mixed - expected).max() <= TOLERANCE


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_sd2_v_prediction_matches_diffusers_alone_and_in_mixed_batches(sd2, sd2_reference, scheduler: str) -> None:
    assert sd2.pipe.scheduler.config.prediction_type == "v_prediction"
    index = SCHEDULER_NAMES.index(scheduler)
    target = params(scheduler=scheduler, seed=3000 + index, negative_prompt="blurry" if index % 2 else None)
    others = [
        params(
            prompt=f"other {i}",
            seed=i,
            scheduler=SCHEDULER_NAMES[(index + i + 1) % len(SCHEDULER_NAMES)],
            num_inference_steps=3 + i,
            guidance_scale=[1.0, 4.0, 9.0][i % 3],
        )
        for i in range(4)
    ]
    alone, mixed, expected = _mixed_batch(sd2, sd2_reference, target, others)
    assert expected.std() > 5
    assert np.abs(alone - expected).max() <= TOLERANCE
    assert np.abs(mixed - expected).max() <= TOLERANCE


def test_sdxl_absent_negative_prompt_is_zeros_but_an_explicit_empty_one_is_encoded(sdxl, sdxl_reference) -> None:
    """diffusers' force_zeros_for_empty_prompt: the two requests differ, and each matches diffusers' own."""
    absent, empty = params(seed=5, negative_prompt=None), params(seed=5, negative_prompt="")
    assert sdxl.pipe.config.force_zeros_for_empty_prompt
    with running_engine(sdxl) as engine:
        images = [pixels(engine.generate(p).image) for p in (absent, empty)]
    for image, p in zip(images, (absent, empty), strict=True):
        assert np.abs(image - diffusers_image(sdxl_reference, p)).max() <= TOLERANCE
    assert np.abs(images[0] - images[1]).max() > 10


def test_sdxl_sizes_run_as_separate_groups_and_one_size_shares_one_unet_call(sdxl) -> None:
    same = [params(seed=i, num_inference_steps=4) for i in range(3)]
    other_size = [params(seed=9, num_inference_steps=4, width=96, height=64)]
    with running_engine(sdxl, max_batch_size=8) as engine:
        calls = UNetCalls(sdxl.pipe.unet)
        try:
            futures = engine.submit(same + other_size)
            for future in futures:
                future.result(timeout=60)
        finally:
            calls.close()
    # Three guided images of 64x64 (latents 8x8): six rows in each UNet call; the 64x96 image's two rows apart.
    assert sorted(set(calls.rows)) == [(2, (8, 12)), (6, (8, 8))]
    assert calls.rows.count((6, (8, 8))) == 4 and calls.rows.count((2, (8, 12))) == 4


def test_sdxl_second_prompt_truncation_is_reported(sdxl) -> None:
    with running_engine(sdxl) as engine:
        short = engine.generate(params(prompt="a cat", prompt_2="a dog", num_inference_steps=1))
        long_second = engine.generate(params(prompt="a cat", prompt_2="very " * 100, num_inference_steps=1))
    assert not short.prompt_truncated
    assert long_second.prompt_truncated


def test_sdxl_float16_vae_decodes_in_float32_like_diffusers(tiny_sdxl_dir) -> None:
    """SDXL's VAE has force_upcast: in float16 it is kept in float32, as diffusers upcasts it for each decode."""
    loaded = load_pipeline(str(tiny_sdxl_dir), "not/used", None, "cpu", "float16")
    p = params(seed=11, num_inference_steps=3)
    with running_engine(loaded) as engine:
        assert engine.runner.model.vae.dtype == torch.float32 and loaded.pipe.unet.dtype == torch.float16
        assert loaded.pipe.vae.dtype == torch.float16, "the pipeline object stays as loaded"
        served = pixels(engine.generate(p).image)
    reference = _reference(tiny_sdxl_dir, StableDiffusionXLPipeline, torch.float16)
    expected = diffusers_image(reference, p)
    assert reference.vae.dtype == torch.float16, "diffusers casts its VAE back after each decode"
    assert expected.std() > 5 and np.abs(served - expected).max() <= TOLERANCE


LCM_SCHEDULER_CONFIG = {key: value for key, value in SD_V1_SCHEDULER_CONFIG.items() if key != "skip_prk_steps"}


def _lcm_distilled(pipe: DiffusionPipeline, cls: type[DiffusionPipeline] | None = None) -> DiffusionPipeline:
    """``pipe`` with a UNet that embeds the guidance scale (time_cond_proj_dim), as LCM distillation leaves it."""
    torch.manual_seed(1)
    pipe.unet = UNet2DConditionModel.from_config(pipe.unet.config, time_cond_proj_dim=32)
    pipe.scheduler = LCMScheduler.from_config(LCM_SCHEDULER_CONFIG)
    return pipe if cls is None else cls(**pipe.components)


@pytest.mark.parametrize(
    ("make", "cls"),
    [
        (lambda: _lcm_distilled(build_tiny()), StableDiffusionPipeline),
        (lambda: _lcm_distilled(build_tiny(), LatentConsistencyModelPipeline), LatentConsistencyModelPipeline),
        (lambda: _lcm_distilled(build_tiny_sdxl()), StableDiffusionXLPipeline),
    ],
    ids=["sd", "latent-consistency-pipeline", "sdxl"],
)
def test_lcm_distilled_unet_takes_guidance_as_an_embedding_and_matches_diffusers(tmp_path: Path, make, cls) -> None:
    """An LCM-distilled UNet (time_cond_proj_dim) runs one row per image with the guidance scale embedded."""
    make().save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_pipeline(str(tmp_path), "not/used", None, "cpu", "float32")
    assert type(loaded.pipe) is cls
    reference = _reference(tmp_path, cls)
    jobs = [params(scheduler="lcm", num_inference_steps=4, guidance_scale=g, seed=s) for g, s in ((8.0, 1), (2.0, 2))]
    with running_engine(loaded) as engine:
        calls = UNetCalls(loaded.pipe.unet)
        try:
            served = [pixels(future.result(timeout=60).image) for future in engine.submit(jobs)]
        finally:
            calls.close()
    assert {rows for rows, _ in calls.rows} == {2}, "two images, one row each: no guidance rows"
    for image, p in zip(served, jobs, strict=True):
        assert np.abs(image - diffusers_image(reference, p)).max() <= TOLERANCE
    assert np.abs(served[0] - served[1]).max() > 10, "the guidance embedding changes the image"


def test_lcm_step_limit_is_the_checkpoints_own(tmp_path: Path) -> None:
    """LCMScheduler takes at most its config's original_inference_steps: more is a 400 naming the field, and a
    deployment whose default exceeds it does not start."""
    pipe = _lcm_distilled(build_tiny())
    pipe.scheduler = LCMScheduler.from_config(LCM_SCHEDULER_CONFIG, original_inference_steps=20)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    traits = load_pipeline(str(tmp_path), "not/used", None, "cpu", "float32").traits
    assert traits.lcm_max_steps == 20
    lcm = {"prompt": "a cat", "scheduler": "lcm"}
    assert resolve(GenerationRequest(**lcm, num_inference_steps=20), Limits(), traits).num_inference_steps == 20
    with pytest.raises(InvalidRequest) as error:
        resolve(GenerationRequest(**lcm, num_inference_steps=21), Limits(), traits, prefix="instances[0].")
    assert error.value.param == "instances[0].num_inference_steps"
    assert "at most 20 with scheduler 'lcm'" in error.value.message
    settings = make_settings(tmp_path, "--default_scheduler", "lcm", "--default_steps", "25")
    with pytest.raises(LoadError, match="at most 20 with scheduler 'lcm'"):
        DiffusionModel(settings).load()


def test_schedulers_are_made_as_diffusers_makes_them_without_a_warning_per_request(caplog) -> None:
    """From the checkpoint's whole config (DPM-Solver with Karras sigmas reads a Euler config's sigma_min and
    sigma_max), and without diffusers' warning about fields a class does not take."""
    base = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG, sigma_min=0.0292, sigma_max=14.6146)
    with caplog.at_level("WARNING"):
        for name, (cls, overrides) in SCHEDULERS.items():
            ours = make_scheduler(SCHEDULERS, name, base.config)
            theirs = cls.from_config(base.config, **overrides(base.config))
            assert dict(ours.config) == dict(theirs.config), name
            ours.set_timesteps(10), theirs.set_timesteps(10)
            assert torch.equal(ours.timesteps, theirs.timesteps), name
            if hasattr(theirs, "sigmas"):
                assert torch.equal(ours.sigmas, theirs.sigmas), name
    assert make_scheduler(SCHEDULERS, "dpmpp_2m_karras", base.config).sigmas[0] < 15, "the checkpoint's sigma_max holds"
    assert not [r for r in caplog.records if "not expected" in r.getMessage()]


def test_family_and_native_size_come_from_the_checkpoint(tiny_sdxl_dir, tiny_sd2_dir, tiny_model_dir) -> None:
    for directory, family, native in (
        (tiny_model_dir, "sd", 64),
        (tiny_sd2_dir, "sd", 64),
        (tiny_sdxl_dir, "sdxl", 64),
    ):
        loaded = load_pipeline(str(directory), "not/used", None, "cpu", "float32")
        assert (loaded.family.name, loaded.native_size) == (family, native)


def test_unsupported_pipeline_class_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "PixArtAlphaPipeline", "_diffusers_version": "0"})
    )
    with pytest.raises(LoadError) as error:
        load_pipeline(str(tmp_path), "not/used", None, "cpu", "float32")
    message = str(error.value)
    assert "PixArtAlphaPipeline" in message
    for family in FAMILIES:
        for served in family.pipelines:
            assert served.pipeline_class.__name__ in message


def test_checkpoint_scheduler_config_carries_over_to_every_scheduler(tmp_path: Path) -> None:
    """A Turbo checkpoint's trailing timestep spacing holds for whichever scheduler a request names."""
    pipe = build_tiny_sdxl()
    turbo = {**pipe.scheduler.config, "timestep_spacing": "trailing"}
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(turbo)
    for name in SCHEDULER_NAMES:
        scheduler = make_scheduler(SCHEDULERS, name, pipe.scheduler.config)
        if "timestep_spacing" in scheduler.config:
            assert scheduler.config.timestep_spacing == "trailing", name
    one_step = make_scheduler(SCHEDULERS, "euler_a", pipe.scheduler.config)
    one_step.set_timesteps(1)
    assert one_step.timesteps.tolist() == [999]  # trailing: a single step starts from pure noise


def test_second_prompt_is_refused_for_a_family_without_a_second_encoder() -> None:
    request = GenerationRequest(prompt="a cat", prompt_2="a dog")
    with pytest.raises(InvalidRequest) as error:
        resolve(request, Limits(), ModelTraits("sd", 512, second_text_encoder=False), prefix="instances[0].")
    assert error.value.param == "instances[0].prompt_2"
    assert "second text encoder" in error.value.message
    resolved = resolve(request, Limits(), ModelTraits("sdxl", 1024, second_text_encoder=True))
    assert (resolved.prompt_2, resolved.width) == ("a dog", 1024)


@pytest.mark.parametrize(
    ("name", "native_size", "parameters"),
    [
        ("sd-v1-arch", 512, {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}),
        ("sd2-arch", 768, {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863}),
        (
            "sdxl-arch",
            1024,
            {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863},
        ),
    ],
)
def test_full_size_builtins_have_the_real_models_parameter_counts(
    name: str, native_size: int, parameters: dict[str, int]
) -> None:
    """Built on the meta device (no memory, no time): the counts and native size the released checkpoints have."""
    pipe = build_builtin(name, torch.device("meta"), torch.float16)
    assert LoadedPipeline(pipe, name, torch.device("meta"), torch.float16, True, 0.0).native_size == native_size
    counts = {
        component: sum(p.numel() for p in module.parameters())
        for component, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }
    assert counts == parameters


@pytest.fixture(scope="module")
def turbo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL saved as SDXL-Turbo ships: Euler ancestral with trailing timestep spacing."""
    directory = tmp_path_factory.mktemp("tiny-sdxl-turbo")
    pipe = build_tiny_sdxl()
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def turbo_client(turbo_dir: Path) -> Iterator[TestClient]:
    """The real app on the Turbo-like checkpoint, deployed with the Turbo overlay's defaults."""
    flags = ("--default_steps", "2", "--default_guidance_scale", "0", "--default_scheduler", "euler_a")
    with app_client(turbo_dir, *flags, "--warmup_steps", "1") as client:
        yield client


def test_turbo_deployment_reports_its_defaults_and_family(turbo_client: TestClient) -> None:
    info = turbo_client.get(f"/v1/models/{MODEL_NAME}/schedulers").json()
    assert (info["family"], info["pipeline"], info["native_size"]) == ("sdxl", "StableDiffusionXLPipeline", 64)
    assert (info["default_steps"], info["default_guidance_scale"], info["default_scheduler"]) == (2, 0.0, "euler_a")
    assert info["checkpoint_scheduler"]["timestep_spacing"] == "trailing"
    assert info["request_fields"] == {
        **dict.fromkeys(FAMILY_FIELDS, False),
        "prompt_2": True,
        "negative_prompt_2": True,
    }


def test_turbo_defaults_and_second_prompts_reach_the_image_over_every_protocol(
    turbo_client: TestClient, turbo_dir: Path
) -> None:
    """A request that names only prompts gets the deployment's steps, guidance and scheduler; prompt_2 and
    negative_prompt_2 travel in /generate, v1, v2 and the OpenAI route alike; the image is diffusers' own."""
    texts = {"prompt": "a red fox", "prompt_2": "woodcut print", "negative_prompt_2": "blurry"}
    expected = diffusers_image(
        _reference(turbo_dir, StableDiffusionXLPipeline),
        params(**texts, seed=4, num_inference_steps=2, guidance_scale=0.0, scheduler="euler_a"),
    )
    assert expected.std() > 5
    generate = turbo_client.post("/generate", json={**texts, "seed": 4})
    assert generate.status_code == 200, generate.text
    v1 = turbo_client.post(f"/v1/models/{MODEL_NAME}:predict", json={"instances": [{**texts, "seed": 4}]})
    inputs = [{"name": name, "datatype": "BYTES", "shape": [1], "data": [text]} for name, text in texts.items()]
    v2 = turbo_client.post(f"/v2/models/{MODEL_NAME}/infer", json={"inputs": inputs, "parameters": {"seed": 4}})
    openai = turbo_client.post("/v1/images/generations", json={**texts, "seed": 4})
    for response in (v1, v2, openai):
        assert response.status_code == 200, response.text
    served = [
        generate.content,
        from_base64(v1.json()["predictions"][0]["image"]["b64"]),
        from_base64(v2.json()["outputs"][0]["data"][0]),
        from_base64(openai.json()["data"][0]["b64_json"]),
    ]
    for data in served:
        assert np.abs(decode_image(data) - expected).max() <= TOLERANCE


def test_compiled_sdxl_never_recompiles_and_matches_eager(sdxl) -> None:
    """--compile with SDXL's nested added conditioning: one UNet graph for every batch size after warm-up (the eager
    backend: dynamo's capture and guards are the same as inductor's), and the images eager makes."""
    jobs = [
        params(prompt=f"c{i}", seed=i, num_inference_steps=2 + i % 2, guidance_scale=[0.0, 6.0][i % 2])
        for i in range(5)
    ]
    with running_engine(sdxl, max_batch_size=4) as engine:
        expected = [pixels(f.result(timeout=60).image) for f in engine.submit(jobs)]
    with running_engine(sdxl, max_batch_size=4, compile=True, compile_backend="eager") as engine:
        after_warmup = engine.runner.compiled_graphs()
        served = [pixels(f.result(timeout=60).image) for f in engine.submit(jobs)]
        assert engine.runner.compiled_graphs() == after_warmup, "a batch size compiled after warm-up"
    for got, want in zip(served, expected, strict=True):
        assert np.abs(got - want).max() <= TOLERANCE
