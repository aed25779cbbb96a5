"""Real processes: `python -m predictor` on a loopback port, as a user starts it."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from predictor.testing import free_port, metric, start_server, stop_server, wait_ready, wait_until

pytestmark = pytest.mark.slow
NO_MODEL_DIR = ("--model_dir", "/nonexistent")


# Fault injection for a long start: the server's loader waits for a file the test creates, so the test sees the
# process between "listening" and "ready" for as long as it needs, with no timing assumption.
_HOLD_HOOK = """
import importlib, os, time

module_name, attribute = os.environ["PREDICTOR_TEST_HOLD"].rsplit(".", 1)
owner_name, _, method = attribute.partition(":")
module = importlib.import_module(module_name)
owner = getattr(module, owner_name) if method else module
name = method or owner_name
original = getattr(owner, name)


def held(*args, **kwargs):
    while not os.path.exists(os.environ["PREDICTOR_TEST_RELEASE"]):
        time.sleep(0.02)
    return original(*args, **kwargs)


setattr(owner, name, held)
"""


def start_held_server(
    tmp_path: Path, port: int, *flags: str, hold: str = "predictor.loading.load_pipeline"
) -> tuple[subprocess.Popen, Path, Path]:
    """A server whose ``hold`` (``module.function`` or ``module.Class:method``) waits until the returned release
    file exists; returned once /livez answers."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOLD_HOOK)
    release, log = tmp_path / "release", tmp_path / "server.log"
    env = {"PYTHONPATH": str(hook), "PREDICTOR_TEST_HOLD": hold, "PREDICTOR_TEST_RELEASE": str(release)}
    process = start_server("--model_id", "builtin:tiny", *NO_MODEL_DIR, *flags, port=port, log=log, env=env)
    base = f"http://127.0.0.1:{port}"

    def live() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{base}/livez", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(live, timeout_s=120, interval_s=0.05)
    return process, release, log


def test_listener_is_live_but_not_ready_while_the_model_loads(tmp_path: Path) -> None:
    """Liveness answers from the start, so a long load or compile never restarts the pod; readiness and every
    generation route say 503 model_not_ready until the model is loaded and warmed up."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process, release, log = start_held_server(tmp_path, port)
    try:
        assert httpx.get(f"{base}/metrics", timeout=5).status_code == 200
        readiness = ("/v1/models/sd", "/v2/models/sd/ready", "/v2/health/ready")
        for path in readiness:
            response = httpx.get(f"{base}{path}", timeout=5)
            assert response.status_code == 503, (path, response.text)
        requests = [
            ("/generate", {"prompt": "too early"}),
            ("/v1/models/sd:predict", {"instances": [{"prompt": "too early"}]}),
            ("/v2/models/sd/infer", {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}),
        ]
        for path, body in requests:
            response = httpx.post(f"{base}{path}", json=body, timeout=5)
            assert response.status_code == 503, (path, response.text)
            assert response.json()["error_type"] == "model_not_ready", (path, response.text)
        openai = httpx.post(f"{base}/v1/images/generations", json={"prompt": "too early"}, timeout=5)
        assert openai.status_code == 503 and openai.json()["error"]["code"] == "model_not_ready"
        release.touch()
        wait_ready(process, port, log)
        for path in readiness:
            assert httpx.get(f"{base}{path}", timeout=5).status_code == 200, path
        assert httpx.post(f"{base}/generate", json={"prompt": "now", "seed": 1}, timeout=60).status_code == 200
    finally:
        release.touch()
        assert stop_server(process) == 0
    assert log.read_text().count("loaded builtin:tiny") == 1, "the requests before ready did not load it again"


@pytest.mark.parametrize(
    "hold",
    ["predictor.loading.load_pipeline", "predictor.runner.DiffusionRunner:predict_noise"],
    ids=["loading-weights", "warming-up"],
)
def test_sigterm_while_loading_exits_cleanly(tmp_path: Path, hold: str) -> None:
    """Stopping a pod that is still loading is a normal stop (exit 0), not a failed load, whatever phase it is in."""
    process, _, log = start_held_server(tmp_path, free_port(), "--grace_period_s", "1", hold=hold)
    assert stop_server(process) == 0
    output = log.read_text()
    assert "Traceback" not in output and "failed to load" not in output


# Fault injection for work longer than the grace period: each denoiser call first sleeps this long (a slow GPU), or,
# set very long, never returns (a hung one).
_STEP_DELAY_HOOK = """
import os, time

