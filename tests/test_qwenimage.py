"""Qwen-Image through the same engine: each image equals diffusers' own ``QwenImagePipeline``'s, alone and in mixed
batches (true-CFG rows beside unguided ones, prompts of different lengths padded and masked in one transformer call,
jobs joining mid-flight); its traits and request rules; the full-size builtin's parameter counts; --compile by
region; every protocol in process. Its img2img and inpainting are checked against diffusers' with the other
flow-matching families in test_images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from fastapi.testclient import TestClient

from predictor.builtin import build_tiny_qwenimage
from predictor.errors import InvalidRequest
from predictor.families import build_builtin
from predictor.loading import LoadedPipeline, load_pipeline
from predictor.request import GenerationRequest, Limits, resolve
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
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-qwenimage")
    build_tiny_qwenimage().save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def reference(qwen_dir: Path) -> QwenImagePipeline:
    return diffusers_pipeline(qwen_dir, QwenImagePipeline)


def _load(directory: Path, **flags) -> LoadedPipeline:
    return load_pipeline(str(directory), "not/used", None, "cpu", "float32", **flags)


def test_qwenimage_equals_diffusers_in_mixed_batches(qwen_dir: Path, reference: QwenImagePipeline) -> None:
    loaded = _load(qwen_dir)
    traits = loaded.traits
    assert (traits.family, traits.guidance, traits.default_true_cfg_scale) == ("qwenimage", "none", 4.0)
    assert (traits.size_multiple, traits.max_prompt_tokens) == (16, {"prompt": 512})
    assert traits.modes == {"text", "img2img", "inpaint"}  # QwenImageImg2ImgPipeline's and QwenImageInpaintPipeline's
    assert traits.native_size == 1024  # QwenImagePipeline's default size: the saved tiny one has no other
    assert traits.takes("true_cfg_scale") and traits.default_scheduler == "euler"
    # Unguided rows beside true-CFG ones (the pipeline's default scale 4, and others), at two sizes; the prompts'
    # lengths differ, so the captions in one call are padded and masked.
    cases = mixed_cases(
        traits.schedulers,
        3,
        first=lambda i: {"true_cfg_scale": 4.0},
        second=lambda i: {
            "prompt": f"a red fox number {i} in the snow, long exposure" * (i + 1),
            "negative_prompt": "blurry" if i % 2 == 0 else " ",
            "true_cfg_scale": 2.0 + 2 * i,
        },
    )
    expected = [diffusers_image(reference, case) for case in cases]
    assert_alone_and_mixed_equal(loaded, cases, expected, join_at_step=2, tolerance=TOLERANCE)


def test_true_cfg_is_rescaled_as_the_pipeline_rescales_it(qwen_dir: Path, reference: QwenImagePipeline) -> None:
    """A guided image and an unguided one (a true_cfg_scale without a negative prompt: one row) each equal the
    pipeline's; the mix is rescaled, the plain mix (FLUX.1's) is another prediction."""
    loaded = _load(qwen_dir)
    guided = params(scheduler="euler", seed=3, num_inference_steps=3, negative_prompt="dull", true_cfg_scale=6.0)
    plain = params(scheduler="euler", seed=3, num_inference_steps=3, true_cfg_scale=6.0)
    with running_engine(loaded) as engine:
        got_guided, got_plain = (pixels(f.result(timeout=60).image) for f in engine.submit([guided, plain]))
    assert np.abs(got_guided - diffusers_image(reference, guided)).max() <= TOLERANCE
    assert np.abs(got_plain - diffusers_image(reference, plain)).max() <= TOLERANCE
    model = loaded.model
    uncond, text = torch.randn(1, 16, 8), torch.randn(1, 16, 8)
    unscaled = uncond + 6.0 * (text - uncond)
    assert not torch.allclose(model.mix_guidance(uncond, text, guided), unscaled)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"guidance_scale": 3.0}, "guidance_scale", "true_cfg_scale with a negative_prompt"),
        ({"true_cfg_scale": 3.0}, "true_cfg_scale", "needs a negative_prompt"),
        ({"negative_prompt": "x", "true_cfg_scale": 1.0}, "negative_prompt", "only with true_cfg_scale above 1"),
        ({"prompt_2": "x"}, "prompt_2", ""),
    ],
)
def test_guidance_requests_the_model_cannot_honour_are_400s_that_say_why(
    qwen_dir: Path, body: dict, param: str, words: str
) -> None:
    traits = _load(qwen_dir).traits
    with pytest.raises(InvalidRequest) as error:
        resolve(GenerationRequest(prompt="a", **body), Limits().for_model(traits), traits)
    assert error.value.param == param and words in error.value.message
    # The pipeline's default scale, 4, guides once a negative prompt is given; without one, one row.
    resolved = resolve(GenerationRequest(prompt="a", negative_prompt="x"), Limits().for_model(traits), traits)
    assert resolved.true_cfg_scale == 4.0


def test_compiled_by_region_never_recompiles_and_matches_eager(qwen_dir: Path) -> None:
    loaded = _load(qwen_dir)
    loaded.pipe.default_sample_size = 8  # saved to disk, the native size is the pipeline's 1024: compile at 64
    sentence = "a lighthouse on a cliff at dusk with gulls and a storm coming in from the sea"
    jobs = [
        params(prompt=sentence[: 3 + 20 * i], scheduler="euler", seed=i, num_inference_steps=2, true_cfg_scale=3.0)
        for i in range(4)
    ]
    jobs = [p if i % 2 else params(**{**vars(p), "negative_prompt": "n"}) for i, p in enumerate(jobs)]
    assert_compiled_matches_eager(loaded, jobs, max_batch_size=3)


def test_full_size_builtin_has_the_real_models_parameter_counts() -> None:
    """Qwen-Image's transformer (20.4B), Qwen2.5-VL-7B (its language model, vision tower and head), the VAE."""
    pipe = build_builtin("qwenimage-arch", torch.device("meta"), torch.bfloat16)
    loaded = LoadedPipeline(pipe, "qwenimage-arch", torch.device("meta"), torch.bfloat16, True, 0.0)
    assert loaded.native_size == 1024
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("transformer", "vae")}
    assert counts == {"transformer": 20_430_401_088, "vae": 126_892_531}
    assert sum(p.numel() for p in pipe.text_encoder.parameters()) == 8_292_166_656


