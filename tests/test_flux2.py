"""FLUX.2 through the same engine: each image equals diffusers' own ``Flux2KleinPipeline``'s or ``Flux2Pipeline``'s,
alone and in mixed batches (the distilled klein checkpoint without guidance; the base one with guided and unguided
rows in one call; dev with a guidance input per row; jobs joining mid-flight, two sizes, reference images); the
decode's batch-norm un-normalising; the family's rules; the full-size builtins on the meta device."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from fastapi.testclient import TestClient
from PIL import Image

from predictor.builtin import build_tiny_flux2_dev, build_tiny_flux2_klein, build_tiny_flux2_klein_base
from predictor.errors import InvalidRequest, LoadError
from predictor.families import build_builtin
from predictor.images import encode_png
from predictor.loading import LoadedPipeline, load_pipeline
from predictor.processors import PixtralTextProcessor
from predictor.request import GenerationParams, GenerationRequest, Limits, resolve
from predictor.testing import (
    MODEL_NAME,
    TOLERANCE,
    app_client,
    assert_alone_and_mixed_equal,
    decode_image,
    diffusers_image,
    diffusers_pipeline,
    make_settings,
    mixed_cases,
    params,
    save_as_released,
)


def _saved(build, directory: Path) -> Path:
    build().save_pretrained(directory, safe_serialization=True)
    return directory


def _reference(directory: Path) -> Flux2KleinPipeline:
    return diffusers_pipeline(directory, Flux2KleinPipeline)


def _cases(traits, guidance: tuple[float, float]) -> list:
    """Pairs with guidance ``guidance[0]`` and ``guidance[1]``, the second's prompt longer each round."""
    return mixed_cases(
        traits.schedulers,
        3,
        first=lambda i: {"guidance_scale": guidance[0]},
        second=lambda i: {"prompt": f"a red fox number {i} in the snow" * (i + 1), "guidance_scale": guidance[1]},
    )


def test_flux2_klein_distilled_equals_diffusers_in_mixed_batches(tmp_path: Path) -> None:
    directory = _saved(build_tiny_flux2_klein, tmp_path)
    loaded = load_pipeline(str(directory), "not/used", None, "cpu", "float32")
    traits = loaded.traits
    assert (traits.family, traits.guidance, traits.default_guidance_scale) == ("flux2", "none", 0.0)
    assert (traits.size_multiple, traits.modes, traits.max_prompt_tokens) == (16, {"text", "edit"}, {"prompt": 512})
    reference = _reference(directory)
    cases = _cases(traits, (0.0, 1.0))
    assert_alone_and_mixed_equal(loaded, cases, [diffusers_image(reference, c) for c in cases], join_at_step=2)


def test_flux2_klein_base_guides_against_the_empty_prompt_in_mixed_batches(tmp_path: Path) -> None:
    directory = _saved(build_tiny_flux2_klein_base, tmp_path)
    loaded = load_pipeline(str(directory), "not/used", None, "cpu", "float32")
    traits = loaded.traits
    assert (traits.guidance, traits.default_guidance_scale) == ("cfg", 4.0)
    reference = _reference(directory)
    cases = _cases(traits, (1.0, 4.0))  # 1: no guidance row; 4: a row for ""
    assert_alone_and_mixed_equal(
        loaded, cases, [diffusers_image(reference, c) for c in cases], join_at_step=2, tolerance=TOLERANCE
    )


def test_full_size_builtin_has_klein_4b_shapes() -> None:
    """klein-4B's published block counts (5 double-stream, 20 single-stream, 24 heads of 128, captions 7680 wide from
    Qwen3-4B) in diffusers' FLUX.2 modules: a 3.88B transformer; the FLUX.2 VAE with its batch norm."""
    pipe = build_builtin("flux2-klein-4b-arch", torch.device("meta"), torch.bfloat16)
    loaded = LoadedPipeline(pipe, "flux2-klein-4b-arch", torch.device("meta"), torch.bfloat16, True, 0.0)
    assert loaded.native_size == 1024
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("transformer", "vae")}
    assert counts == {"transformer": 3_875_544_576, "vae": 84_046_115}
    assert sum(p.numel() for p in pipe.text_encoder.model.parameters()) == 4_022_468_096  # Qwen3-4B, without its head


@pytest.mark.parametrize(
    ("body", "param"),
    [({"guidance_scale": 3.0}, "guidance_scale"), ({"negative_prompt": "blurry"}, "negative_prompt")],
)
def test_a_distilled_checkpoint_refuses_guidance_and_negative_prompts(body: dict, param: str) -> None:
    traits = load_pipeline(None, "builtin:tiny-flux2-klein", None, "cpu", "float32").traits
    with pytest.raises(InvalidRequest) as error:
        resolve(GenerationRequest(prompt="a", **body), Limits().for_model(traits), traits)
    assert error.value.param == param and "distilled without guidance" in error.value.message
    assert "true_cfg_scale" not in error.value.message  # FLUX.1's advice, not this family's


