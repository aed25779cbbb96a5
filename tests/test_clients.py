"""The clients people already use, against a real server process: the official OpenAI SDK, Server-Sent Events,
the command-line client, and the playground page in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
from PIL import Image

from predictor.families.sd import UNET_SCHEDULERS as SCHEDULERS
from predictor.request import FAMILY_FIELDS
from predictor.testing import decode_image, free_port, metric, start_server, stop_server, wait_ready, wait_until

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Playwright

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from predictor.builtin import build_tiny
    from predictor.testing import save_random_lora

    tmp = tmp_path_factory.mktemp("clients")
    port = free_port()
    log = tmp / "server.log"
    save_random_lora(build_tiny(), tmp / "loras", "style", seed=1)  # the playground offers it
    flags = ("--default_steps", "3", "--max_batch_instances", "4", "--lora_dir", str(tmp / "loras"))
    process = start_server("--model_id", "builtin:tiny", "--model_dir", str(tmp / "none"), *flags, port=port, log=log)
    try:
        wait_ready(process, port, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        assert stop_server(process) == 0


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(data)).size


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_openai_sdk_generates_images(server: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    result = client.images.generate(
        model="sd",
        prompt="a lighthouse",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 5, "num_inference_steps": 3},
    )
    assert len(result.data) == 2
    images = [base64.b64decode(item.b64_json) for item in result.data]
    assert [png_size(image) for image in images] == [(64, 64), (64, 64)]
    assert images[0] != images[1], "n images get seeds seed, seed+1"
    assert [item.model_extra["seed"] for item in result.data] == [5, 6]
    assert result.created > 0
    # The second image is what a lone request with seed+1 gives (batched rows may differ by a rounding).
    alone = httpx.post(f"{server}/generate", json={"prompt": "a lighthouse", "seed": 6, "num_inference_steps": 3})
    assert np.abs(decode_image(alone.content) - decode_image(images[1])).max() <= 1


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        ({"size": "65x64"}, "size", "multiple of 8"),
        ({"response_format": "url"}, "response_format", "b64_json"),
        ({"model": "dall-e-3"}, "model", "serves 'sd'"),
        ({"n": 5}, "n", "at most 4"),
        ({"extra_body": {"guidance_scale": 99}}, "guidance_scale", "must be at most 30"),
        ({"extra_body": {"prompt_2": "oil"}}, "prompt_2", "second text encoder (SDXL, FLUX, SD3)"),
    ],
)
def test_openai_sdk_bad_input_raises_bad_request(server: str, kwargs: dict, param: str, words: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as error:
        client.images.generate(prompt="a lighthouse", **kwargs)
    assert error.value.status_code == 400
    body = error.value.body
    assert body["param"] == param and body["type"] == "invalid_request_error"
    assert words in body["message"]


def test_event_stream_reports_queue_progress_then_the_image(server: str) -> None:
    body = {"prompt": "streamed", "seed": 11, "num_inference_steps": 4}
    with httpx.stream(
        "POST", f"{server}/generate", json=body, headers={"Accept": "text/event-stream"}, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    names = [name for name, _ in events]
    assert names[0] == "queued" and names[-1] == "image"
    assert [data["step"] for name, data in events if name == "progress"] == [1, 2, 3, 4]
    assert all(data["total"] == 4 for name, data in events if name == "progress")
    image = events[-1][1]
    assert image["seed"] == 11 and image["format"] == "png"
    plain = httpx.post(f"{server}/generate", json=body, timeout=60)
    assert base64.b64decode(image["b64"]) == plain.content


def test_event_stream_bad_input_is_a_plain_400(server: str) -> None:
    response = httpx.post(
        f"{server}/generate", json={"prompt": "x", "width": 65}, headers={"Accept": "text/event-stream"}
    )
    assert response.status_code == 400
    assert response.json()["param"] == "width"


def test_leaving_the_event_stream_cancels_the_work(server: str) -> None:
    body = {"prompt": "abandoned stream", "num_inference_steps": 150, "width": 256, "height": 256}
    cancelled = metric(server, "diffusion_failures_total", error_type="cancelled")
    with httpx.stream(
        "POST", f"{server}/generate", json=body, headers={"Accept": "text/event-stream"}, timeout=60
    ) as response:
        for line in response.iter_lines():
            if line.startswith("event: progress"):
                break
    wait_until(lambda: metric(server, "diffusion_active_images") == 0, timeout_s=60)
    assert metric(server, "diffusion_failures_total", error_type="cancelled") == cancelled + 1


def test_schedulers_and_limits_are_discoverable(server: str) -> None:
    info = httpx.get(f"{server}/v1/models/sd/schedulers").json()
    assert info["schedulers"] == list(SCHEDULERS)
    assert info["default_scheduler"] == "dpmpp_2m"
    assert (info["max_steps"], info["default_steps"], info["native_size"]) == (150, 3, 64)
    assert (info["family"], info["pipeline"], info["default_guidance_scale"]) == ("sd", "StableDiffusionPipeline", 7.5)
    assert info["request_fields"] == dict.fromkeys(FAMILY_FIELDS, False)
    assert httpx.get(f"{server}/v1/models/nope/schedulers").status_code == 404


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "predictor.client", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_writes_the_image_and_shows_progress(server: str, tmp_path: Path) -> None:
    output = tmp_path / "fox.png"
    result = run_cli(
        "a fox",
        "-o",
        str(output),
        "--url",
        server,
        "--steps",
        "3",
        "--seed",
        "7",
        "--width",
        "72",
        "--height",
        "64",
        "--guidance",
        "5",
        "--scheduler",
        "euler",
        "--negative",
        "blurry",
    )
    assert result.returncode == 0, result.stderr
    assert png_size(output.read_bytes()) == (72, 64)
    assert "step 3/3" in result.stderr and "seed 7" in result.stderr
    jpeg = tmp_path / "fox.jpg"
    assert run_cli("a fox", "-o", str(jpeg), "--url", server, "--steps", "2").returncode == 0
    assert jpeg.read_bytes()[:3] == b"\xff\xd8\xff"


def test_cli_sends_an_input_image_and_mask(server: str, tmp_path: Path) -> None:
    picture, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.new("RGB", (101, 70), (200, 100, 50)).save(picture)
    Image.new("L", (101, 70), 255).save(mask)
    output = tmp_path / "out.png"
    args = ("a fox", "-o", str(output), "--url", server, "--image", str(picture), "--steps", "4", "--strength", "0.5")
    result = run_cli(*args, "--mask", str(mask))
    assert result.returncode == 0, result.stderr
    assert png_size(output.read_bytes()) == (96, 64)  # the input's size, rounded down to a multiple of 8
    assert "step 2/2" in result.stderr  # strength 0.5 of 4 steps
    missing = run_cli("a fox", "--url", server, "--image", str(tmp_path / "nope.png"))
    assert missing.returncode == 2 and "cannot read --image" in missing.stderr


def test_cli_reports_the_servers_message_and_exits_non_zero(server: str, tmp_path: Path) -> None:
    result = run_cli("a fox", "-o", str(tmp_path / "x.png"), "--url", server, "--width", "65")
    assert result.returncode == 1
    assert "400" in result.stderr and "multiple of 8" in result.stderr
    unreachable = run_cli("a fox", "--url", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


def test_cli_refuses_a_format_that_disagrees_with_the_file_name(tmp_path: Path) -> None:
    """JPEG bytes in a .png file would mislead every program that opens it: refused before any request."""
    output = tmp_path / "fox.png"
    result = run_cli("a fox", "-o", str(output), "--format", "jpeg", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "--format jpeg" in result.stderr and "fox.png" in result.stderr
    assert not output.exists()


def test_playground_in_headless_chromium(server: str, tmp_path: Path) -> None:
    _require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = _launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 1000})
            page.goto(f"{server}/playground")
            page.wait_for_function("document.getElementById('scheduler').options.length > 0")
            assert page.locator("#model-name").inner_text() == "sd"
            # Fields of other families and of key-protected servers are not shown to an SD user.
            for field in ("#prompt_2", "#true_cfg_scale", "#api_key"):
                assert page.locator(field).is_hidden(), field
            assert not page.locator("#mask").is_hidden()  # SD inpaints: its mask is offered
            assert not page.locator("#guidance_scale").is_hidden()
            page.fill("#prompt", "a lighthouse in the playground")
            page.fill("#num_inference_steps", "3")
            page.fill("#seed", "21")
            assert page.locator("#loras-available").inner_text() == "style"
            page.fill("#loras", "style:0.5")
            page.click("#generate")
            # Previews show the picture forming first; the seed comes with the final image.
            page.wait_for_function("document.getElementById('status').textContent.startsWith('Done')", timeout=60_000)
            assert not page.locator("#result").is_hidden()
            assert page.locator("#result-seed").inner_text() == "21"
            source = page.get_attribute("#image", "src")
            assert source.startswith("data:image/png;base64,")
            # The adapter went with the request: the image is the one /generate makes with it.
            body = {"prompt": "a lighthouse in the playground", "num_inference_steps": 3, "seed": 21}
            scheduler = page.input_value("#scheduler")
            guidance = float(page.input_value("#guidance_scale"))
            body |= {"scheduler": scheduler, "guidance_scale": guidance, "loras": [{"name": "style", "scale": 0.5}]}
            expected = httpx.post(f"{server}/generate", json=body, timeout=60).content
            shown = decode_image(base64.b64decode(source.split(",", 1)[1]))
            assert np.array_equal(shown, decode_image(expected))
            assert page.evaluate(
                "[document.getElementById('progress').value, document.getElementById('progress').max]"
            ) == [3, 3]
            assert page.locator("#status").inner_text() == "Done."
            page.screenshot(path=str(tmp_path / "playground.png"))
            if os.environ.get("PLAYGROUND_SCREENSHOT"):
                shutil.copy(tmp_path / "playground.png", os.environ["PLAYGROUND_SCREENSHOT"])
            # Reuse the seed, then an error from the server is shown, not swallowed.
            page.fill("#seed", "")
            page.click("#reuse-seed")
            assert page.input_value("#seed") == "21"
            page.fill("#prompt", "   ")
            page.click("#generate")
            page.wait_for_selector("#error:not([hidden])", timeout=30_000)
            assert "400" in page.locator("#error").inner_text()
            assert "non-whitespace" in page.locator("#error").inner_text()
        finally:
            browser.close()


@pytest.fixture(scope="module")
def reference_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A model that edits by reference images (the tiny FLUX.2-klein), for the playground's several-file input."""
    tmp = tmp_path_factory.mktemp("references")
    port = free_port()
    log = tmp / "server.log"
    flags = ("--default_steps", "2", "--max_batch_instances", "2")
    process = start_server(
        "--model_id", "builtin:tiny-flux2-klein", "--model_dir", str(tmp / "none"), *flags, port=port, log=log
    )
    try:
        wait_ready(process, port, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        assert stop_server(process) == 0


def _require_chromium() -> None:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium); the playground test needs a browser")


