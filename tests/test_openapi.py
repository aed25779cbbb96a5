"""schemathesis against the server's own OpenAPI document for this project's routes: no 5xx, and no status,
content type, header or body that the document does not declare."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
from test_manifests import require_tool
from test_server_process import free_port, start_server, wait_ready

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


def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    schemathesis = require_tool("schemathesis")
    port = free_port()
    log = tmp_path / "server.log"
    flags = ["--max_image_size", "128", "--max_steps", "3", "--default_steps", "2", "--max_queue", "64"]
    process = start_server(
        "--model_id", "builtin:tiny", "--model_dir", str(tmp_path / "none"), *flags, port=port, log=log
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, f"{base}/v1/models/sd", log)
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
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        assert "No issues found" in result.stdout
        assert httpx.get(f"{base}/v1/models/sd", timeout=5).status_code == 200
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0
