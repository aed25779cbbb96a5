"""Partial images while a picture forms: evenly spaced previews from a linear latent-to-RGB map fitted to the
model's own VAE, streamed as /generate's preview events and as OpenAI's partial-image events (the openai SDK's
stream iterator reads them); previews change nothing about the image."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from predictor.jobs import Job
from predictor.loading import load_pipeline
from predictor.testing import (
    decode_image,
    diffusers_image,
    free_port,
    params,
    pixels,
    running_engine,
    start_server,
    stop_server,
    wait_ready,
)


@pytest.mark.parametrize(
    ("wanted", "total", "steps"), [(2, 9, {3, 6}), (3, 4, {1, 2, 3}), (1, 10, {5}), (3, 2, {1}), (0, 9, set())]
)
def test_previews_are_evenly_spaced_before_the_end(wanted: int, total: int, steps: set[int]) -> None:
    job = Job(params(partial_images=wanted), None, 0.0, None)
    assert {step for step in range(total + 1) if job.preview_due(step, total)} == steps


def test_engine_sends_previews_and_they_change_nothing(tiny_model_dir: Path) -> None:
    loaded = load_pipeline(str(tiny_model_dir), "not/used", None, "cpu", "float32")
    received: list[tuple[int, int, np.ndarray]] = []

    def on_progress(kind: str, step: int, total: int, *preview) -> None:
        if kind == "preview":
            received.append((step, total, preview[0]))

    plain = params(seed=5, num_inference_steps=9)
    with running_engine(loaded) as engine:
        without = pixels(engine.generate(plain).image)
        watched = params(seed=5, num_inference_steps=9, partial_images=2)
        with_previews = pixels(engine.submit([watched], on_progress=on_progress)[0].result(timeout=60).image)
    assert np.array_equal(with_previews, without)
    assert [(step, total) for step, total, _ in received] == [(3, 9), (6, 9)]
    assert all(picture.shape == (8, 8, 3) and picture.dtype == np.uint8 for _, _, picture in received)


def test_a_failing_progress_callback_costs_only_its_own_events(tiny_model_dir: Path) -> None:
    """A callback that raises (a closed event loop at shutdown) must not fail the jobs batched with it."""
    loaded = load_pipeline(str(tiny_model_dir), "not/used", None, "cpu", "float32")

    def broken(kind: str, *args) -> None:
        if kind != "queued":
            raise RuntimeError("the event loop is closed")

    with running_engine(loaded) as engine:
        watched = engine.submit([params(seed=1, partial_images=2)], on_progress=broken)[0]
        others = engine.submit([params(seed=2), params(seed=3)])
        for future in [watched, *others]:
            assert future.result(timeout=60).image.size == (64, 64)


def test_the_preview_map_follows_the_vae() -> None:
    """At the last step the preview of the final latents resembles the decoded picture averaged over each
    latent's pixels (a wrong channel order or a missing bias would not)."""
    from predictor.config import EngineConfig
    from predictor.runner import DiffusionRunner

    loaded = load_pipeline(None, "builtin:tiny", None, "cpu", "float32")
    runner = DiffusionRunner(loaded, EngineConfig())
    with torch.inference_mode():
        latents = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(5))
        decoded = runner.decode(latents).float()
        target = torch.nn.functional.avg_pool2d((decoded / 2 + 0.5).clamp(0, 1), 8)[0].permute(1, 2, 0) * 255
        weights, bias = runner._fit_preview_map()
        preview = ((torch.einsum("bchw,cd->bhwd", latents, weights) + bias).clamp(0, 1) * 255)[0]
    assert np.corrcoef(target.numpy().ravel(), preview.numpy().ravel())[0, 1] > 0.5