def test_the_base_checkpoint_guides_against_a_negative_prompt_when_given(tmp_path: Path) -> None:
    """Flux2KleinPipeline guides against "" only; a request's negative_prompt takes its place, as the pipeline's own
    negative_prompt_embeds argument does with the prompt's encoding."""
    directory = _saved(build_tiny_flux2_klein_base, tmp_path)
    loaded = load_pipeline(str(directory), "not/used", None, "cpu", "float32")
    reference = _reference(directory)
    case = params(scheduler="euler", seed=5, num_inference_steps=3, guidance_scale=3.0, negative_prompt="blurry")
    embeds, _ = reference.encode_prompt("blurry", device=torch.device("cpu"))
    plain = params(scheduler="euler", seed=5, num_inference_steps=3, guidance_scale=3.0)
    expected = diffusers_image(reference, plain, negative_prompt_embeds=embeds)
    assert_alone_and_mixed_equal(loaded, [case, plain], [expected, diffusers_image(reference, plain)])


def _picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _edit(traits, *references: Image.Image, **body) -> GenerationParams:
    images = [encode_png(reference) for reference in references]
    request = GenerationRequest(prompt="make it blue", image=images if len(images) > 1 else images[0], **body)
    return resolve(request, Limits().for_model(traits), traits)


def test_reference_edits_equal_diffusers_beside_text_jobs(tmp_path: Path) -> None:
    """One and two reference images (the pipeline's image=[...]), beside text jobs and each other: each image equals
    Flux2KleinPipeline's with the same references; the output takes the first reference's size."""
    directory = _saved(build_tiny_flux2_klein, tmp_path)
    loaded = load_pipeline(str(directory), "not/used", None, "cpu", "float32")
    traits = loaded.traits
    assert traits.modes == {"text", "edit"}
    reference = _reference(directory)
    first, second = _picture(96, 64, 1), _picture(64, 80, 2)
    common = {"num_inference_steps": 3, "scheduler": "euler"}
    cases = [
        _edit(traits, first, seed=1, **common),
        params(seed=2, guidance_scale=0.0, **common),
        _edit(traits, first, second, seed=3, **common),
        _edit(traits, first, seed=4, **common),  # the first's layout: shares its calls
    ]
    assert (cases[0].width, cases[0].height, cases[0].mode) == (96, 64, "edit")
    expected = [diffusers_image(reference, case, image=list(case.references) or None) for case in cases]
    assert_alone_and_mixed_equal(loaded, cases, expected, join_at_step=1, tolerance=TOLERANCE)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"mask": "x"}, "mask", "edits by reference images: it takes no mask"),
        ({"strength": 0.5}, "strength", "no strength"),
        ({"count": 5}, "image", "at most 4 (--max_reference_images)"),
        ({"small": True}, "image", "at least 64 pixels a side"),
    ],
)
def test_reference_rules_are_400s_that_say_why(body: dict, param: str, words: str) -> None:
    traits = load_pipeline(None, "builtin:tiny-flux2-klein", None, "cpu", "float32").traits
    count = body.pop("count", 1)
    size = (48, 64) if body.pop("small", False) else (64, 64)
    references = [_picture(*size, i) for i in range(count)]
    with pytest.raises(InvalidRequest) as error:
        _edit(traits, *references, **body)
    assert error.value.param == param and words in error.value.message


def test_a_list_of_images_is_refused_where_images_are_img2img_inputs() -> None:
    traits = load_pipeline(None, "builtin:tiny-flux-dev", None, "cpu", "float32").traits
    request = GenerationRequest(prompt="a", image=[encode_png(_picture(64, 64, 1))] * 2)
    with pytest.raises(InvalidRequest) as error:
        resolve(request, Limits().for_model(traits), traits)
    assert error.value.param == "image" and "takes one image" in error.value.message


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    directory = _saved(build_tiny_flux2_klein, tmp_path_factory.mktemp("tiny-flux2"))
    with app_client(directory, "--default_steps", "2", "--warmup_steps", "0") as test_client:
        yield test_client


