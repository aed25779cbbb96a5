"""schemathesis against the server's own OpenAPI document for this project's routes: no 5xx, and no status,
content type, header or body that the document does not declare."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest

from predictor.testing import free_port, start_server, stop_server, wait_ready

pytestmark = pytest.mark.slow
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