@pytest.fixture(scope="module")
def client(qwen_dir: Path) -> Iterator[TestClient]:
    flags = ("--default_steps", "2", "--warmup_steps", "0", "--max_sequence_length", "64")
    with app_client(qwen_dir, *flags) as test_client:
        yield test_client


def test_every_protocol_serves_qwenimage(client: TestClient) -> None:
    info = client.get(f"/v1/models/{MODEL_NAME}/schedulers").json()
    assert (info["family"], info["pipeline"], info["guidance"], info["modes"]) == (
        "qwenimage",
        "QwenImagePipeline",
        "none",
        ["img2img", "inpaint", "text"],
    )
    assert info["request_fields"]["true_cfg_scale"] and not info["request_fields"]["prompt_2"]
    assert (info["default_true_cfg_scale"], info["schedulers"]) == (4.0, ["euler", "unipc"])
    body = {"prompt": "a cat", "negative_prompt": "a dog", "seed": 7, "width": 96, "height": 64}
    image = client.post("/generate", json=body)
    assert image.status_code == 200 and decode_image(image.content).shape == (64, 96, 3)
    v1 = client.post(f"/v1/models/{MODEL_NAME}:predict", json={"instances": [{"prompt": "a", "width": 72}]})
    assert v1.status_code == 400 and v1.json()["param"] == "instances[0].width"
    v2 = {
        "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
        "parameters": {"width": 64, "height": 64, "true_cfg_scale": 1.0},
    }
    assert client.post(f"/v2/models/{MODEL_NAME}/infer", json=v2).status_code == 200
    openai = client.post("/v1/images/generations", json={"prompt": "a", "size": "64x64", "negative_prompt": "b"})
    assert openai.status_code == 200 and openai.json()["data"][0]["b64_json"]
    streamed = {"prompt": "a", "width": 64, "height": 64, "num_inference_steps": 3, "partial_images": 2}
    with client.stream("POST", "/generate", json=streamed, headers={"accept": "text/event-stream"}) as response:
        events = [line for line in response.iter_lines() if line.startswith("event: ")]
    assert events.count("event: preview") == 2 and events[-1] == "event: image"  # previews of the video VAE's frame
    image_job = client.post("/generate", json={"prompt": "a", "image": _png(64), "strength": 0.5})
    assert image_job.status_code == 200 and decode_image(image_job.content).shape == (64, 64, 3)  # the input's size


def _png(size: int) -> str:
    from PIL import Image

    from predictor.images import encode_png

    return encode_png(Image.new("RGB", (size, size), (20, 40, 60)))