def test_every_protocol_takes_reference_images(client: TestClient) -> None:
    """/generate and v1 take a list; OpenAI's edits take several files as one edit's references (the SDK's
    images.edit(image=[f1, f2])); the discovery route says the mode and the limit."""
    info = client.get(f"/v1/models/{MODEL_NAME}/schedulers").json()
    assert (info["family"], info["modes"], info["max_reference_images"]) == ("flux2", ["edit", "text"], 4)
    first, second = encode_png(_picture(96, 64, 1)), encode_png(_picture(64, 64, 2))
    generated = client.post("/generate", json={"prompt": "blue", "image": [first, second], "seed": 1})
    assert generated.status_code == 200, generated.text
    assert decode_image(generated.content).shape == (64, 96, 3)  # the first reference's size
    v1 = client.post(f"/v1/models/{MODEL_NAME}:predict", json={"instances": [{"prompt": "blue", "image": [first]}]})
    assert v1.status_code == 200, v1.text
    files = [
        ("image[]", ("a.png", base64.b64decode(first), "image/png")),
        ("image[]", ("b.png", base64.b64decode(second), "image/png")),
    ]
    edited = client.post("/v1/images/edits", data={"prompt": "blue", "seed": "1"}, files=files)
    assert edited.status_code == 200, edited.text
    assert len(edited.json()["data"]) == 1  # one edit of two references, not two edits
    masked = client.post(
        "/v1/images/edits",
        data={"prompt": "blue"},
        files=[*files, ("mask", ("m.png", base64.b64decode(first), "image/png"))],
    )
    assert masked.status_code == 400 and masked.json()["error"]["param"] == "mask"


def test_the_cli_sends_each_image_option_as_a_reference(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--image`` given twice: one edit of two references, through the app's own /generate stream."""
    from predictor import client as cli

    monkeypatch.setattr(cli.httpx, "stream", client.stream)  # the in-process app answers the CLI's request
    paths = []
    for index, size in enumerate(((96, 64), (64, 64))):
        paths.append(tmp_path / f"{index}.png")
        _picture(*size, index).save(paths[-1])
    output = tmp_path / "out.png"
    argv = ["blue", "--url", "http://testserver", "--image", str(paths[0]), "--image", str(paths[1]), "-o", str(output)]
    assert cli.main(argv) == 0
    assert Image.open(output).size == (96, 64)  # the first reference's size
    _picture(48, 64, 2).save(paths[1])  # a second reference the pipeline would refuse: the server names it
    assert cli.main(argv) == 1
    assert "'image[1]' is 48x64" in capsys.readouterr().err


def test_flux2_dev_equals_diffusers_with_a_guidance_input_a_row_and_references(tmp_path: Path) -> None:
    """FLUX.2-dev saved as released (its tokenizer a PixtralProcessor) loads without torchvision, and each image
    equals Flux2Pipeline's: guidance scales differing row by row in one call, every scheduler, two sizes, prompts
    past the 512-token window, one and two reference images beside text jobs, jobs joining mid-flight."""
    import json

    directory = save_as_released(build_tiny_flux2_dev(), tmp_path)
    assert json.loads((directory / "model_index.json").read_text())["tokenizer"] == ["transformers", "PixtralProcessor"]
    loaded = load_pipeline(str(directory), "not/used", None, "cpu", "float32")
    traits = loaded.traits
    assert (traits.family, traits.guidance, traits.default_guidance_scale) == ("flux2", "embedded", 4.0)
    assert (traits.modes, traits.max_prompt_tokens, traits.schedulers) == (
        {"text", "edit"},
        {"prompt": 512},
        ("euler", "dpmpp_2m", "unipc"),
    )
    tokenizer = PixtralTextProcessor.from_pretrained(directory, subfolder="tokenizer")
    reference = diffusers_pipeline(directory, Flux2Pipeline, tokenizer=tokenizer)
    first, second = _picture(96, 64, 1), _picture(64, 80, 2)
    common = {"num_inference_steps": 3, "scheduler": "euler"}
    cases = [*_cases(traits, (2.0, 5.0)), _edit(traits, first, seed=7, **common)]
    cases += [_edit(traits, first, second, seed=8, guidance_scale=2.5, **common), params(prompt="a " * 600, **common)]
    expected = [diffusers_image(reference, case, image=list(case.references) or None) for case in cases]
    assert_alone_and_mixed_equal(loaded, cases, expected, join_at_step=2, tolerance=TOLERANCE)
    assert loaded.model._encode_texts(["a " * 600, "short"])[1] == [True, False]  # the cut prompt is flagged


def test_flux2_dev_serves_every_protocol_and_refuses_a_negative_prompt(tmp_path: Path) -> None:
    directory = save_as_released(build_tiny_flux2_dev(), tmp_path)
    with app_client(directory, "--default_steps", "2", "--warmup_steps", "0") as client:
        info = client.get(f"/v1/models/{MODEL_NAME}/schedulers").json()
        assert (info["family"], info["guidance"], info["modes"]) == ("flux2", "embedded", ["edit", "text"])
        generated = client.post("/generate", json={"prompt": "a fox", "guidance_scale": 2.5, "width": 64, "height": 64})
        assert generated.status_code == 200, generated.text
        assert decode_image(generated.content).shape == (64, 64, 3)
        picture = base64.b64decode(encode_png(_picture(96, 64, 1)))
        files = [("image[]", ("a.png", picture, "image/png")), ("image[]", ("b.png", picture, "image/png"))]
        edited = client.post("/v1/images/edits", data={"prompt": "blue"}, files=files)
        assert edited.status_code == 200 and len(edited.json()["data"]) == 1, edited.text
        v2 = client.post(
            f"/v2/models/{MODEL_NAME}/infer",
            json={"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a fox"]}]},
        )
        assert v2.status_code == 200, v2.text
        refused = client.post("/generate", json={"prompt": "a fox", "negative_prompt": "blurry"})
        assert refused.status_code == 400
        assert refused.json()["param"] == "negative_prompt" and "guidance-distilled" in refused.json()["error"]


