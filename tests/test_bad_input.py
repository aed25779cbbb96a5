"""Every kind of bad input gets 400 with the one error body, names the parameter, and echoes nothing large."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from predictor.testing import MODEL_NAME

V1 = f"/v1/models/{MODEL_NAME}:predict"
V2 = f"/v2/models/{MODEL_NAME}/infer"
HUGE = "x" * 5000


def v2(prompts=("ok",), datatype="BYTES", shape=None, extra_inputs=(), **parameters):
    tensor = {"name": "prompt", "datatype": datatype, "shape": shape or [len(prompts)], "data": list(prompts)}
    body = {"inputs": [tensor, *extra_inputs]}
    if parameters:
        body["parameters"] = parameters
    return body


# (route, body (dict / raw bytes), expected param)
CASES = [
    ("/generate", {}, "prompt"),
    ("/generate", {"prompt": ""}, "prompt"),
    ("/generate", {"prompt": "   "}, "prompt"),
    ("/generate", {"prompt": 42}, "prompt"),
    ("/generate", {"prompt": None}, "prompt"),
    ("/generate", {"prompt": HUGE}, "prompt"),
    ("/generate", {"prompt": "a", "negative_prompt": HUGE}, "negative_prompt"),
    ("/generate", {"prompt": "a", "negative_prompt": 1}, "negative_prompt"),
    ("/generate", {"prompt": "a", "num_inference_steps": 0}, "num_inference_steps"),
    ("/generate", {"prompt": "a", "num_inference_steps": 151}, "num_inference_steps"),
    ("/generate", {"prompt": "a", "num_inference_steps": True}, "num_inference_steps"),
    ("/generate", {"prompt": "a", "num_inference_steps": 2.5}, "num_inference_steps"),
    ("/generate", {"prompt": "a", "num_inference_steps": "10"}, "num_inference_steps"),
    ("/generate", {"prompt": "a", "guidance_scale": -1}, "guidance_scale"),
    ("/generate", {"prompt": "a", "guidance_scale": 31}, "guidance_scale"),
    ("/generate", {"prompt": "a", "guidance_scale": "7"}, "guidance_scale"),
    ("/generate", {"prompt": "a", "guidance_scale": False}, "guidance_scale"),
    ("/generate", b'{"prompt": "a", "guidance_scale": NaN}', "guidance_scale"),
    ("/generate", b'{"prompt": "a", "guidance_scale": Infinity}', "guidance_scale"),
    ("/generate", {"prompt": "a", "width": 100}, "width"),
    ("/generate", {"prompt": "a", "height": 56}, "height"),
    ("/generate", {"prompt": "a", "width": 1032}, "width"),
    ("/generate", {"prompt": "a", "height": -64}, "height"),
    ("/generate", {"prompt": "a", "seed": -1}, "seed"),
    ("/generate", {"prompt": "a", "seed": 2**32}, "seed"),
    ("/generate", {"prompt": "a", "seed": 1.5}, "seed"),
    ("/generate", {"prompt": "a", "scheduler": "karras_9000"}, "scheduler"),
    ("/generate", {"prompt": "a", "output_format": "gif"}, "output_format"),
    ("/generate", {"prompt": "a", "nsfw_filter": False}, "nsfw_filter"),
    # The served model (SD 1.x) has one text encoder: SDXL's second prompts are refused, by name.
    ("/generate", {"prompt": "a", "prompt_2": "b"}, "prompt_2"),
    ("/generate", {"prompt": "a", "negative_prompt_2": ""}, "negative_prompt_2"),
    ("/generate", {"prompt": "a", "prompt_2": 3}, "prompt_2"),
    ("/generate", {"prompt": "a", "scheduler": "lcm", "num_inference_steps": 51}, "num_inference_steps"),
    ("/generate", {"prompt": "a", "x" * 1000: 1}, None),
    ("/generate", b"{not json", "body"),
    ("/generate", b"", "body"),
    ("/generate", b'["a list"]', "body"),
    ("/generate", b"\xff\xfe\x00", "body"),
    ("/generate", b"[" * 5000, "body"),  # nesting deep enough to exhaust the JSON parser's recursion
    # An integer past Python's 4300-digit conversion limit: json.loads raises a plain ValueError.
    ("/generate", b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}", "body"),
    # loras as JSON text (as form fields and v2 parameters carry it), nested past the parser's recursion.
    ("/generate", {"prompt": "a", "loras": "[" * 100_000}, "loras"),
    (V1, b'{"instances": [{"prompt": "a", "seed": ' + b"9" * 5000 + b"}]}", None),
    (V1, {"instances": []}, "instances"),
    (V1, {"instances": [{"prompt": "a"}] * 5}, "instances"),
    (V1, {"instances": "a cat"}, "instances"),
    (V1, {"inputs": [{"prompt": "a"}]}, "inputs"),
    (V1, {"instances": [{"prompt": "a"}, {"prompt": "b", "width": 7}]}, "instances[1].width"),
    (V1, {"instances": [{"prompt": "a"}, "b"]}, "instances[1]"),
    (V1, {"instances": [{"prompt": "a"}, {"prompt": "b", "prompt_2": "c"}]}, "instances[1].prompt_2"),
    (V1, b"{broken", "body"),
    (V2, v2(datatype="FP32"), "inputs.prompt"),
    (V2, v2(shape=[3]), "inputs.prompt"),
    (V2, v2(prompts=["a"] * 5), "inputs.prompt"),
    (V2, v2(prompts=[""]), "prompt"),
    (V2, v2(num_inference_steps=1000), "num_inference_steps"),
    (V2, v2(scheduler="nope"), "scheduler"),
    (V2, v2(mystery=1), "mystery"),
    (V2, v2(prompt="in parameters"), "parameters.prompt"),
    (V2, v2(prompt_2="in parameters"), "parameters.prompt_2"),
    (V2, v2(extra_inputs=[{"name": "prompt_2", "datatype": "BYTES", "shape": [1], "data": ["b"]}]), "inputs.prompt_2"),
    (
        V2,
        v2(
            prompts=["a", "b"],
            extra_inputs=[{"name": "negative_prompt", "datatype": "BYTES", "shape": [1], "data": ["c"]}],
        ),
        "inputs.negative_prompt",
    ),
    (V2, {"inputs": [{"name": "latents", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}, "inputs.latents"),
    (V2, {"inputs": []}, "inputs.prompt"),
    (V2, {"nothing": True}, "inputs"),
    (
        V2,
        {
            "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
            "parameters": {"seed": None},
        },
        "parameters.seed",
    ),
    (V2, b"{broken", "body"),
    # Input images: every flaw is a 400 naming the field, in every protocol.
    ("/generate", {"prompt": "a", "image": "not base64!"}, "image"),
    ("/generate", {"prompt": "a", "image": "aGVsbG8="}, "image"),  # base64 of "hello": not an image
    ("/generate", {"prompt": "a", "image": 7}, "image"),
    ("/generate", {"prompt": "a", "strength": 2.0}, "strength"),
    ("/generate", {"prompt": "a", "mask": "aGVsbG8="}, "mask"),
    (V1, {"instances": [{"prompt": "a"}, {"prompt": "b", "image": "%%"}]}, "instances[1].image"),
    (V2, v2(extra_inputs=[{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%"]}]), "inputs.image"),
    (V2, v2(extra_inputs=[{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]), "inputs.image"),
]


@pytest.mark.parametrize(("route", "body", "param"), CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_input_is_400_with_error_body(client: TestClient, route: str, body, param: str | None) -> None:
    if isinstance(body, bytes):
        response = client.post(route, content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post(route, json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert set(error) == {"error", "error_type", "param"}
    assert error["error_type"] == "invalid_input"
    assert error["error"] and "Traceback" not in error["error"]
    if param is not None:
        assert error["param"] == param, error
    assert len(response.content) < 600, "the error body must not echo large input"
    assert HUGE not in response.text


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "a", "n": ' + b"9" * 5000 + b"}",
        b'{"prompt": "a", "loras": "' + b"[" * 100_000 + b'"}',
        b"[" * 5000,
    ],
    ids=["long-integer", "deep-loras-text", "deep-body"],
)
def test_openai_route_refuses_malformed_json_as_invalid_request(client: TestClient, body: bytes) -> None:
    response = client.post("/v1/images/generations", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "Traceback" not in error["message"]
    assert len(response.content) < 600


def test_valid_request_is_served_after_bad_ones(client: TestClient) -> None:
    for route, body, _ in CASES[:10]:
        client.post(route, json=body) if isinstance(body, dict) else client.post(route, content=body)
    response = client.post("/generate", json={"prompt": "still serving", "seed": 1})
    assert response.status_code == 200
    assert client.get(f"/v1/models/{MODEL_NAME}").status_code == 200


@pytest.mark.parametrize(
    ("route", "body", "message"),
    [
        # Over the operator's limit and over the hard ceiling: one wording, the operator's limit.
        ("/generate", {"prompt": "a", "num_inference_steps": 200}, "'num_inference_steps' must be at most 150"),
        ("/generate", {"prompt": "a", "num_inference_steps": 999}, "'num_inference_steps' must be at most 150"),
        (V1, {"instances": [{"prompt": "a", "width": 5000}]}, "'instances[0].width' must be at most 1024"),
        ("/generate", {"prompt": "a", "width": 2048}, "'width' must be at most 1024"),
        ("/generate", {"prompt": "x" * 3000}, "'prompt' is longer than 2000 characters"),
        ("/generate", {"prompt": "x" * 200_000}, "'prompt' is longer than 2000 characters"),
        ("/generate", {"prompt": "a", "guidance_scale": 31}, "'guidance_scale' must be at most 30"),
        ("/generate", {"prompt": "a", "num_inference_steps": 0}, "'num_inference_steps' must be at least 1"),
        ("/generate", {"prompt": "a", "width": 100}, "'width' must be a multiple of 8"),
        ("/generate", {"prompt": "   "}, "'prompt' must contain a non-whitespace character"),
        ("/generate", {"prompt": ""}, "'prompt' must not be empty"),
        # The served model's own names: SD 1.x's, without the flow-matching families' heun.
        (
            "/generate",
            {"prompt": "a", "scheduler": "karras_9000"},
            "'scheduler' must be one of dpmpp_2m, dpmpp_2m_karras, euler, euler_a, ddim, pndm, lms, unipc, lcm "
            "(this model's)",
        ),
        (
            V1,
            {"instances": [{"prompt": "a", "scheduler": "heun!"}]},
            "'instances[0].scheduler' must be one of dpmpp_2m, dpmpp_2m_karras, euler, euler_a, ddim, pndm, lms, "
            "unipc, lcm (this model's)",
        ),
    ],
)
def test_error_messages_say_the_real_limit_in_plain_words(client: TestClient, route: str, body, message: str) -> None:
    response = client.post(route, json=body)
    assert response.status_code == 400
    assert response.json()["error"] == message
    assert "Value error" not in response.text and "Input should" not in response.text


def _binary_v2(declared: str | None, tail: bytes, size: int = 20) -> tuple[bytes, dict[str, str]]:
    """A v2 request in KServe's binary extension: a JSON header declaring one prompt of ``size`` raw bytes, then
    ``tail``; ``declared`` is the Inference-Header-Content-Length (None: the JSON's true length)."""
    header = json.dumps(
        {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": size}}]}
    ).encode()
    headers = {"content-type": "application/octet-stream"}
    headers["Inference-Header-Content-Length"] = str(len(header)) if declared is None else declared
    return header + tail, headers


# A BYTES element is a 4-byte little-endian length, then the bytes.
_PROMPT_ELEMENT = struct.pack("<I", 16) + b"a lighthouse !!!"


@pytest.mark.parametrize(
    ("declared", "tail", "message"),
    [
        ("abc", _PROMPT_ELEMENT, "Inference-Header-Content-Length"),
        ("999999", _PROMPT_ELEMENT, "Inference-Header-Content-Length"),
        ("9" * 5000, _PROMPT_ELEMENT, "Inference-Header-Content-Length"),
        ("-5", _PROMPT_ELEMENT, "Inference-Header-Content-Length"),
        ("0", _PROMPT_ELEMENT, "Inference-Header-Content-Length"),
        (None, _PROMPT_ELEMENT[:8], "binary data does not match"),  # short binary data
        (None, struct.pack("<I", 2**31 - 1) + b"a lighthouse !!!", "binary data does not match"),
    ],
    ids=["not-a-number", "past-the-body", "past-the-digit-limit", "negative", "zero", "short-data", "bad-element"],
)
def test_v2_binary_bodies_that_do_not_match_their_header_are_400(
    client: TestClient, declared: str | None, tail: bytes, message: str
) -> None:
    body, headers = _binary_v2(declared, tail)
    response = client.post(V2, content=body, headers=headers)
    assert response.status_code == 400, response.text[:300]
    error = response.json()
    assert error["error_type"] == "invalid_input" and message in error["error"]


def test_a_v2_binary_request_that_matches_its_header_is_served(client: TestClient) -> None:
    body, headers = _binary_v2(None, _PROMPT_ELEMENT)
    response = client.post(V2, content=body, headers=headers)
    assert response.status_code == 200, response.text[:300]
    assert response.json()["outputs"][0]["name"] == "image"


# Values at and past the limits of what JSON parsers, numbers and strings hold, for every field of every JSON route.
_HOSTILE_VALUES: list[bytes] = [
    b"9" * 4301,  # past Python's int-digit limit
    b"-" + b"9" * 400,
    b"1e400",  # overflows a float to inf
    b"-1e-400",
    b"4294967296",
    b"-0.0",
    b"1.5",
    b"true",
    b"null",
    b"[]",
    b"{}",
    b"[" * 3000 + b"]" * 3000,  # deeper than Python's recursion limit
    b'{"a":' * 3000 + b"1" + b"}" * 3000,
    b'"' + b"x" * 100_000 + b'"',
    b'"\\ud800"',  # a lone surrogate
    b'"\\u0000"',
    b'"' + "\u00e9\u4e2d\U0001f600".encode() * 1000 + b'"',
    b'"NaN"',
    b'"' + b"[" * 3000 + b'"',  # text that is itself deep JSON (the loras field parses text)
]


def _json_routes(client: TestClient) -> list[tuple[str, list[str], Callable[[bytes, bytes], bytes]]]:
    """(route, its body's fields as the served OpenAPI document lists them, a body with one field set raw)."""
    paths = client.get("/openapi.json").json()["paths"]

    def properties(path: str, *inside: str) -> list[str]:
        body = paths[path.replace(MODEL_NAME, "{model_name}")]["post"]["requestBody"]
        schema = body["content"]["application/json"]["schema"]
        for key in inside:
            schema = schema["properties"][key]["items"]
        return sorted(schema["properties"])

    def plain(field: bytes, value: bytes) -> bytes:
        return b'{"prompt": "a", "num_inference_steps": 1, "' + field + b'": ' + value + b"}"

    def v1(field: bytes, value: bytes) -> bytes:
        return b'{"instances": [' + plain(field, value) + b"]}"

    return [
        ("/generate", properties("/generate"), plain),
        ("/v1/images/generations", properties("/v1/images/generations"), plain),
        (V1, properties(V1, "instances"), v1),
    ]


def test_no_json_route_answers_5xx_to_values_at_their_limits(client: TestClient) -> None:
    """Schema-driven: each field of each JSON route, from the served OpenAPI document, set to each hostile value."""
    failures = []
    for route, fields, body_with in _json_routes(client):
        assert len(fields) > 10, (route, fields)
        for field in fields:
            for value in _HOSTILE_VALUES:
                response = client.post(
                    route, content=body_with(field.encode(), value), headers={"Content-Type": "application/json"}
                )
                if response.status_code >= 500:
                    failures.append(f"{route} {field}={value[:40]!r}: {response.status_code} {response.text[:200]}")
    # The v2 route's parameters, and whole bodies that are hostile values themselves.
    for value in _HOSTILE_VALUES:
        v2_body = b'{"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a"]}], '
        bodies = [(V2, v2_body + b'"parameters": {"num_inference_steps": ' + value + b"}}")]
        bodies += [(route, value) for route in ("/generate", "/v1/images/generations", V1, V2)]
        for route, body in bodies:
            response = client.post(route, content=body, headers={"Content-Type": "application/json"})
            if response.status_code >= 500:
                failures.append(f"{route} body {body[:60]!r}: {response.status_code} {response.text[:200]}")
    assert not failures, "\n".join(failures[:20])
