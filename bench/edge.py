"""The edge under abuse, this checkout beside another (``--against``, e.g. a worktree of an older commit), each a
real server process on builtin:tiny:

- memory: the server's RSS idle, and its peak while 32 clients each try to send a 20 MB header and then stall;
- slowloris: how long a client sending a header line every 0.1 s, never ending its head, keeps its connection
  (capped at ``--slowloris_cap_s``);
- shedding: with the queue full, how long a refusal takes for a prompt alone and for a request carrying eight
  large image and mask pairs (decoded before the refusal, or not).

    python bench/edge.py [--against ../older-checkout]

The timeouts are the defaults of each checkout (the older one may have none), so the slowloris figure is the
configured --header_timeout_s where there is one.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import socket
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

from predictor.testing import free_port, start_server, wait_ready, wait_until

HERE = Path(__file__).resolve().parents[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def huge_headers(port: int, pid: int, clients: int, header_mb: int) -> tuple[int, int]:
    """Idle RSS, and peak RSS while ``clients`` connections each send up to ``header_mb`` MB of one header and
    stall (holding their socket) until every one has sent all it could."""
    idle = rss_bytes(pid)
    done: list[int] = []
    release = threading.Event()

    def client() -> None:
        sent, chunk = 0, b"a" * (1024 * 1024)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(30)
            try:
                sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: ")
                while sent < header_mb * 1024 * 1024:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass
            done.append(sent)
            release.wait(120)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    peak = idle
    while len(done) < clients:
        peak = max(peak, rss_bytes(pid))
        time.sleep(0.02)
    for _ in range(25):  # what the server still holds half a second after the last client stalled
        peak = max(peak, rss_bytes(pid))
        time.sleep(0.02)
    release.set()
    for thread in threads:
        thread.join(timeout=30)
    return idle, peak


def slowloris_seconds(port: int, cap_s: float) -> float:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        try:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
            while time.monotonic() - started < cap_s:
                sock.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.1)
        except OSError:
            pass
    return time.monotonic() - started


def heavy_body(pairs: int, size: int) -> dict:
    """img2img-and-mask instances of flat pictures: a small body (PNG compresses them to little) whose images are
    each ``size`` squared pixels once decoded."""

    def png(mode: str, colour: int | tuple[int, int, int]) -> str:
        buffer = io.BytesIO()
        Image.new(mode, (size, size), colour).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    image, mask = png("RGB", (90, 120, 200)), png("L", 255)
    return {"instances": [{"prompt": "p", "image": image, "mask": mask} for _ in range(pairs)]}


def _post_quietly(url: str, body: dict) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server is killed under it at the end
        httpx.post(url, json=body, timeout=600)


def shedding(base: str, heavy: bytes) -> tuple[float, float]:
    """Seconds to refuse a prompt, and the heavy request, while the queue (--max_queue 8) is full."""
    slow = {"prompt": "blocker", "num_inference_steps": 150, "width": 256, "height": 256}
    blockers = [
        threading.Thread(
            target=httpx.post, args=(f"{base}/v1/models/sd:predict",), kwargs={"json": body, "timeout": 600}
        )
        for body in ({"instances": [slow] * 8}, {"instances": [slow]})
    ]
    blockers[0].start()  # one image runs, seven wait
    wait_until(lambda: _gauge(base, "diffusion_queue_depth") == 7, 60)
    blockers[1].start()
    wait_until(lambda: _gauge(base, "diffusion_queue_depth") == 8, 60)
    started = time.perf_counter()
    light = httpx.post(f"{base}/generate", json={"prompt": "light"}, timeout=300)
    light_s = time.perf_counter() - started
    started = time.perf_counter()
    refused = httpx.post(
        f"{base}/v1/models/sd:predict", content=heavy, headers={"content-type": "application/json"}, timeout=300
    )
    heavy_s = time.perf_counter() - started
    assert light.status_code == 503 and refused.status_code == 503, (light.text, refused.text[:200])
    return light_s, heavy_s


def _gauge(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def measure(tree: Path, args: argparse.Namespace, heavy: bytes, log: Path) -> dict[str, float]:
    port = free_port()
    flags = ("--model_dir", "/nonexistent", "--max_queue", "8", "--max_batch_size", "1", "--max_batch_instances", "8")
    flags += ("--max_image_bytes", str(64 * 1024 * 1024), "--max_image_size", "4096", "--warmup_steps", "0")
    process = start_server("--model_id", "builtin:tiny", *flags, port=port, log=log, cwd=tree)
    try:
        wait_ready(process, port, log)
        base = f"http://127.0.0.1:{port}"
        idle, peak = huge_headers(port, process.pid, args.clients, args.header_mb)
        slow = slowloris_seconds(port, args.slowloris_cap_s)
        light_s, heavy_s = shedding(base, heavy)
    finally:
        process.kill()  # the blockers would take minutes to finish
        process.wait()
    return {
        "idle_mb": idle / 2**20,
        "peak_mb": peak / 2**20,
        "slowloris_s": slow,
        "light_s": light_s,
        "heavy_s": heavy_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, help="another checkout to measure beside this one")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--header_mb", type=int, default=20)
    parser.add_argument("--slowloris_cap_s", type=float, default=60.0)
    parser.add_argument("--pairs", type=int, default=8, help="image and mask pairs in the heavy request")
    parser.add_argument("--image_size", type=int, default=4096)
    args = parser.parse_args()
    heavy = json.dumps(heavy_body(args.pairs, args.image_size)).encode()
    trees = {"this": HERE} | ({"against": args.against.resolve()} if args.against else {})
    results = {name: measure(tree, args, heavy, Path(f"/tmp/edge-{name}.log")) for name, tree in trees.items()}
    print(
        f"{args.clients} clients x {args.header_mb} MB headers; heavy request {len(heavy) / 2**20:.1f} MB "
        f"({args.pairs} pairs at {args.image_size} px)"
    )
    print(
        f"{'':10}{'idle MB':>10}{'peak MB':>10}{'rise MB':>10}{'slowloris s':>13}"
        f"{'refuse light s':>16}{'refuse heavy s':>16}"
    )
    for name, r in results.items():
        print(
            f"{name:10}{r['idle_mb']:10.0f}{r['peak_mb']:10.0f}{r['peak_mb'] - r['idle_mb']:10.0f}"
            f"{r['slowloris_s']:13.1f}{r['light_s']:16.3f}{r['heavy_s']:16.3f}"
        )


if __name__ == "__main__":
    main()
