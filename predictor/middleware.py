"""ASGI middleware for every route, KServe's included: a request body limit and cancel-on-disconnect.

Both wrap the ASGI ``receive`` channel, so they work the same for /generate, v1 and v2 without touching
KServe's handlers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from predictor.errors import PayloadTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _send_error(send: Send, status: int, message: str, error_type: str, openai_shape: bool) -> None:
    if openai_shape:  # the OpenAI-compatible route answers in OpenAI's error shape
        error = {"error": {"message": message, "type": "invalid_request_error", "param": "body", "code": error_type}}
    else:
        error = {"error": message, "error_type": error_type, "param": "body"}
    body = json.dumps(error).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Refuses bodies over ``max_body_bytes`` with 413 before reading them whole, and cancels the handler
    when the client disconnects after sending its request, so abandoned generations stop at the next step."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        too_large = f"the request body exceeds {limit} bytes (--max_body_bytes)"
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                openai_shape = scope.get("path", "").startswith("/v1/images/")
                await _send_error(send, 413, too_large, "payload_too_large", openai_shape)
                return

        body_done = asyncio.Event()
        disconnected = asyncio.Event()
        received = 0

        async def guarded_receive() -> Message:
            nonlocal received
            if body_done.is_set():
                # The app listens for a disconnect (streaming responses do): hand over the watcher's news.
                await disconnected.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(too_large, param="body")  # answered 413 by the app's handler
                if not message.get("more_body", False):
                    body_done.set()
            elif message["type"] == "http.disconnect":
                disconnected.set()
            return message

        app_task = asyncio.ensure_future(self.app(scope, guarded_receive, send))

        async def watch_for_disconnect() -> None:
            await body_done.wait()
            message = await receive()  # the next message after a complete body can only be a disconnect
            if message["type"] == "http.disconnect":
                disconnected.set()
                if not app_task.done():
                    app_task.cancel()

        watcher = asyncio.ensure_future(watch_for_disconnect())
        try:
            await app_task
        except asyncio.CancelledError:
            if not disconnected.is_set():
                raise  # cancelled from outside (shutdown), not by the client going away
        finally:
            watcher.cancel()
