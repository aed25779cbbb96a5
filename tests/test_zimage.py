"""Z-Image (and Z-Image-Turbo) through the same engine: each image equals diffusers' own ``ZImagePipeline``'s, alone
and in mixed batches (guided rows beside Turbo's unguided ones, prompts of different lengths in one transformer
call, jobs joining mid-flight); its traits; the full-size builtin's parameter counts; every protocol in process.
Its img2img and inpainting are checked against diffusers' with the other flow-matching families in test_images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from fastapi.testclient import TestClient

from predictor.builtin import build_tiny_zimage
from predictor.families import build_builtin
from predictor.loading import LoadedPipeline, load_pipeline
from predictor.testing import (
    MODEL_NAME,
    TOLERANCE,
    app_client,
    assert_alone_and_mixed_equal,
    assert_compiled_matches_eager,
    decode_image,
    diffusers_image,
    diffusers_pipeline,
    mixed_cases,
    params,
    pixels,
    running_engine,
)


@pytest.fixture(scope="module")
def zimage_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-zimage")
    build_tiny_zimage().save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def reference(zimage_dir: Path) -> ZImagePipeline:
    return diffusers_pipeline(zimage_dir, ZImagePipeline)


def _load(directory: Path, **flags) -> LoadedPipeline:
    return load_pipeline(str(directory), "not/used", None, "cpu", "float32", **flags)


def test_zimage_equals_diffusers_in_mixed_batches(zimage_dir: Path, reference: ZImagePipeline) -> None:
    loaded = _load(zimage_dir)
    traits = loaded.traits
    assert (traits.family, traits.guidance, traits.default_guidance_scale) == ("zimage", "cfg", 5.0)
    assert (traits.default_scheduler, traits.size_multiple) == ("euler", 16)
    assert traits.modes == {"text", "img2img", "inpaint"}  # ZImageImg2ImgPipeline's and ZImageInpaintPipeline's
    assert traits.max_prompt_tokens == {"prompt": 512}
    assert traits.native_size == 1024  # ZImagePipeline's default size: the saved tiny one has no other
    # The pipeline hands its sigmas to the scheduler as a list, which the multistep solvers cannot take and Heun
    # takes none of: diffusers' own pipeline runs with its Euler only, and so does the server.
    assert traits.schedulers == ("euler",)
    # Turbo's way (no guidance, no negative row) beside the base model's (guidance, a negative prompt or the
    # pipeline's ""), at two sizes; the prompts' lengths differ, so each row's caption has its own length.
    cases = mixed_cases(
        traits.schedulers,
        3,
        first=lambda i: {"guidance_scale": 0.0},
        second=lambda i: {
            "prompt": f"a red fox number {i} in the snow, long exposure" * (i + 1),
            "negative_prompt": "blurry" if i % 2 else None,
            "guidance_scale": 1.0 + 2 * i,
        },
    )
    expected = [diffusers_image(reference, case) for case in cases]
    assert_alone_and_mixed_equal(loaded, cases, expected, join_at_step=2, tolerance=TOLERANCE)


def test_a_prompt_past_the_token_window_is_cut_as_diffusers_cuts_it(
    zimage_dir: Path, reference: ZImagePipeline
) -> None:
    loaded = _load(zimage_dir, max_sequence_length=32)  # byte-level tokens: 32 is a short prompt and the template
    assert loaded.traits.max_prompt_tokens == {"prompt": 32}
    cases = [
        params(prompt="x" * 60, seed=1, guidance_scale=2.0, scheduler="euler"),
        params(prompt="a cat", guidance_scale=0.0, scheduler="euler"),
    ]
    with running_engine(loaded) as engine:
        results = [future.result(timeout=60) for future in engine.submit(cases)]
    assert [result.prompt_truncated for result in results] == [True, False]
    for result, case in zip(results, cases, strict=True):
        assert np.abs(pixels(result.image) - diffusers_image(reference, case, 32)).max() <= TOLERANCE


def test_full_size_builtin_has_the_real_models_parameter_counts() -> None:
    """Z-Image's 6.15B transformer, Qwen3-4B's text encoder (without its language-model head), the FLUX.1 VAE."""
    pipe = build_builtin("zimage-arch", torch.device("meta"), torch.bfloat16)
    assert LoadedPipeline(pipe, "zimage-arch", torch.device("meta"), torch.bfloat16, True, 0.0).native_size == 1024
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("transformer", "vae")}
    assert counts == {"transformer": 6_154_908_736, "vae": 83_819_683}
    assert sum(p.numel() for p in pipe.text_encoder.parameters()) == 4_022_468_096


@pytest.fixture(scope="module")
def client(zimage_dir: Path) -> Iterator[TestClient]:
    flags = ("--default_steps", "2", "--warmup_steps", "0", "--max_sequence_length", "64")
    with app_client(zimage_dir, *flags) as test_client:
        yield test_client


def test_every_protocol_serves_zimage(client: TestClient) -> None:
    info = client.get(f"/v1/models/{MODEL_NAME}/schedulers").json()
    assert (info["family"], info["pipeline"], info["guidance"], info["modes"]) == (
        "zimage",
        "ZImagePipeline",
        "cfg",
        ["img2img", "inpaint", "text"],
    )
    image = client.post("/generate", json={"prompt": "a cat", "seed": 7, "width": 96, "height": 64})
    assert image.status_code == 200 and decode_image(image.content).shape == (64, 96, 3)
    turbo = client.post("/generate", json={"prompt": "a cat", "guidance_scale": 0, "width": 64, "height": 64})
    assert turbo.status_code == 200
    v1 = client.post(f"/v1/models/{MODEL_NAME}:predict", json={"instances": [{"prompt": "a", "width": 72}]})
    assert v1.status_code == 400 and v1.json()["param"] == "instances[0].width"
    v2 = {
        "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
        "parameters": {"width": 64, "height": 64},
    }
    assert client.post(f"/v2/models/{MODEL_NAME}/infer", json=v2).status_code == 200
    openai = client.post("/v1/images/generations", json={"prompt": "a", "size": "64x64"})
    assert openai.status_code == 200 and openai.json()["data"][0]["b64_json"]
    refused = client.post("/generate", json={"prompt": "a", "prompt_2": "b", "width": 64, "height": 64})
    assert refused.status_code == 400 and refused.json()["param"] == "prompt_2"
    edit = client.post("/generate", json={"prompt": "a", "image": _png(64), "strength": 0.5})
    assert edit.status_code == 200 and decode_image(edit.content).shape == (64, 64, 3)  # the input's size


def _png(size: int) -> str:
    from PIL import Image

    from predictor.images import encode_png

    return encode_png(Image.new("RGB", (size, size), (20, 40, 60)))


def test_compiled_by_region_never_recompiles_and_matches_eager(zimage_dir: Path) -> None:
    """--compile compiles Z-Image's blocks by region with dynamic sequence sizes: prompts of new lengths, one row
    or several, guided or not and another image size compile nothing after warm-up (the eager backend: dynamo's
    capture and guards are inductor's), and the images are eager's."""
    loaded = _load(zimage_dir)
    loaded.pipe.default_sample_size = 8  # saved to disk, the native size is the pipeline's 1024: compile at 64
    sentence = "a lighthouse on a cliff at dusk with gulls and a storm coming in from the sea"
    jobs = [
        params(
            prompt=sentence[: 3 + 20 * i],
            scheduler="euler",
            seed=i,
            num_inference_steps=2,
            guidance_scale=[0.0, 4.0][i % 2],
        )
        for i in range(4)
    ]
    jobs.append(
        params(prompt="a tall one", scheduler="euler", seed=9, num_inference_steps=2, guidance_scale=0.0, height=96)
    )
    assert_compiled_matches_eager(loaded, jobs, max_batch_size=3)
