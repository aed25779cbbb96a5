"""The wire formats' own behaviour: OpenAI's edit form read as typed fields, OpenAI's size checked as width and
height are, stream errors typed as plain ones, traits (not family names) deciding the request checks, and the
start-up log's route list read from the app."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from predictor.errors import InvalidRequest, OutOfMemory, PredictorError
from predictor.protocols import openai
from predictor.protocols.sse import write_events
from predictor.request import GenerationRequest, Limits, ModelTraits, resolve
from predictor.server import route_list
from predictor.testing import MODEL_NAME, decode_image, params

EDITS, GENERATIONS = "/v1/images/edits", "/v1/images/generations"


def _png(width: int = 64, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _edit(client: TestClient, image: bytes = b"not an image", **fields: str):
    return client.post(EDITS, data={"prompt": "a boat", **fields}, files={"image": ("in.png", image, "image/png")})


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"n": "two"}, "n", "'n' must be an integer"),
        ({"n": "5"}, "n", "'n' must be at most 4"),
        ({"seed": ""}, "seed", "'seed' must be an integer"),
        ({"guidance_scale": "high"}, "guidance_scale", "'guidance_scale' must be a number"),
        ({"strength": "1.5"}, "strength", "'strength' must be at most 1"),
        ({"stream": "maybe"}, "stream", "'stream' must be true or false"),
        ({"colour": "red"}, "colour", "unknown field 'colour'"),
        ({"size": "65x64"}, "size", "'size' must be a multiple of 8"),
        ({"loras": "style"}, "loras", """'loras' must be a list like [{"name": "style", "scale": 0.8}] (JSON)"""),
    ],
)
def test_edit_form_fields_are_read_as_their_types(client: TestClient, fields: dict, param: str, message: str) -> None:
    response = _edit(client, _png(), **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["message"], error["param"], error["type"]) == (message, param, "invalid_request_error")


def test_edit_form_text_becomes_the_request_it_spells(client: TestClient) -> None:
    """Numbers and booleans arrive as form text; they mean what the same JSON values mean."""
    response = _edit(client, _png(), n="2", seed="7", num_inference_steps="2", size="64x64", stream="false")
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [item["seed"] for item in data] == [7, 8]
    assert decode_image(base64.b64decode(data[0]["b64_json"])).shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("65x64", "'size' must be a multiple of 8"),
        ("64x2048", "'size' must be at most 1024"),
        ("32x64", "'size' must be at least 64"),
        ("64", "'size' String should match pattern '^([0-9]{2,4}x[0-9]{2,4}|auto)$'"),
    ],
)
def test_openai_size_is_checked_as_width_and_height_are(client: TestClient, size: str, message: str) -> None:
    response = client.post(GENERATIONS, json={"prompt": "a", "size": size})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "size" and error["message"] == message


@pytest.mark.parametrize(
    ("failure", "kind"),
    [
        (InvalidRequest("'loras' do not fit", param="loras"), "invalid_request_error"),
        (OutOfMemory("out of GPU memory"), "server_error"),
    ],
)
def test_openai_stream_errors_are_typed_as_plain_ones(failure: PredictorError, kind: str) -> None:
    """A failure after the stream started (an adapter that does not fit is a 400 at prepare) ends the stream with
    OpenAI's error object, typed as the same failure is in a plain response."""

    async def run() -> list:
        raise failure

    async def stream() -> list[bytes]:
        events = openai.OpenAIEvents("image_generation", params())
        return [chunk async for chunk in write_events(run, asyncio.Queue(), events)]

    chunks = asyncio.run(stream())
    assert len(chunks) == 1 and chunks[0].startswith(b"event: error\n")
    data = json.loads(chunks[0].split(b"data: ", 1)[1])
    assert data == {"type": "error", **openai.error_body(failure)} and data["error"]["type"] == kind


def test_strength_rounding_follows_the_flow_matching_trait() -> None:
    """3 steps at strength 0.3: SD's count keeps int(0.9) = 0 steps (a 400), a flow-matching model's rounds its first
    step and keeps 1, whatever the family is called."""
    request = GenerationRequest(
        prompt="a", image=base64.b64encode(_png()).decode(), strength=0.3, num_inference_steps=3, seed=1
    )
    modes = frozenset({"text", "img2img"})
    flow = ModelTraits(family="any", native_size=64, modes=modes, strength_rounded_from_start=True)
    assert resolve(request, Limits(), flow).strength == 0.3
    with pytest.raises(InvalidRequest, match="'strength' leaves no step of 3"):
        resolve(request, Limits(), ModelTraits(family="flux", native_size=64, modes=modes))


def test_startup_route_list_names_every_route(client: TestClient) -> None:
    listed = route_list(client.app, MODEL_NAME)
    for route in (
        "POST /generate",
        "POST /v1/images/generations",
        "POST /v1/images/edits",
        f"POST /v1/models/{MODEL_NAME}:predict",
        f"POST /v2/models/{MODEL_NAME}/infer",
        f"GET /v1/models/{MODEL_NAME}/schedulers",
        f"GET /v1/models/{MODEL_NAME}/loras",
        "GET /livez",
        "GET /metrics",
        "GET /playground/",
    ):
        assert route in listed, (route, listed)
    assert not [route for route in listed if "/v2/repository/" in route], "the disabled routes are not served"
    assert len(listed) == len(set(listed))