from predictor.logs import install_log_filters

install_log_filters()  # as the server's main() does first: importing the runner imports transformers
import predictor.runner

delay = float(os.environ["PREDICTOR_TEST_STEP_DELAY"])
gate = os.environ.get("PREDICTOR_TEST_GATE")  # a file: the job prompted "gated" takes its last step once it exists
original = predictor.runner.DiffusionRunner.predict_noise


def slowed(self, jobs):
    gated = [job for job in jobs if job.params.prompt == "gated"]
    if not gated:
        time.sleep(delay)
    elif gated[0].steps_done == gated[0].params.num_inference_steps - 1:
        open(gate + ".waiting", "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
    return original(self, jobs)


predictor.runner.DiffusionRunner.predict_noise = slowed
"""

# One of each wire format in flight: (name, path, body, streamed).
_IN_FLIGHT = (
    ("generate", "/generate", {"prompt": "a", "num_inference_steps": 100}, False),
    ("v1", "/v1/models/sd:predict", {"instances": [{"prompt": "a", "num_inference_steps": 100}]}, False),
    ("openai", "/v1/images/generations", {"prompt": "a", "num_inference_steps": 100}, False),
    ("stream", "/generate", {"prompt": "a", "num_inference_steps": 100}, True),
)


def _start_slowed_server(tmp_path: Path, delay_s: float, grace_s: int) -> tuple[subprocess.Popen, str, Path]:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_STEP_DELAY_HOOK)
    port, log = free_port(), tmp_path / "server.log"
    env = {
        "PYTHONPATH": str(hook),
        "PREDICTOR_TEST_STEP_DELAY": str(delay_s),
        "PREDICTOR_TEST_GATE": str(hook / "gate"),
    }
    flags = ("--grace_period_s", str(grace_s), "--warmup_steps", "0")
    process = start_server("--model_id", "builtin:tiny", *NO_MODEL_DIR, *flags, port=port, log=log, env=env)
    wait_ready(process, port, log)
    return process, f"http://127.0.0.1:{port}", log


def _send_in_flight(base: str) -> tuple[dict[str, object], list[threading.Thread]]:
    """The requests of ``_IN_FLIGHT``, each on its own thread; returns once the engine holds all four (running, or
    queued behind a step that hangs)."""
    answers: dict[str, object] = {}

    def send(name: str, path: str, body: dict, streamed: bool) -> None:
        try:
            if streamed:
                headers = {"accept": "text/event-stream"}
                with httpx.stream("POST", base + path, json=body, headers=headers, timeout=120) as response:
                    answers[name] = response.read().decode()
            else:
                answers[name] = httpx.post(base + path, json=body, timeout=120)
        except httpx.HTTPError as exc:  # a cut connection is what the test must not see
            answers[name] = exc

    threads = [threading.Thread(target=send, args=request) for request in _IN_FLIGHT]
    for thread in threads:
        thread.start()

    def held() -> float:
        return metric(base, "diffusion_active_images") + metric(base, "diffusion_queue_depth")

    wait_until(lambda: held() == len(_IN_FLIGHT), timeout_s=60)
    return answers, threads


def _assert_answered_shutting_down(answers: dict[str, object]) -> None:
    for name in ("generate", "v1"):
        response = answers[name]
        assert isinstance(response, httpx.Response), f"{name}: {response!r}"
        assert response.status_code == 503 and response.json()["error_type"] == "shutting_down", name
    response = answers["openai"]
    assert isinstance(response, httpx.Response), f"openai: {response!r}"
    assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    stream = answers["stream"]
    assert isinstance(stream, str), f"stream: {stream!r}"
    assert stream.startswith("event: queued")  # the stream had begun: the error is one of its events
    last_event = stream.strip().split("\n\n")[-1]
    assert last_event.startswith("event: error") and '"error_type": "shutting_down"' in last_event


def test_builtin_tiny_serves_then_sigterm_finishes_what_fits_the_grace_period_and_answers_the_rest_503(
    tmp_path: Path,
) -> None:
    """builtin:tiny as a user starts it. On SIGTERM a request that finishes within --grace_period_s is served;
    past it every other request in flight gets 503 shutting_down in its route's error shape, a stream its error
    event, a new request on a kept-alive connection 503 too; the process exits 0 a few seconds later. The request
    that finishes is held before its last step until the signal is sent (a gate, not a race with the clock); the
    others are slowed to 20 s."""
    grace_s = 3
    process, base, log = _start_slowed_server(tmp_path, delay_s=0.2, grace_s=grace_s)  # 100 steps: 20 s each
    gate = tmp_path / "hook" / "gate"
    try:
        response = httpx.post(f"{base}/generate", json={"prompt": "a kite", "seed": 4, "num_inference_steps": 2})
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert response.headers["x-seed"] == "4"
        refused = httpx.post(f"{base}/generate", json={"prompt": "   "})
        assert refused.status_code == 400

        answers, threads = _send_in_flight(base)
        short: dict[str, httpx.Response] = {}
        body = {"prompt": "gated", "num_inference_steps": 4}
        thread = threading.Thread(target=lambda: short.update(r=httpx.post(f"{base}/generate", json=body, timeout=60)))
        thread.start()
        wait_until(lambda: gate.with_suffix(".waiting").exists(), timeout_s=30)  # at its last step, held
        with httpx.Client(base_url=base, timeout=30) as kept_alive:  # a connection that outlives the signal
            assert kept_alive.get("/livez").status_code == 200
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            late = kept_alive.post("/generate", json={"prompt": "late"})
            gate.touch()  # signalled: its last step may run, well within the grace period
        assert late.status_code == 503 and late.json()["error_type"] == "shutting_down"
        for waiting in [thread, *threads]:
            waiting.join(timeout=60)
        assert short["r"].status_code == 200
        _assert_answered_shutting_down(answers)
        assert process.wait(timeout=60) == 0
        # Generous for a loaded machine, far below the 2.6x the grace period the drain once took with a stream open.
        assert time.monotonic() - signalled < grace_s + 8
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/v1/models/sd", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert "Traceback" not in output and "Internal Server Error" not in output
    assert "RANDOM weights" in output, "a builtin must say it produces noise"
    # What a new user reads at start and per request: no warnings about what this server does not use, no
    # "not registered" for a route it does serve, one line per request.
    for noise in ("torchvision", "endpoints not registered", "kserve.trace", "ORJSONResponse"):
        assert noise not in output, f"start-up or request noise: {noise!r}"
    # A refusal's reason is in the log, one line, beside the access line.
    assert "POST /generate refused 400 invalid_input: 'prompt' must contain a non-whitespace character" in output
    assert "POST /v1/images/generations" in output, "the log says which routes are served"
    assert output.count('"POST /generate HTTP/1.1" 200') == 3  # the kite, the short one and the stream


def test_a_second_sigterm_answers_everything_and_exits_at_once(tmp_path: Path) -> None:
    """With a long grace period and a worker stuck inside a step, a second SIGTERM still answers every request
    (503 shutting_down, a stream its error event) and the process exits within seconds."""
    process, base, log = _start_slowed_server(tmp_path, delay_s=3600, grace_s=300)  # the first step hangs
    try:
        answers, threads = _send_in_flight(base)
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: "finishing in-flight requests" in log.read_text(), timeout_s=30)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=60)
        _assert_answered_shutting_down(answers)
        process.wait(timeout=60)
        assert time.monotonic() - signalled < 8  # not the 300 s grace period
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in log.read_text()


def test_a_load_over_its_time_limit_fails_liveness(tmp_path: Path) -> None:
    """A hung download or compile must not leave a pod live and never ready: after --load_timeout_s, /livez is 503
    and Kubernetes restarts it."""
    port = free_port()
    process, release, _ = start_held_server(tmp_path, port, "--load_timeout_s", "1")
    try:

        def liveness_failed() -> dict | None:
            response = httpx.get(f"http://127.0.0.1:{port}/livez", timeout=5)
            return response.json() if response.status_code == 503 else None

        error = wait_until(liveness_failed, timeout_s=60, interval_s=0.1)
        assert error["error_type"] == "load_timeout" and "--load_timeout_s 1" in error["error"]
    finally:
        release.touch()
        stop_server(process)


def test_grpc_can_be_enabled(tmp_path: Path) -> None:
    port, grpc_port = free_port(), free_port()
    log = tmp_path / "server.log"
    flags = ("--enable_grpc", "true", "--grpc_port", str(grpc_port))
    process = start_server("--model_id", "builtin:tiny", *NO_MODEL_DIR, *flags, port=port, log=log)
    try:
        wait_ready(process, port, log)
        with socket.create_connection(("127.0.0.1", grpc_port), timeout=5):
            pass
    finally:
        assert stop_server(process) == 0


def test_load_failure_exits_non_zero_with_clear_message(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    log = tmp_path / "server.log"
    process = start_server("--model_id", str(missing), "--model_dir", str(tmp_path), port=free_port(), log=log)
    assert process.wait(timeout=120) == 1
    output = log.read_text()
    assert "failed to load model 'sd'" in output
    assert str(missing) in output
    assert "Traceback" not in output


def test_unsupported_pipeline_class_exits_non_zero_naming_it_and_the_families(tmp_path: Path) -> None:
    """Refused from model_index.json alone, before any weight is read (this directory has none)."""
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyV22Pipeline"}')
    log = tmp_path / "server.log"
    process = start_server("--model_dir", str(tmp_path), port=free_port(), log=log)
    assert process.wait(timeout=120) == 1
    output = log.read_text()
    assert "holds a KandinskyV22Pipeline, which this server does not serve" in output
    assert "StableDiffusionPipeline" in output and "StableDiffusionXLPipeline" in output
    assert "Traceback" not in output


def test_bad_flag_values_are_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "predictor", "--model_id", "builtin:tiny", "--default_steps", "200"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--default_steps must not exceed --max_steps" in result.stderr


@pytest.mark.timeout(900)  # two real inductor compiles on 2 CPU cores: about 100 s here, more on a cold machine
def test_compile_cache_lets_a_restarted_server_skip_compiling(tmp_path: Path) -> None:
    """--compile with --compile_cache_dir, real inductor on the CPU: the first server compiles (cache misses); a
    restart on the same directory finds every compiled graph there (hits, no misses) and makes the same image. On
    the tiny FLUX.2-klein, whose two small graphs compile in about two thirds of the tiny SD UNet's time."""
    cache = tmp_path / "compile-cache"
    images, counts = [], []
    for attempt in range(2):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = tmp_path / f"server-{attempt}.log"
        flags = ("--compile", "--compile_cache_dir", str(cache), "--max_batch_size", "1", "--warmup_steps", "1")
        process = start_server("--model_id", "builtin:tiny-flux2-klein", *NO_MODEL_DIR, *flags, port=port, log=log)
        try:
            wait_ready(process, port, log, timeout_s=900)
            body = {"prompt": "a fox in the snow", "seed": 3, "num_inference_steps": 3}
            response = httpx.post(f"{base}/generate", json=body, timeout=120)
            assert response.status_code == 200, response.text
            images.append(response.content)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        found = re.search(r"compile cache: (\d+) hits, (\d+) misses", log.read_text())
        assert found, log.read_text()[-3000:]
        counts.append(tuple(map(int, found.groups())))
    (_, first_misses), (second_hits, second_misses) = counts
    assert first_misses > 0 and any(cache.iterdir())
    assert second_hits > 0 and second_misses == 0, counts
    assert images[0] == images[1]
