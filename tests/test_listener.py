"""The listener's own limits, on a real server process over loopback sockets: header size, header and body
timeouts, the connection cap, clients that vanish mid-upload. The server runs with one-second timeouts, so
each test waits at most a few seconds, by polling."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from predictor.testing import free_port, start_server, stop_server, wait_ready, wait_until

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 40
MAX_HEADER_BYTES = 64 * 1024  # the default
# A timeout is met when the connection is closed within it plus this much (a loaded 2-core machine).
SLACK_S = 4.0


class Server:
    def __init__(self, process: subprocess.Popen, port: int, log: Path) -> None:
        self.process, self.port, self.log = process, port, log
        self.base = f"http://127.0.0.1:{port}"

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.settimeout(30)
        return sock

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port, log = free_port(), tmp_path_factory.mktemp("listener") / "server.log"
    flags = (
        *("--header_timeout_s", str(HEADER_TIMEOUT_S), "--body_timeout_s", str(BODY_TIMEOUT_S)),
        *("--max_connections", str(MAX_CONNECTIONS), "--warmup_steps", "0"),
    )
    process = start_server("--model_id", "builtin:tiny", "--model_dir", "/nonexistent", *flags, port=port, log=log)
    wait_ready(process, port, log)
    yield Server(process, port, log)
    stop_server(process)


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset ends it too)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def closed_within(sock: socket.socket, timeout_s: float) -> tuple[bytes, float]:
    """What the server sent before closing, and how long after this call it closed."""
    started = time.monotonic()
    sock.settimeout(timeout_s)
    data = read_response(sock)
    return data, time.monotonic() - started


def test_headers_over_the_limit_get_431_and_the_connection_closes(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 1000) + b"\r\n\r\n")
        response = read_response(sock)
    assert response.startswith(b"HTTP/1.1 431 ")
    assert b'"error_type": "headers_too_large"' in response and b"--max_header_bytes" in response
    with server.connect() as sock:  # just under the limit is served
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES - 200) + b"\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")


def test_stalled_clients_with_huge_headers_hold_no_memory(server: Server) -> None:
    """32 connections that each try to send 20 MB of headers and then stall: the server's memory stays within
    100 MB of idle, every one is refused, and the server keeps answering others."""
    idle = server.rss_bytes()
    sent: list[int] = []
    release = threading.Event()

    def attacker() -> None:
        total, chunk = 0, b"a" * (1024 * 1024)
        with server.connect() as sock:
            sock.settimeout(10)
            try:
                sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: ")
                while total < 20 * 1024 * 1024:
                    sock.sendall(chunk)
                    total += len(chunk)
            except OSError:  # refused and closed by the server
                pass
            sent.append(total)
            release.wait(60)  # stall, holding the socket open

    threads = [threading.Thread(target=attacker) for _ in range(32)]
    for thread in threads:
        thread.start()
    peak = idle
    try:
        while len(sent) < len(threads):
            peak = max(peak, server.rss_bytes())
            time.sleep(0.02)
        assert httpx.get(f"{server.base}/livez", timeout=10).status_code == 200
        peak = max(peak, server.rss_bytes())
    finally:
        release.set()
        for thread in threads:
            thread.join(timeout=60)
    assert peak - idle < 100 * 1024 * 1024, f"RSS rose {(peak - idle) / 2**20:.0f} MiB over idle"
    assert max(sent) < 20 * 1024 * 1024, "some connection was allowed to send its whole 20 MB header"


def test_a_slowloris_client_is_dropped_while_others_are_served(server: Server) -> None:
    stop = threading.Event()
    dropped_after: list[float] = []

    def slowloris() -> None:
        with server.connect() as sock:
            started = time.monotonic()
            try:
                sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
                while not stop.wait(0.1):  # a header line every tenth of a second, never the end of the head
                    sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                pass
            dropped_after.append(time.monotonic() - started)

    thread = threading.Thread(target=slowloris)
    thread.start()
    try:
        served = 0
        while thread.is_alive() and served < 200:
            assert httpx.get(f"{server.base}/livez", timeout=10).status_code == 200
            served += 1
        thread.join(timeout=HEADER_TIMEOUT_S + 30)
    finally:
        stop.set()
        thread.join()
    assert served > 0
    assert dropped_after and dropped_after[0] < HEADER_TIMEOUT_S + SLACK_S


def test_a_connection_that_sends_nothing_gets_408(server: Server) -> None:
    with server.connect() as sock:
        response, waited = closed_within(sock, HEADER_TIMEOUT_S + SLACK_S + 5)
    assert response.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in response
    assert waited < HEADER_TIMEOUT_S + SLACK_S


def test_a_kept_alive_connection_slow_with_its_next_request_gets_408(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b'{"live":true}'):  # the whole first response, however it is split
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        response, waited = closed_within(sock, HEADER_TIMEOUT_S + SLACK_S + 5)
    assert response.startswith(b"HTTP/1.1 408 ")
    assert waited < HEADER_TIMEOUT_S + SLACK_S


def test_a_stalled_body_gets_408_and_one_log_line(server: Server) -> None:
    with server.connect() as sock:
        head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        sock.sendall(head + b'{"prompt": "a')
        response, waited = closed_within(sock, BODY_TIMEOUT_S + SLACK_S + 5)
    assert response.startswith(b"HTTP/1.1 408 ") and b"the request body stalled" in response
    assert waited < BODY_TIMEOUT_S + SLACK_S
    wait_until(lambda: "went away during its upload to /generate" in server.log_text(), timeout_s=10)
    assert "Traceback" not in server.log_text() and " ERROR " not in server.log_text()


def test_a_client_dropping_its_upload_is_one_info_line(server: Server) -> None:
    with server.connect() as sock:
        head = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(head + b"Content-Length: 5000\r\n\r\n" + b'{"prompt": "' + b"a" * 1000)
    line = wait_until(
        lambda: next((ln for ln in server.log_text().splitlines() if "upload to /v1/images/generations" in ln), None),
        timeout_s=10,
    )
    assert " INFO " in line and "request dropped" in line
    assert "Traceback" not in server.log_text() and " ERROR " not in server.log_text()


def test_connections_past_the_cap_get_503(server: Server) -> None:
    kept: list[httpx.Client] = []
    try:
        for _ in range(MAX_CONNECTIONS):  # each holds one kept-alive connection
            client = httpx.Client(base_url=server.base, timeout=10)
            assert client.get("/livez").status_code == 200
            kept.append(client)
        with server.connect() as sock:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 503 ")
    finally:
        for client in kept:
            client.close()
    # Closed connections free their places.
    wait_until(lambda: httpx.get(f"{server.base}/livez", timeout=10).status_code == 200, timeout_s=10)
