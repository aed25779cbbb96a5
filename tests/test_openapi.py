"""The server's own OpenAPI document: each generation route documents exactly the fields it accepts, with the
served limits; and schemathesis against it finds no 5xx and no status, content type, header or body that the
document does not declare."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from predictor.testing import MODEL_NAME, free_port, start_server, stop_server, wait_ready

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
]


def test_openapi_declares_the_real_limits_and_statuses(client) -> None:
    document = client.get("/openapi.json").json()
    generate = document["paths"]["/generate"]["post"]
    schema = generate["requestBody"]["content"]["application/json"]["schema"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["num_inference_steps"]["anyOf"][0]["maximum"] == 150
    assert schema["properties"]["width"]["anyOf"][0]["maximum"] == 1024
    assert set(generate["responses"]) >= {"200", "400", "413", "500", "503", "504"}
    assert "/v2/repository/models/{model_name}/unload" not in document["paths"]
    assert client.get("/docs").status_code == 404, "no docs UI"


def test_openai_route_publishes_the_servers_limits(client) -> None:
    """The conftest server allows 4 images per request, 150 steps and 2000-character prompts."""
    document = client.get("/openapi.json").json()
    operation = document["paths"]["/v1/images/generations"]["post"]
    properties = operation["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert properties["n"]["maximum"] == 4
    assert properties["prompt"]["maxLength"] == 2000
    assert properties["negative_prompt"]["anyOf"][0]["maxLength"] == 2000
    assert properties["num_inference_steps"]["anyOf"][0]["maximum"] == 150


V1 = f"/v1/models/{MODEL_NAME}:predict"
GENERATE, GENERATIONS, EDITS = "/generate", "/v1/images/generations", "/v1/images/edits"
EDIT_FILES = {"image", "mask"}
# A value no field's type takes: a known field answers with its own error, an unknown one with "unknown field".
PROBE = {"probe": True}


def _json_properties(operation: dict) -> set[str]:
    return set(operation["requestBody"]["content"]["application/json"]["schema"]["properties"])


def documented_fields(document: dict) -> dict[str, set[str]]:
    """The request fields each generation route's OpenAPI entry documents (for v1: those of one instance)."""
    paths = document["paths"]
    v1_body = paths["/v1/models/{model_name}:predict"]["post"].get("requestBody")
    instance = set()
    if v1_body is not None:
        instances = v1_body["content"]["application/json"]["schema"]["properties"]["instances"]
        instance = set(instances["items"]["properties"])
    edits = paths[EDITS]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    return {
        GENERATE: _json_properties(paths[GENERATE]["post"]),
        V1: instance,
        GENERATIONS: _json_properties(paths[GENERATIONS]["post"]),
        EDITS: set(edits) - EDIT_FILES,
    }


def refused_as_unknown(client: TestClient, route: str, name: str) -> bool:
    """Whether ``route`` refuses the field ``name`` as unknown (each probe is refused, by one error or another)."""
    if route == EDITS:  # a form's fields are text; the file is no image, so no probe is generated
        garbage = {"image": ("x.png", b"not an image", "image/png")}
        response = client.post(EDITS, data={"prompt": "a", name: "probe"}, files=garbage)
    elif route == V1:
        response = client.post(V1, json={"instances": [{"prompt": "a", name: PROBE}]})
    else:
        response = client.post(route, json={"prompt": "a", name: PROBE})
    assert response.status_code == 400, (route, name, response.text)
    error = response.json()["error"]
    message = error["message"] if isinstance(error, dict) else error  # OpenAI's shape on its routes
    return message.startswith("unknown field")


def test_every_route_documents_exactly_the_fields_it_accepts(client: TestClient) -> None:
    """/generate, a v1 instance, OpenAI's JSON route and its edit form: a field one accepts and does not document
    (or documents and refuses) is drift between the request models and the hand-made parts of the document."""
    documented = documented_fields(client.get("/openapi.json").json())
    candidates = set().union(*documented.values(), {"not_a_field"})
    drift = {}
    for route, fields in documented.items():
        probed = candidates - EDIT_FILES if route == EDITS else candidates  # the form's files: checked below
        accepted = {name for name in probed if not refused_as_unknown(client, route, name)}
        assert "not_a_field" not in accepted, "the probe must tell unknown fields apart"
        if accepted != fields:
            drift[route] = {"undocumented": sorted(accepted - fields), "refused": sorted(fields - accepted)}
    assert not drift, drift


def test_edit_form_documents_its_files_and_the_servers_limits(client: TestClient) -> None:
    """The conftest server allows 4 images per request, 150 steps and 2000-character prompts."""
    document = client.get("/openapi.json").json()
    form = document["paths"][EDITS]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["properties"]) >= EDIT_FILES and {"image", "prompt"} <= set(form["required"])
    assert form["properties"]["n"]["maximum"] == 4
    assert form["properties"]["prompt"]["maxLength"] == 2000
    assert form["properties"]["num_inference_steps"]["maximum"] == 150
    v1 = document["paths"]["/v1/models/{model_name}:predict"]["post"]["requestBody"]
    instances = v1["content"]["application/json"]["schema"]["properties"]["instances"]
    assert instances["maxItems"] == 4
    assert instances["items"]["properties"]["width"]["anyOf"][0]["maximum"] == 1024


@pytest.mark.slow
def test_schemathesis_finds_nothing(tmp_path: Path, require_tool) -> None:
    schemathesis = require_tool("schemathesis")
    port = free_port()
    log = tmp_path / "server.log"
    flags = ["--max_image_size", "128", "--max_steps", "3", "--default_steps", "2", "--max_queue", "64"]
    process = start_server("--model_id", "builtin:tiny", "--model_dir", "/nonexistent", *flags, port=port, log=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, port, log)
        result = subprocess.run(
            [
                schemathesis,
                "run",
                f"{base}/openapi.json",
                "--include-path",
                "/generate",
                "--include-path",
                "/livez",
                "--include-path",
                "/v1/images/generations",
                "--include-path",
                "/v1/images/edits",
                "--checks",
                ",".join(CHECKS),
                "--max-examples",
                "40",
                "--generation-deterministic",
                "--no-color",
                "--workers",
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            cwd=tmp_path,  # schemathesis keeps its cache in the working directory: not in the checkout
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        # Every generated case passed (random bytes are no image, so most edit cases are 400s: schemathesis warns
        # that the route rejects most of what it generates, which is this test's point).
        counts = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
        assert counts and counts.group(1) == counts.group(2), result.stdout[-3000:]
        assert "FAILURES" not in result.stdout
        assert httpx.get(f"{base}/v1/models/sd", timeout=5).status_code == 200
    finally:
        assert stop_server(process) == 0
