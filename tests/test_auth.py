"""API keys: with --api_key_file or $PREDICTOR_API_KEYS, every POST route (v1, v2, /generate, OpenAI) needs
``Authorization: Bearer <key>``, answered 401 in the route's own error shape otherwise, and so does the LoRA
listing; probes, metrics, the model's description and the playground page stay open. In process on the real
app, and in a real process with the OpenAI SDK and the command-line client."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from predictor.config import API_KEYS_ENV, parse_settings, read_api_keys
from predictor.server import PredictorServer
from predictor.testing import MODEL_NAME, free_port, make_settings, start_server, stop_server, wait_ready

KEY = "k-0123456789abcdef-first"
OTHER_KEY = "k-0123456789abcdef-second"
V2_BODY = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a kite"]}]}
ROUTES = [
    ("/generate", {"prompt": "a kite", "num_inference_steps": 1}),
    (f"/v1/models/{MODEL_NAME}:predict", {"instances": [{"prompt": "a kite", "num_inference_steps": 1}]}),
    (f"/v2/models/{MODEL_NAME}/infer", {**V2_BODY, "parameters": {"num_inference_steps": 1}}),
    ("/v1/images/generations", {"prompt": "a kite", "num_inference_steps": 1}),
]


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys"
    path.write_text(f"# deploy keys\n{KEY}\n\n{OTHER_KEY}\n")
    return path


@pytest.fixture(scope="module")
def guarded(model, tiny_model_dir: Path, key_file: Path) -> Iterator[TestClient]:
    """The real app on the session's loaded model, started with API keys."""
    settings = make_settings(tiny_model_dir, "--api_key_file", str(key_file), "--max_batch_instances", "4")
    app = PredictorServer(settings, http_port=0, grpc_port=0, enable_grpc=False).create_app(model)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def error_of(response: httpx.Response, path: str) -> dict:
    body = response.json()
    if path.startswith("/v1/images/"):  # OpenAI's shape, so OpenAI SDKs raise AuthenticationError
        return {"error": body["error"]["message"], "error_type": body["error"]["code"]}
    return body


@pytest.mark.parametrize(("path", "body"), ROUTES, ids=[path for path, _ in ROUTES])
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-key-0123456789", f"Basic {KEY}", f"Bearer {KEY[:-1]}", "Bearer", KEY],
    ids=["missing", "wrong", "not-bearer", "prefix-of-a-key", "empty", "no-scheme"],
)
def test_generation_routes_refuse_a_missing_or_wrong_key(guarded: TestClient, path, body, authorization) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = guarded.post(path, json=body, headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    error = error_of(response, path)
    assert error["error_type"] == "invalid_api_key"
    assert "Authorization: Bearer" in error["error"]
    assert KEY not in response.text and OTHER_KEY not in response.text


@pytest.mark.parametrize(("path", "body"), ROUTES, ids=[path for path, _ in ROUTES])
@pytest.mark.parametrize("key", [KEY, OTHER_KEY])
def test_generation_routes_serve_any_listed_key(guarded: TestClient, path, body, key) -> None:
    response = guarded.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text


def test_probes_metrics_discovery_and_the_playground_stay_open(guarded: TestClient) -> None:
    for path in (
        "/livez",
        f"/v1/models/{MODEL_NAME}",
        f"/v2/models/{MODEL_NAME}/ready",
        "/v2/health/live",
        "/metrics",
        "/openapi.json",
        "/playground/",
        "/playground/app.js",
    ):
        assert guarded.get(path).status_code == 200, path
    info = guarded.get(f"/v1/models/{MODEL_NAME}/schedulers").json()
    assert info["api_key_required"] is True


def test_the_lora_listing_needs_the_key_when_keys_are_on(guarded: TestClient, client: TestClient) -> None:
    """It names the operator's adapter files and why any was refused: for clients that may generate."""
    path = f"/v1/models/{MODEL_NAME}/loras"
    for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}):
        refused = guarded.get(path, headers=headers)
        assert refused.status_code == 401 and refused.json()["error_type"] == "invalid_api_key"
    assert guarded.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.get(path).status_code == 200  # without keys it stays open, like every read


def test_keys_come_from_a_file_and_the_environment_and_are_checked_at_start(tmp_path: Path, capsys) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n# a comment\n")
    environ = {API_KEYS_ENV: f"{OTHER_KEY}, {KEY}\n"}
    assert read_api_keys(str(keys), environ) == (KEY, OTHER_KEY)
    assert read_api_keys(None, {}) == ()
    for text, message in (("# only a comment\n", "holds no key"), ("short\n", "at least 16 characters")):
        keys.write_text(text)
        with pytest.raises(SystemExit) as exited:
            parse_settings(["--api_key_file", str(keys)])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "short" not in err.replace("at least", "")
    with pytest.raises(SystemExit):
        parse_settings(["--api_key_file", str(tmp_path / "missing")])
    assert "cannot be read" in capsys.readouterr().err
    keys.write_bytes(b"\xef\xbb\xbf" + KEY.encode() + b"\n")  # saved with a byte-order mark
    assert read_api_keys(str(keys), {}) == (KEY,)
    with pytest.raises(ValueError, match="is set but holds no key"):
        read_api_keys(None, {API_KEYS_ENV: " , \n"})
    with pytest.raises(SystemExit):
        parse_settings(["--api_key_file", str(keys), "--enable_grpc", "true"])
    assert "gRPC requests would not be checked" in capsys.readouterr().err


@pytest.mark.slow
def test_real_server_with_a_key_from_the_environment_serves_the_sdk_and_the_cli(tmp_path: Path) -> None:
    import openai

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    process = start_server(
        "--model_id", "builtin:tiny", "--model_dir", str(tmp_path / "none"), "--default_steps", "2",
        port=port, log=log, env={API_KEYS_ENV: KEY},
    )  # fmt: skip
    try:
        wait_ready(process, port, log)  # readiness needs no key
        refused = openai.OpenAI(base_url=f"{base}/v1", api_key="not-the-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            refused.images.generate(prompt="a kite")
        served = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0).images.generate(prompt="a kite")
        assert served.data[0].b64_json

        output = tmp_path / "kite.png"
        cli = [sys.executable, "-m", "predictor.client", "a kite", "-o", str(output), "--url", base]
        without = subprocess.run(cli, capture_output=True, text=True, timeout=120, check=False)
        assert without.returncode == 1 and "401" in without.stderr
        with_key = subprocess.run([*cli, "--api_key", KEY], capture_output=True, text=True, timeout=120, check=False)
        assert with_key.returncode == 0, with_key.stderr
        assert output.read_bytes().startswith(b"\x89PNG")
    finally:
        assert stop_server(process) == 0
    output_log = log.read_text()
    assert "POST routes need an API key (1 configured)" in output_log
    assert KEY not in output_log, "keys never reach the log"
