"""In-process HTTP tests of v1, v2 and /generate on the real KServe app and the tiny model."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient

from predictor.testing import MODEL_NAME, decode_image

V1 = f"/v1/models/{MODEL_NAME}:predict"
V2 = f"/v2/models/{MODEL_NAME}/infer"
JSON = {"Content-Type": "application/json"}


def v2_body(prompts, **parameters):
    body = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [len(prompts)], "data": prompts}]}
    if parameters:
        body["parameters"] = parameters
    return body


def test_model_is_ready_after_load(client: TestClient, model) -> None:
    assert client.get(f"/v1/models/{MODEL_NAME}").json() == {"name": MODEL_NAME, "ready": True}
    # KServe's own ``engine`` flag ("call start_engine()") is left alone; the generation engine has its own name.
    assert model.engine is False and model.generation_engine is not None
    assert client.get(f"/v2/models/{MODEL_NAME}/ready").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200


def test_generate_returns_png_with_seed_header(client: TestClient) -> None:
    response = client.post("/generate", json={"prompt": "a red fox", "seed": 1234})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "1234"
    assert response.headers["x-prompt-truncated"] == "false"
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert decode_image(response.content).shape == (64, 64, 3)  # builtin:tiny's native size


@pytest.mark.parametrize(
    ("output_format", "media_type", "magic"),
    [
        ("jpeg", "image/jpeg", b"\xff\xd8\xff"),
        ("webp", "image/webp", b"RIFF"),
    ],
)
def test_generate_other_formats(client: TestClient, output_format: str, media_type: str, magic: bytes) -> None:
    response = client.post("/generate", json={"prompt": "x", "output_format": output_format, "seed": 1})
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.content.startswith(magic)


def test_generate_honours_width_and_height(client: TestClient) -> None:
    response = client.post("/generate", json={"prompt": "wide", "width": 128, "height": 72, "seed": 3})
    assert response.status_code == 200
    assert decode_image(response.content).shape == (72, 128, 3)


def test_server_draws_a_seed_when_absent_and_returns_it(client: TestClient) -> None:
    first = client.post("/generate", json={"prompt": "seedless"})
    second = client.post("/generate", json={"prompt": "seedless"})
    assert first.status_code == second.status_code == 200
    seed = int(first.headers["x-seed"])
    assert 0 <= seed <= 2**32 - 1
    assert first.headers["x-seed"] != second.headers["x-seed"]
    again = client.post("/generate", json={"prompt": "seedless", "seed": seed})
    assert again.content == first.content


def test_same_seed_same_bytes_different_seed_different_image(client: TestClient) -> None:
    body = {"prompt": "determinism", "seed": 77, "num_inference_steps": 5}
    a = client.post("/generate", json=body).content
    b = client.post("/generate", json=body).content
    c = client.post("/generate", json={**body, "seed": 78}).content
    assert a == b
    assert np.abs(decode_image(a) - decode_image(c)).max() > 10


def test_long_prompt_is_truncated_and_says_so(client: TestClient) -> None:
    response = client.post("/generate", json={"prompt": "word " * 300, "seed": 5})
    assert response.status_code == 200
    assert response.headers["x-prompt-truncated"] == "true"


def test_v1_predictions_in_order_with_metadata(client: TestClient) -> None:
    instances = [
        {"prompt": "first", "seed": 10},
        {"prompt": "second", "seed": 11, "width": 96, "height": 64, "output_format": "jpeg"},
        {"prompt": "third " * 100, "seed": 12},
    ]
    response = client.post(V1, json={"instances": instances})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [p["seed"] for p in predictions] == [10, 11, 12]
    assert [(p["width"], p["height"]) for p in predictions] == [(64, 64), (96, 64), (64, 64)]
    assert [p["image"]["format"] for p in predictions] == ["png", "jpeg", "png"]
    assert [p["prompt_truncated"] for p in predictions] == [False, False, True]
    assert decode_image(base64.b64decode(predictions[1]["image"]["b64"])).shape == (64, 96, 3)
    # Each instance is the same image /generate gives for it.
    alone = client.post("/generate", json=instances[0]).content
    assert np.abs(decode_image(base64.b64decode(predictions[0]["image"]["b64"])) - decode_image(alone)).max() <= 1


def test_v1_accepts_json_sent_without_json_content_type(client: TestClient) -> None:
    # `curl -d` sends application/x-www-form-urlencoded; KServe then passes the raw body through.
    response = client.post(
        V1,
        content=b'{"instances": [{"prompt": "curl", "seed": 1}]}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200
    assert response.json()["predictions"][0]["seed"] == 1


def test_v2_infer_returns_base64_images_and_seeds(client: TestClient) -> None:
    body = v2_body(["a boat", "a tree"], seed=21, num_inference_steps=3, width=72)
    body["id"] = "req-1"
    body["inputs"].append({"name": "negative_prompt", "datatype": "BYTES", "shape": [2], "data": ["", "blurry"]})
    response = client.post(V2, json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["model_name"] == MODEL_NAME
    assert result["id"] == "req-1"
    outputs = {o["name"]: o for o in result["outputs"]}
    assert outputs["image"]["datatype"] == "BYTES" and outputs["image"]["shape"] == [2]
    assert (outputs["seed"]["datatype"], outputs["seed"]["shape"], outputs["seed"]["data"]) == ("INT64", [2], [21, 21])
    images = [decode_image(base64.b64decode(item)) for item in outputs["image"]["data"]]
    assert [image.shape for image in images] == [(64, 72, 3), (64, 72, 3)]
    # Same seed, different prompts: different pictures.
    assert np.abs(images[0] - images[1]).max() > 10


def test_v2_with_kserve_rest_client(client: TestClient) -> None:
    """KServe's own InferenceRESTClient (v2) can talk to the server and decode the BYTES output."""
    import asyncio

    import httpx
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    async def call():
        transport = httpx.ASGITransport(app=client.app)
        rest = InferenceRESTClient(RESTConfig(protocol="v2", transport=transport))
        prompt = InferInput("prompt", [1], "BYTES", ["a lighthouse"])
        request = InferRequest(MODEL_NAME, [prompt], parameters={"seed": 9, "num_inference_steps": 3})
        try:
            return await rest.infer("http://test", request, model_name=MODEL_NAME)
        finally:
            await rest.close()

    response = asyncio.run(call())
    outputs = {o.name: o for o in response.outputs}
    assert outputs["seed"].data == [9]
    png = base64.b64decode(outputs["image"].data[0])
    assert png.startswith(b"\x89PNG")


