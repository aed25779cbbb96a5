"""Fault injection on the real app: a UNet that is slow, runs out of memory, returns NaN, hangs, or breaks the
device; a safety checker that flags; oversized bodies. Exact statuses and bodies, and the server keeps serving.

The fakes wrap the real tiny pipeline's UNet: everything else (engine, KServe app, HTTP) is the real thing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from predictor import images
from predictor.images import encode_png
from predictor.loading import load_pipeline
from predictor.model import DiffusionModel
from predictor.server import PredictorServer
from predictor.testing import MODEL_NAME, make_settings, wait_until

REQUEST_TIMEOUT_S = 5
open_image = Image.open  # the real one, for the spy that counts decodes


class FaultyUNet:
    """Wraps a UNet; each fault is switched on by setting its attribute."""

    def __init__(self, unet) -> None:
        self.unet = unet
        self.reset()

    def reset(self) -> None:
        self.delay_s = 0.0
        self.oom_above_rows: int | None = None
        self.nan = False
        self.hang: threading.Event | None = None  # while set and not released, every call blocks on it
        self.entered = threading.Event()  # set when a call blocks on ``hang``
        self.device_error = False
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.unet, name)

    def __call__(self, sample, *args, **kwargs):
        self.calls += 1
        if self.hang is not None:
            self.entered.set()
            self.hang.wait(timeout=30)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.device_error:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered (injected)")
        if self.oom_above_rows is not None and sample.shape[0] > self.oom_above_rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        output = self.unet(sample, *args, **kwargs)
        if self.nan:
            return (torch.full_like(output[0], float("nan")),)
        return output


def faulty_app(tiny_model_dir, *flags: str) -> tuple[TestClient, FaultyUNet, DiffusionModel]:
    settings = make_settings(
        tiny_model_dir,
        "--default_steps",
        "3",
        "--max_batch_size",
        "2",
        "--max_queue",
        "2",
        "--max_batch_instances",
        "2",
        "--request_timeout_s",
        str(REQUEST_TIMEOUT_S),
        "--max_body_bytes",
        "4096",
        "--max_image_bytes",
        "16384",
        *flags,
    )

    def loader(_settings):
        loaded = load_pipeline(str(tiny_model_dir), "not/used", None, "cpu")
        loaded.pipe.unet = FaultyUNet(loaded.pipe.unet)
        return loaded

    model = DiffusionModel(settings, pipeline_loader=loader)
    model.load()
    app = PredictorServer(settings, http_port=0, grpc_port=0, enable_grpc=False).create_app(model)
    return TestClient(app, raise_server_exceptions=False), model.loaded.pipe.unet, model


@pytest.fixture(scope="module")
def faulty(tiny_model_dir) -> Iterator[tuple[TestClient, FaultyUNet, DiffusionModel]]:
    client, unet, model = faulty_app(tiny_model_dir)
    with client:
        yield client, unet, model
    model.stop()


@pytest.fixture
def fault(faulty) -> Iterator[tuple[TestClient, FaultyUNet, DiffusionModel]]:
    client, unet, _ = faulty
    unet.reset()
    yield faulty
    unet.reset()
    # Whatever the fault did, the server still serves.
    response = client.post("/generate", json={"prompt": "after the fault", "seed": 1})
    assert response.status_code == 200, response.text


def assert_error(response, status: int, error_type: str) -> dict:
    assert response.status_code == status, response.content[:300]
    body = response.json()
    assert body["error_type"] == error_type
    assert "Traceback" not in body["error"]
    return body


def test_queue_full_is_503_overloaded_with_retry_after_at_once(fault, monkeypatch: pytest.MonkeyPatch) -> None:
    client, unet, model = fault
    unet.hang = threading.Event()  # the worker blocks inside the first UNet call until released
    slow = {"prompt": "slow", "num_inference_steps": 3}
    engine = model.generation_engine
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(client.post, "/generate", json=slow)
        wait_until(unet.entered.is_set)
        queued = [pool.submit(client.post, "/generate", json=slow) for _ in range(2)]
        wait_until(lambda: engine.queue_depth == 2)  # both waiting (max_queue 2)
        # Answered while the worker is still blocked: a refusal never waits for the queue.
        rejected = client.post("/generate", json=slow)
        streamed = client.post("/generate", json=slow, headers={"Accept": "text/event-stream"})
        # A request with input images is refused before they are decoded, as fast as a plain one.
        with monkeypatch.context() as spy:
            decoded: list[object] = []
            spy.setattr(images.Image, "open", lambda *args, **kwargs: decoded.append(args) or open_image(*args))
            big = encode_png(Image.new("RGB", (1024, 1024), (90, 120, 200)))
            heavy = client.post(
                "/generate", json={**slow, "image": big, "mask": encode_png(Image.new("L", (1024, 1024), 255))}
            )
        unet.hang.set()
        statuses = [f.result().status_code for f in [running, *queued]]
    assert_error(rejected, 503, "overloaded")
    assert rejected.headers["retry-after"] == "1"
    assert_error(streamed, 503, "overloaded")  # the event stream is refused up front, not inside a 200
    assert_error(heavy, 503, "overloaded")
    assert decoded == [], "the input images were decoded before the full queue refused the request"
    assert statuses == [200, 200, 200], "nothing admitted may be dropped"


def test_deadline_is_504_and_the_work_stops(fault) -> None:
    client, unet, model = fault
    unet.delay_s = 0.2  # 150 guided steps would take 30 s; the deadline comes first
    response = client.post("/generate", json={"prompt": "too slow", "num_inference_steps": 150})
    assert_error(response, 504, "timeout")
    assert unet.calls < 150, "answered at the deadline, not after the work"
    wait_until(lambda: model.generation_engine.active_images == 0)
    calls = unet.calls
    assert 'diffusion_active_images{model_name="sd"} 0.0' in client.get("/metrics").text
    unet.delay_s = 0.0
    assert client.post("/generate", json={"prompt": "next", "seed": 2}).status_code == 200
    assert unet.calls - calls <= 2 * 3 + 1, "the expired job took no further steps"


def test_hung_step_still_answers_504_and_health_stays_up(fault) -> None:
    """Generation runs on the engine's thread, never on the event loop: with the worker blocked inside a UNet
    call, liveness and readiness still answer, and the request gets its 504 at its deadline."""
    client, unet, _ = fault
    unet.hang = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, "/generate", json={"prompt": "hangs"})
        wait_until(unet.entered.is_set)
        assert client.get("/v2/health/live").status_code == 200
        assert client.get(f"/v1/models/{MODEL_NAME}").status_code == 200
        assert client.get("/livez").status_code == 200  # a step stuck for less than the stall limit
        response = pending.result(timeout=REQUEST_TIMEOUT_S + 30)
    unet.hang.set()
    assert_error(response, 504, "timeout")


def test_out_of_memory_alone_is_503_and_batches_are_split(fault) -> None:
    client, unet, _ = fault
    unet.oom_above_rows = 2  # one guided image (2 rows) fits, two do not
    response = client.post(f"/v1/models/{MODEL_NAME}:predict", json={"instances": [{"prompt": "a"}, {"prompt": "b"}]})
    assert response.status_code == 200, "a batch that does not fit is retried in halves"
    unet.oom_above_rows = 1  # not even one guided image
    body = assert_error(client.post("/generate", json={"prompt": "too big"}), 503, "out_of_memory")
    assert "does not fit" in body["error"]
    unguided = client.post("/generate", json={"prompt": "fits", "guidance_scale": 1.0})
    assert unguided.status_code == 200


def test_nan_output_is_reported_never_a_black_image(fault) -> None:
    client, unet, _ = fault
    unet.nan = True
    body = assert_error(client.post("/generate", json={"prompt": "nan"}), 500, "generation_failed")
    assert "NaN" in body["error"]
    v1 = client.post(f"/v1/models/{MODEL_NAME}:predict", json={"instances": [{"prompt": "nan"}]})
    assert_error(v1, 500, "generation_failed")


def test_flagged_image_is_marked_nsfw(fault, monkeypatch) -> None:
    client, _, model = fault
    served = model.loaded.pipe
    monkeypatch.setattr(served, "run_safety_checker", lambda images, device, dtype: (images * 0, [True] * len(images)))
    response = client.post("/generate", json={"prompt": "flagged", "seed": 3})
    assert response.status_code == 200
    assert response.headers["x-nsfw"] == "true"
    v1 = client.post(f"/v1/models/{MODEL_NAME}:predict", json={"instances": [{"prompt": "flagged"}]})
    assert v1.json()["predictions"][0]["nsfw"] is True


def test_body_over_limit_is_413_before_reading_it(fault) -> None:
    """Routes that take input images have their own, larger limit (--max_image_bytes); the others keep
    --max_body_bytes. Both are enforced before the body is read whole."""
    client, _, _ = fault
    big = {"prompt": "x" * 5000}
    openai = client.post("/v1/images/generations", json=big)  # OpenAI's error shape on its routes
    assert openai.status_code == 413 and openai.json()["error"]["code"] == "payload_too_large"
    huge = {"prompt": "x" * 20000}
    for route in ("/generate", f"/v1/models/{MODEL_NAME}:predict", f"/v2/models/{MODEL_NAME}/infer"):
        assert_error(client.post(route, json=huge), 413, "payload_too_large")

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(20):
            yield b" " * 1000

    for route in ("/generate", f"/v1/models/{MODEL_NAME}:predict", f"/v2/models/{MODEL_NAME}/infer"):
        assert_error(client.post(route, content=chunks()), 413, "payload_too_large")


def test_device_error_fails_liveness_so_the_pod_restarts(tiny_model_dir) -> None:
    client, unet, model = faulty_app(tiny_model_dir)
    with client:
        assert client.get("/livez").status_code == 200
        unet.device_error = True
        assert_error(client.post("/generate", json={"prompt": "boom"}), 500, "generation_failed")
        assert_error(client.get("/livez"), 503, "device_failed")
        assert_error(client.post("/generate", json={"prompt": "after"}), 503, "device_failed")
    model.stop()