def _launch(playwright: Playwright) -> Browser:
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking"]
    flags += ["--disable-component-update", "--disable-sync"]
    return playwright.chromium.launch(executable_path=CHROMIUM, args=flags, headless=True)


def test_playground_sends_several_reference_images_as_one_edit(reference_server: str, tmp_path: Path) -> None:
    """On a model that edits by reference the file input takes several files, mask and strength are gone, and
    the image shown is the one /generate makes from the same references in the same order."""
    _require_chromium()
    from playwright.sync_api import sync_playwright

    paths, sizes = [], [(96, 64), (64, 64)]
    for index, (width, height) in enumerate(sizes):
        paths.append(tmp_path / f"reference-{index}.png")
        pixels = np.random.default_rng(index).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(paths[-1])
    with sync_playwright() as playwright:
        browser = _launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 1000})
            page.goto(f"{reference_server}/playground")
            page.wait_for_function("document.getElementById('scheduler').options.length > 0")
            assert not page.locator("#inputs").is_hidden()
            assert page.locator("#inputs legend").inner_text().startswith("Reference images")
            assert page.evaluate("document.getElementById('input-image').multiple")
            assert page.locator("#mask").is_hidden() and page.locator("#strength").is_hidden()
            assert page.locator("#guidance_scale").is_hidden()  # distilled: no scale to set
            page.fill("#prompt", "the two pictures, blended")
            page.fill("#seed", "5")
            page.set_input_files("#input-image", [str(path) for path in paths])
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('Done')", timeout=60_000)
            source = page.get_attribute("#image", "src")
            shown = decode_image(base64.b64decode(source.split(",", 1)[1]))
            assert shown.shape == (64, 96, 3)  # the first reference's size
            references = [base64.b64encode(path.read_bytes()).decode() for path in paths]
            body = {"prompt": "the two pictures, blended", "seed": 5, "image": references}
            body |= {
                "scheduler": page.input_value("#scheduler"),
                "guidance_scale": float(page.input_value("#guidance_scale")),
            }
            expected = httpx.post(f"{reference_server}/generate", json=body, timeout=60)
            assert expected.status_code == 200, expected.text
            assert np.array_equal(shown, decode_image(expected.content))
            # The order is the user's: swapped references are another edit, at the other first image's size.
            swapped = httpx.post(f"{reference_server}/generate", json=body | {"image": references[::-1]}, timeout=60)
            assert decode_image(swapped.content).shape == (64, 64, 3)
        finally:
            browser.close()