def test_repository_unload_is_disabled(client: TestClient) -> None:
    for action in ("load", "unload"):
        response = client.post(f"/v2/repository/models/{MODEL_NAME}/{action}")
        assert response.status_code == 403
        assert response.json()["error_type"] == "forbidden"
    assert client.get(f"/v1/models/{MODEL_NAME}").status_code == 200


def test_unknown_model_is_404(client: TestClient) -> None:
    response = client.post("/v1/models/nope:predict", json={"instances": [{"prompt": "x"}]})
    assert response.status_code == 404
    assert response.json()["error_type"] == "model_not_found"
    # The answer names the model asked for and the one this server serves, in v1 and v2 alike.
    assert f"nope does not exist. This server serves: {MODEL_NAME}." in response.json()["error"]
    v2 = client.post("/v2/models/nope/infer", json={"inputs": []})
    assert v2.status_code == 404 and f"This server serves: {MODEL_NAME}." in v2.json()["error"]


def test_metrics_are_exposed_and_count_what_happened(client: TestClient) -> None:
    def sample(name: str) -> float:
        line = re.search(rf'^{name}{{model_name="{MODEL_NAME}"}} (\S+)$', client.get("/metrics").text, re.M)
        assert line, f"{name} is not exposed"
        return float(line.group(1))

    images, steps = sample("diffusion_images_total"), sample("diffusion_step_seconds_count")
    assert client.post("/generate", json={"prompt": "metrics", "seed": 1, "num_inference_steps": 3}).status_code == 200
    assert sample("diffusion_images_total") == images + 1
    assert sample("diffusion_step_seconds_count") == steps + 3
    assert sample("diffusion_batch_size_count") >= 3
    assert sample("diffusion_image_seconds_count") >= 1
    assert sample("diffusion_queue_depth") == 0
    assert sample("diffusion_active_images") == 0
