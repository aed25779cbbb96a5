"""Qwen-Image through the same engine: each image equals diffusers' own ``QwenImagePipeline``'s, alone and in mixed
batches (true-CFG rows beside unguided ones, prompts of different lengths padded and masked in one transformer call,
jobs joining mid-flight); its traits and request rules; the full-size builtin's parameter counts; --compile by
region; every protocol in process. Its img2img and inpainting are checked against diffusers' with the other
flow-matching families in test_images."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline
from fastapi.testclient import TestClient
from PIL import Image

from predictor.builtin import build_tiny_qwenimage, build_tiny_qwenimage_edit, build_tiny_qwenimage_edit_plus
from predictor.errors import InvalidRequest
from predictor.families import build_builtin
from predictor.images import encode_png
from predictor.loading import LoadedPipeline, load_pipeline
from predictor.request import GenerationParams, GenerationRequest, Limits, resolve
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
    save_as_released,
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
    edit = build_builtin("qwenimage-edit-plus-arch", torch.device("meta"), torch.bfloat16)  # Edit-2509/2511's
    assert sum(p.numel() for p in edit.transformer.parameters()) == counts["transformer"]
    assert sum(p.numel() for p in edit.text_encoder.parameters()) == 8_292_166_656


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


# ---- Qwen-Image-Edit-Plus (2509/2511): one to three input images ----------------------------------------------


@pytest.fixture(scope="module")
def edit_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny Edit-Plus pipeline as the release is laid out (its processor folder a Qwen2VLProcessor's). The
    pipeline's module fixes the areas its input images are resized to (1024x1024 for the VAE, 384x384 for the
    encoder); both the pipeline and the server read them from there, so a tiny model gets tiny ones, as it gets a
    tiny native size: 128x128 and 64x64, which keeps each edit under a second on a CPU."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "VAE_IMAGE_SIZE", 128 * 128)
        patch.setattr(module, "CONDITION_IMAGE_SIZE", 64 * 64)
        yield save_as_released(build_tiny_qwenimage_edit_plus(), tmp_path_factory.mktemp("tiny-qwenimage-edit"))


def _picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _edit(traits, *images: Image.Image, **body) -> GenerationParams:
    encoded = [encode_png(image) for image in images]
    request = GenerationRequest(prompt="make it blue", image=encoded if len(encoded) > 1 else encoded[0], **body)
    return resolve(request, Limits().for_model(traits), traits)


def test_edits_of_one_two_and_three_images_equal_diffusers_in_mixed_batches(edit_dir: Path) -> None:
    """Each edit equals QwenImageEditPlusPipeline's with the same images: the images through the encoder (as the
    prompt's image tokens, at 384x384's area) and the VAE (at 1024x1024's, their latents after the image's), with and
    without true CFG, alone and with edits of the same layout sharing calls, one joining mid-flight."""
    loaded = _load(edit_dir)
    traits = loaded.traits
    assert traits.modes == {"edit"} and traits.max_reference_images == 3
    reference = diffusers_pipeline(edit_dir, QwenImageEditPlusPipeline, processor=loaded.pipe.processor)
    first, second, third = _picture(96, 64, 1), _picture(64, 80, 2), _picture(64, 64, 3)
    common = {"num_inference_steps": 2, "scheduler": "euler", "width": 64, "height": 64}
    cases = [
        _edit(traits, first, seed=1, negative_prompt=" ", **common),
        _edit(traits, first, second, seed=2, **common),
        _edit(traits, first, seed=3, **common),  # the first's layout, without true CFG: shares its calls
        _edit(traits, first, second, third, seed=4, negative_prompt="blurry", true_cfg_scale=2.5, **common),
    ]
    expected = [diffusers_image(reference, case, image=list(case.references)) for case in cases]
    assert_alone_and_mixed_equal(loaded, cases, expected, join_at_step=1, tolerance=TOLERANCE)


def test_the_output_takes_the_last_images_shape_at_the_pipelines_area(edit_dir: Path) -> None:
    traits = _load(edit_dir).traits
    images = [encode_png(_picture(64, 64, 1)), encode_png(_picture(128, 64, 2))]
    request = GenerationRequest(prompt="a", image=images)
    wide = resolve(request, Limits().for_model(traits), traits)
    assert (wide.width, wide.height) == (192, 96)  # 2:1 at the (tiny) VAE area of 128x128, sides rounded to 32
    with pytest.raises(InvalidRequest, match="the size the input images make, 192x96, exceeds --max_image_size 128"):
        resolve(request, replace(Limits(), max_image_size=128).for_model(traits), traits)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"images": 4}, "image", "at most 3 (the model's own maximum)"),
        ({"mask": "x"}, "mask", "edits by reference images: it takes no mask"),
        ({"strength": 0.5}, "strength", "no strength"),
        ({"images": 0}, "image", "is required: this checkpoint edits images"),
    ],
)
def test_edit_requests_it_cannot_honour_are_400s_that_say_why(
    edit_dir: Path, body: dict, param: str, words: str
) -> None:
    traits = _load(edit_dir).traits
    count = body.pop("images", 1)
    images = [encode_png(_picture(64, 64, i)) for i in range(count)]
    if body.get("mask"):
        body["mask"] = images[0]
    image = None if not images else images if len(images) > 1 else images[0]
    with pytest.raises(InvalidRequest) as error:
        resolve(GenerationRequest(prompt="a", image=image, **body), Limits().for_model(traits), traits)
    assert error.value.param == param and words in error.value.message


def test_every_protocol_edits_with_several_images(edit_dir: Path) -> None:
    flags = ("--default_steps", "2", "--warmup_steps", "0", "--max_sequence_length", "64")
    with app_client(edit_dir, *flags) as client:
        info = client.get(f"/v1/models/{MODEL_NAME}/schedulers").json()
        assert (info["pipeline"], info["modes"], info["max_reference_images"]) == (
            "QwenImageEditPlusPipeline",
            ["edit"],
            3,
        )
        first, second = encode_png(_picture(96, 64, 1)), encode_png(_picture(64, 64, 2))
        body = {"prompt": "blue", "image": [first, second], "seed": 1, "width": 64, "height": 80}
        generated = client.post("/generate", json=body)
        assert generated.status_code == 200 and decode_image(generated.content).shape == (80, 64, 3)
        v1 = {"instances": [{"prompt": "blue", "image": [first], "width": 64, "height": 64}]}
        assert client.post(f"/v1/models/{MODEL_NAME}:predict", json=v1).status_code == 200
        files = [
            ("image[]", ("a.png", base64.b64decode(first), "image/png")),
            ("image[]", ("b.png", base64.b64decode(second), "image/png")),
        ]
        edited = client.post("/v1/images/edits", data={"prompt": "blue", "size": "64x64"}, files=files)
        assert edited.status_code == 200 and len(edited.json()["data"]) == 1  # one edit of two images
        text_only = client.post("/generate", json={"prompt": "blue"})
        assert text_only.status_code == 400 and "edit-only" in text_only.json()["error"]


def test_the_first_edit_release_edits_one_image_as_its_pipeline_does(tmp_path: Path) -> None:
    """QwenImageEditPipeline: its one image at 1024x1024's area (fixed in its __call__) both for the encoder (its
    template holds the image's tokens, all of them kept) and for the VAE; a second image is a 400. One guided edit
    alone (a 1 MP encode on each side takes seconds on a CPU; the batching is Edit-Plus's, tested above)."""
    directory = save_as_released(build_tiny_qwenimage_edit(), tmp_path)
    loaded = _load(directory)
    traits = loaded.traits
    assert (traits.modes, traits.max_reference_images) == ({"edit"}, 1)
    reference = diffusers_pipeline(directory, QwenImageEditPipeline, processor=loaded.pipe.processor)
    common = {"num_inference_steps": 2, "scheduler": "euler", "width": 64, "height": 64}
    case = _edit(traits, _picture(40, 32, 1), seed=1, negative_prompt=" ", **common)
    with running_engine(loaded) as engine:
        served = pixels(engine.generate(case).image)
    assert np.abs(served - diffusers_image(reference, case, image=case.references[0])).max() <= TOLERANCE
    with pytest.raises(InvalidRequest, match="at most 1"):
        _edit(traits, _picture(40, 32, 1), _picture(32, 32, 2), **common)
