"""Real server processes under load: hundreds of requests, exact queue-full behaviour, memory, disconnects."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from pathlib import Path

import httpx
import pytest

from predictor.testing import free_port, metric, start_server, stop_server, wait_ready, wait_until

pytestmark = pytest.mark.slow


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def fire(base: str, bodies: list[dict], concurrency: int) -> list[int]:
    statuses: list[int] = []
    pending = list(bodies)

    async def worker(client: httpx.AsyncClient) -> None:
        while pending:
            body = pending.pop()
            statuses.append((await client.post("/generate", json=body)).status_code)

    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return statuses


@pytest.fixture
def server(tmp_path: Path, request):
    processes = []

    def start(*flags: str) -> tuple[str, int]:
        port = free_port()
        log = tmp_path / f"server-{port}.log"
        process = start_server("--model_id", "builtin:tiny", "--model_dir", "/nonexistent", *flags, port=port, log=log)
        processes.append(process)
        wait_ready(process, port, log)
        return f"http://127.0.0.1:{port}", process.pid

    yield start
    for process in processes:
        assert stop_server(process) == 0


def test_500_requests_at_concurrency_12_no_surprises_no_leak(server) -> None:
    base, pid = server("--max_batch_size", "8", "--max_queue", "32", "--default_steps", "2")
    bodies = [{"prompt": f"load test {i}", "seed": i} for i in range(600)]
    warmup = asyncio.run(fire(base, bodies[:100], 12))
    rss_after_warmup = rss_bytes(pid)
    statuses = asyncio.run(fire(base, bodies[100:], 12))
    growth = rss_bytes(pid) - rss_after_warmup
    assert Counter(warmup + statuses) == {200: 600}
    assert growth < 50 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 500 requests"
    assert metric(base, "diffusion_images_total") == 600, "every image counted once; the warm-up not at all"
    # With 12 concurrent clients the engine batched: mean images per UNet call well above one.
    calls = metric(base, "diffusion_batch_size_count")
    images = metric(base, "diffusion_batch_size_sum")
    assert images / calls > 2, f"mean batch {images / calls:.2f}"


def test_queue_full_admits_exactly_the_limit(server) -> None:
    base, _ = server("--max_batch_size", "2", "--max_queue", "4", "--max_batch_instances", "2")
    long = {"prompt": "long", "num_inference_steps": 60}

    async def scenario() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            running = [asyncio.ensure_future(client.post("/generate", json=long)) for _ in range(2)]
            while metric(base, "diffusion_active_images") < 2:  # both in the batch (bounded by the test timeout)
                await asyncio.sleep(0.02)
            burst = await asyncio.gather(
                *(client.post("/generate", json={**long, "num_inference_steps": 5}) for _ in range(8)),
            )
            first = await asyncio.gather(*running)
            return [r.status_code for r in first], [r.status_code for r in burst]

    running, burst = asyncio.run(scenario())
    assert running == [200, 200]
    assert Counter(burst) == {200: 4, 503: 4}, burst


def test_client_disconnect_stops_the_work(server) -> None:
    base, _ = server("--max_batch_size", "4", "--max_steps", "500")
    port = int(base.rsplit(":", 1)[1])
    body = b'{"prompt": "abandoned", "num_inference_steps": 500, "width": 256, "height": 256}'
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: metric(base, "diffusion_active_images") == 1, timeout_s=30)
        steps_before = metric(base, "diffusion_step_seconds_count")
    wait_until(lambda: metric(base, "diffusion_active_images") == 0, timeout_s=60)
    assert metric(base, "diffusion_failures_total", error_type="cancelled") == 1
    steps_run = metric(base, "diffusion_step_seconds_count") - steps_before
    assert steps_run < 500, "the abandoned generation ran to the end"


def _reachable_by_others(path: Path) -> bool:
    return all(parent.stat().st_mode & 0o001 for parent in [path, *path.parents] if parent.is_dir())


def _interpreter_for_others() -> tuple[str, list[str]]:
    """A Python of this version that any user can run, and the path to this project's packages for it.

    The test's own interpreter may live where other users cannot go (pyenv under /root, say); the system's
    Python of the same version then runs the very same packages.
    """
    import site
    import sys

    project = Path(__file__).resolve().parents[1]
    packages = [Path(p) for p in site.getsitepackages()] + [project]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (Path(sys.executable), Path(f"/usr/bin/python{version}")):
        if candidate.exists() and _reachable_by_others(candidate.resolve()):
            break
    else:
        pytest.skip(f"no Python {version} that other users can run")
    if not all(_reachable_by_others(path) for path in packages):
        pytest.skip("this project's packages are in a directory other users cannot enter")
    return str(candidate), [str(path) for path in packages]


def test_serves_as_non_root_with_read_only_model_dir(tmp_path: Path, tiny_model_dir: Path) -> None:
    """An arbitrary non-root UID, a read-only model directory, HF_HOME under /tmp, HOME unwritable: it serves."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("needs root to switch to another UID")
    interpreter, pythonpath = _interpreter_for_others()
    model_dir = Path("/tmp") / f"ro-model-{os.getpid()}"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(tiny_model_dir, model_dir)
    for path in [model_dir, *model_dir.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)  # readable by anyone, writable by no one
    log_dir = Path("/tmp") / f"non-root-log-{os.getpid()}"
    log_dir.mkdir(exist_ok=True)
    log = log_dir / "server.log"
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "HF_HOME": f"/tmp/hf-{os.getpid()}",
        "HOME": "/nonexistent",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": os.pathsep.join(pythonpath),
    }
    command = [
        interpreter,
        "-m",
        "predictor",
        "--model_name",
        "sd",
        "--http_port",
        str(port),
        "--model_dir",
        str(model_dir),
        "--model_id",
        "not/used",
    ]
    with log.open("w") as output:
        process = subprocess.Popen(
            command, user=54321, group=54321, env=env, cwd="/", stdout=output, stderr=subprocess.STDOUT
        )
    try:
        wait_ready(process, port, log)
        response = httpx.post(f"http://127.0.0.1:{port}/generate", json={"prompt": "as nobody"}, timeout=60)
        assert response.status_code == 200
        assert response.content.startswith(b"\x89PNG")
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0
        for path in [model_dir, *model_dir.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(log_dir, ignore_errors=True)