def _events(response: httpx.Response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: ") :])))
    return events


def test_previews_stream_on_generate_and_the_openai_routes(tmp_path: Path) -> None:
    import openai

    port = free_port()
    log = tmp_path / "server.log"
    process = start_server("--model_id", "builtin:tiny", "--model_dir", str(tmp_path / "none"), port=port, log=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, port, log)
        body = {"prompt": "a fox", "num_inference_steps": 8, "seed": 3, "width": 96, "partial_images": 3}
        headers = {"Accept": "text/event-stream"}
        with httpx.stream("POST", f"{base}/generate", json=body, headers=headers, timeout=60) as response:
            events = _events(response)
        previews = [data for name, data in events if name == "preview"]
        assert [data["step"] for data in previews] == [2, 4, 6]
        for data in previews:
            assert decode_image(base64.b64decode(data["b64"])).shape == (64, 96, 3)
        assert events[-1][0] == "image"
        final = decode_image(base64.b64decode(events[-1][1]["b64"]))

        plain = httpx.post(f"{base}/generate", json={**body, "partial_images": 0}, timeout=60)
        assert np.array_equal(decode_image(plain.content), final)
        refused = httpx.post(f"{base}/generate", json=body, timeout=60)
        assert refused.status_code == 400 and refused.json()["param"] == "partial_images"
        v1 = httpx.post(f"{base}/v1/models/sd:predict", json={"instances": [body]}, timeout=60)
        assert v1.status_code == 400 and v1.json()["param"] == "partial_images"

        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        extra = {"seed": 3, "num_inference_steps": 8}
        stream = client.images.generate(
            model="sd", prompt="a fox", size="96x64", stream=True, partial_images=2, extra_body=extra
        )
        streamed = list(stream)
        assert [event.type for event in streamed] == ["image_generation.partial_image"] * 2 + [
            "image_generation.completed"
        ]
        assert [event.partial_image_index for event in streamed[:2]] == [0, 1]
        assert streamed[-1].size == "96x64" and streamed[-1].output_format == "png"
        completed = decode_image(base64.b64decode(streamed[-1].b64_json))
        assert np.abs(completed - final).max() <= 1

        picture = io.BytesIO()
        from PIL import Image

        Image.new("RGB", (64, 64), (30, 160, 90)).save(picture, format="PNG")
        edits = list(
            client.images.edit(
                image=("in.png", picture.getvalue(), "image/png"),
                prompt="a fox",
                stream=True,
                partial_images=1,
                extra_body=extra,
            )
        )
        assert [event.type for event in edits] == ["image_edit.partial_image", "image_edit.completed"]
        with pytest.raises(openai.BadRequestError, match="'n' must be 1"):
            client.images.generate(model="sd", prompt="a", stream=True, n=2)
        with pytest.raises(openai.BadRequestError, match="needs stream: true"):
            client.images.generate(model="sd", prompt="a", partial_images=2)
    finally:
        assert stop_server(process) == 0


def _tiny_autoencoder(directory: Path, latent_channels: int = 4) -> Path:
    """A TAESD-shaped AutoencoderTiny (three 2x upsamplings: the VAE's factor of 8), random weights, on disk."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    blocks = {"encoder_block_out_channels": (8, 8, 8, 8), "decoder_block_out_channels": (8, 8, 8, 8)}
    counts = {"num_encoder_blocks": (1, 1, 1, 1), "num_decoder_blocks": (1, 1, 1, 1)}
    AutoencoderTiny(latent_channels=latent_channels, **blocks, **counts).save_pretrained(directory)
    return directory


@pytest.mark.parametrize(("model", "size"), [("tiny", (64, 80)), ("tiny-flux", (64, 64))])
def test_a_tiny_vae_decodes_full_size_previews_of_the_pipelines_own_latents(
    model: str, size: tuple[int, int], tmp_path: Path
) -> None:
    """With --preview_vae_dir, a preview is the tiny VAE's decode of the latents diffusers' own pipeline holds after
    that many steps (FLUX's unpacked), at the output's full size."""
    from diffusers import AutoencoderTiny
    from diffusers.image_processor import VaeImageProcessor

    from predictor.families import build_builtin

    tiny_dir = _tiny_autoencoder(tmp_path / "taesd")
    loaded = load_pipeline(None, f"builtin:{model}", None, "cpu", "float32", preview_vae_dir=str(tiny_dir))
    height, width = size
    traits = loaded.traits
    job = params(
        seed=4,
        num_inference_steps=6,
        height=height,
        width=width,
        scheduler=traits.default_scheduler,
        guidance_scale=traits.default_guidance_scale,
        partial_images=2,
    )
    received: dict[int, np.ndarray] = {}

    def on_progress(kind: str, step: int, total: int, *preview) -> None:
        if kind == "preview":
            received[step] = preview[0]

    with running_engine(loaded) as engine:
        engine.submit([job], on_progress=on_progress)[0].result(timeout=60)
    assert sorted(received) == [2, 4]

    reference = build_builtin(model, torch.device("cpu"), torch.float32)  # the same seeded weights
    reference.set_progress_bar_config(disable=True)
    latents_after: dict[int, torch.Tensor] = {}

    def keep(pipe, index: int, timestep, kwargs: dict) -> dict:
        latents_after[index + 1] = kwargs["latents"].clone()
        return kwargs

    with torch.inference_mode():
        diffusers_image(reference, job, callback_on_step_end=keep)
        tiny = AutoencoderTiny.from_pretrained(tiny_dir)
        processor = VaeImageProcessor(vae_scale_factor=8)
        for step, preview in received.items():
            latents = latents_after[step]
            if model == "tiny-flux":
                latents = reference._unpack_latents(latents, height, width, reference.vae_scale_factor)
            decoded = processor.postprocess(tiny.decode(latents).sample, output_type="np")[0]
            expected = (decoded * 255).round().astype(np.uint8)
            assert preview.shape == (height, width, 3)
            assert np.abs(preview.astype(int) - expected.astype(int)).max() <= 1


def test_a_preview_vae_that_does_not_fit_stops_the_load_with_why(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    from predictor.errors import LoadError

    wide = _tiny_autoencoder(tmp_path / "taef1", latent_channels=16)
    with pytest.raises(LoadError, match="16-channel latents, but this model's have 4"):
        load_pipeline(None, "builtin:tiny", None, "cpu", "float32", preview_vae_dir=str(wide))
    with pytest.raises(LoadError, match=r"holds no config\.json"):
        load_pipeline(None, "builtin:tiny", None, "cpu", "float32", preview_vae_dir=str(tmp_path / "missing"))
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4).save_pretrained(tmp_path / "kl")
    with pytest.raises(LoadError, match="holds a AutoencoderKL, not an AutoencoderTiny"):
        load_pipeline(None, "builtin:tiny", None, "cpu", "float32", preview_vae_dir=str(tmp_path / "kl"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"_class_name": "AutoencoderTiny"}')
    with pytest.raises(LoadError, match="cannot load the preview VAE"):
        load_pipeline(None, "builtin:tiny", None, "cpu", "float32", preview_vae_dir=str(tmp_path / "broken"))


def test_the_preview_vae_flag_reaches_the_loader(tmp_path: Path) -> None:
    from predictor.config import parse_settings
    from predictor.model import _load_from_settings

    tiny_dir = _tiny_autoencoder(tmp_path / "taesd")
    flags = ["--model_id", "builtin:tiny", "--model_dir", str(tmp_path / "none"), "--device", "cpu"]
    _, settings = parse_settings([*flags, "--preview_vae_dir", str(tiny_dir)])
    assert type(_load_from_settings(settings).preview_vae).__name__ == "AutoencoderTiny"
    _, settings = parse_settings(flags)
    assert _load_from_settings(settings).preview_vae is None


def test_a_stream_whose_client_left_before_its_first_event_cancels_its_images(tiny_model_dir: Path) -> None:
    """The response's start fails to send (the client went between the request and the first event, as ASGI 2.4
    reports it): the stream never ran, and its queued images must still stop."""
    import asyncio

    from starlette.requests import ClientDisconnect

    from predictor.protocols.base import Batch
    from predictor.protocols.sse import EventStream

    loaded = load_pipeline(str(tiny_model_dir), "not/used", None, "cpu", "float32")

    async def never_started():
        raise AssertionError("the stream must not run")
        yield b""

    async def gone(message: dict) -> None:
        raise OSError("connection reset by peer")

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    steps: list[int] = []

    def count(kind: str, step: int, *args) -> None:
        if kind == "step":
            steps.append(step)

    with running_engine(loaded) as engine:
        batch = Batch([params(num_inference_steps=500, seed=i) for i in range(2)])
        batch.futures = engine.submit(batch.params, on_progress=count)
        scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "extensions": {}}
        with pytest.raises(ClientDisconnect):
            asyncio.run(EventStream(never_started(), batch)(scope, receive, gone))
        assert all(future.cancelled() for future in batch.futures)
        assert engine.wait_idle(timeout=60)
    assert max(steps, default=0) < 500, "the abandoned images ran to the end"
