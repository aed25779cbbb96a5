"""FLUX.2-klein through the same engine: each image equals diffusers' own ``Flux2KleinPipeline``'s, alone and in
mixed batches (the distilled checkpoint without guidance; the base one with guided and unguided rows in one call,
jobs joining mid-flight, two sizes); the decode's batch-norm un-normalising; the family's rules; the full-size
builtin on the meta device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline

from predictor.builtin import build_tiny_flux2_klein, build_tiny_flux2_klein_base
from predictor.errors import InvalidRequest
from predictor.families import build_builtin
from predictor.loading import LoadedPipeline, load_pipeline
from predictor.request import GenerationRequest, Limits, resolve
from predictor.testing import TOLERANCE, assert_alone_and_mixed_equal, diffusers_image, params


def _saved(build, directory: Path) -> Path:
    build().save_pretrained(directory, safe_serialization=True)
    return directory


def _reference(directory: Path) -> Flux2KleinPipeline:
    pipe = Flux2KleinPipeline.from_pretrained(directory, use_safetensors=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cases(traits, guidance: tuple[float, float]) -> list:
    cases = []
    for i in range(3):
        scheduler = traits.schedulers[i % len(traits.schedulers)]
        cases.append(params(scheduler=scheduler, seed=i, num_inference_steps=3 + i % 2, guidance_scale=guidance[0]))
        cases.append(
            params(
                scheduler=scheduler,
                seed=100 + i,
                num_inference_steps=4,
                width=64 if i % 2 == 0 else 96,
                height=64 if i % 2 == 0 else 80,
                prompt=f"a red fox number {i} in the snow" * (i + 1),
                guidance_scale=guidance[1],
            )
        )
    return cases


def test_flux2_klein_distilled_equals_diffusers_in_mixed_batches(tmp_path: Path) -> None:
    directory = _saved(build_tiny_flux2_klein, tmp_path)
    loaded = load_pipeline(str(directory), "not/used", None, "cpu", "float32")
    traits = loaded.traits
    assert (traits.family, traits.guidance, traits.default_guidance_scale) == ("flux2", "none", 0.0)
    assert (traits.size_multiple, traits.modes, traits.max_prompt_tokens) == (16, {"text"}, {"prompt": 512})
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