def test_offloaded_text_encoders_change_no_pixel(tmp_path: Path) -> None:
    """--offload_text_encoders: the encoder under diffusers' group offloading (its hooks on every layer), the image
    equal to the pipeline's with the same offloading. (On a CPU both devices are the host: the GPU suite measures what
    it saves on a GPU.)"""
    from diffusers.hooks import HookRegistry, apply_group_offloading

    directory = save_as_released(build_tiny_flux2_dev(), tmp_path)
    loaded = load_pipeline(str(directory), "not/used", None, "cpu", "float32", offload_text_encoders=True)
    layer = loaded.pipe.text_encoder.model.language_model.layers[0].mlp.up_proj
    assert HookRegistry.check_if_exists_or_initialize(layer).get_hook("group_offloading") is not None
    assert HookRegistry.check_if_exists_or_initialize(loaded.pipe.transformer).get_hook("group_offloading") is None
    reference = diffusers_pipeline(
        directory, Flux2Pipeline, tokenizer=PixtralTextProcessor.from_pretrained(directory, subfolder="tokenizer")
    )
    apply_group_offloading(reference.text_encoder, onload_device=torch.device("cpu"), offload_type="leaf_level")
    cases = [params(scheduler="euler", seed=s, num_inference_steps=2, guidance_scale=3.0) for s in (1, 2)]
    assert_alone_and_mixed_equal(loaded, cases, [diffusers_image(reference, case) for case in cases])
    with pytest.raises(LoadError, match="--offload_text_encoders with --lora_dir"):
        load_pipeline(None, "builtin:tiny-flux2-dev", None, "cpu", "float32", offload_text_encoders=True, lora_dir=".")


def test_full_size_builtin_has_flux2_dev_shapes() -> None:
    """FLUX.2-dev's released shapes: the 32.2B transformer (8 double-stream and 48 single-stream blocks of 48 heads,
    guidance embedding) and Mistral-Small-3.1-24B (its vision tower included), 112 GB of weights in bfloat16."""
    pipe = build_builtin("flux2-dev-arch", torch.device("meta"), torch.bfloat16)
    counts = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("transformer", "text_encoder")
    }
    assert counts == {"transformer": 32_223_281_152, "text_encoder": 24_011_361_280}
    assert pipe.transformer.config.guidance_embeds and pipe.transformer.config.joint_attention_dim == 15360


def test_float8_storage_equals_diffusers_layerwise_casting(tmp_path: Path) -> None:
    """--storage_dtype float8_e4m3fn: the transformer's weights kept in float8, each layer computed in float32 here,
    as diffusers' enable_layerwise_casting does; the image equals the pipeline's with the same casting, and differs
    from the unquantised one."""
    directory = _saved(build_tiny_flux2_klein, tmp_path)
    loaded = load_pipeline(str(directory), "not/used", None, "cpu", "float32", storage_dtype="float8_e4m3fn")
    assert loaded.pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert loaded.pipe.vae.dtype == loaded.pipe.text_encoder.dtype == torch.float32  # they keep --dtype
    plain = _reference(directory)
    cast = _reference(directory)
    cast.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    cases = [params(scheduler="euler", seed=s, num_inference_steps=3, guidance_scale=0.0) for s in (1, 2)]
    expected = [diffusers_image(cast, case) for case in cases]
    assert np.abs(expected[0] - diffusers_image(plain, cases[0])).max() > TOLERANCE  # float8 changed the image
    assert_alone_and_mixed_equal(loaded, cases, expected, tolerance=TOLERANCE)


def test_float8_storage_is_refused_with_compile_and_with_adapters(tmp_path: Path) -> None:
    from predictor.config import Settings

    settings = make_settings(tmp_path)
    with pytest.raises(ValueError, match="--storage_dtype with --compile"):
        Settings(
            replace(settings.source, storage_dtype="float8_e4m3fn"),
            settings.limits,
            replace(settings.engine, compile=True),
            settings.server,
        )
    with pytest.raises(LoadError, match="--storage_dtype with --lora_dir"):
        load_pipeline(
            None, "builtin:tiny-flux2-klein", None, "cpu", "float32", storage_dtype="float8_e4m3fn", lora_dir="."
        )
