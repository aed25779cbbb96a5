"""ASGI middleware for every route, KServe's included: API keys, a request body limit and cancel-on-disconnect.

They work on the ASGI scope and ``receive`` channel, so they apply the same to /generate, v1 and v2 without
touching KServe's handlers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from predictor.errors import PayloadTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _send_error(
    send: Send,
    status: int,
    message: str,
    error_type: str,
    openai_shape: bool,
    param: str | None = "body",
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    if openai_shape:  # the OpenAI-compatible route answers in OpenAI's error shape
        error = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": error_type}}
    else:
        error = {"error": message, "error_type": error_type, "param": param}
    body = json.dumps(error).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _is_openai_route(scope: Scope) -> bool:
    return scope.get("path", "").startswith("/v1/images/")


class ApiKeyGuard:
    """Every request that is not a read (every POST: the generation routes) needs ``Authorization: Bearer KEY``
    with one of ``keys``; health, readiness, metrics, discovery and the playground page are GETs and stay open.
    Keys are compared in constant time, each one, so timing tells nothing about which part of a key matched."""

    OPEN_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self._keys = tuple(key.encode() for key in keys)

    def _authorized(self, scope: Scope) -> bool:
        header = next((value for name, value in scope.get("headers", []) if name == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(token, key)
        return scheme.lower() == b"bearer" and matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in self.OPEN_METHODS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await _send_error(
            send,
            401,
            "a valid API key is required: send 'Authorization: Bearer <key>'",
            "invalid_api_key",
            _is_openai_route(scope),
            param=None,
            headers=((b"www-authenticate", b"Bearer"),),
        )


# The routes whose bodies may carry input images (img2img, inpainting, OpenAI edits): they get --max_image_bytes.
_IMAGE_ROUTE = re.compile(
    r"^/(generate|v1/models/[^/]+:predict|v2/models/[^/]+(/versions/[^/]+)?/infer|v1/images/edits)$"
)


class RequestGuard:
    """Refuses bodies over ``max_body_bytes`` (``max_image_bytes`` on the routes that take input images) with 413
    before reading them whole, and cancels the handler when the client disconnects after sending its request, so
    abandoned generations stop at the next step."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_image_bytes: int | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_image_bytes = max_image_bytes if max_image_bytes is not None else max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _IMAGE_ROUTE.match(scope.get("path", "")):
            limit, flag = self.max_image_bytes, "--max_image_bytes"
        else:
            limit, flag = self.max_body_bytes, "--max_body_bytes"
        too_large = f"the request body exceeds {limit} bytes ({flag})"
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _send_error(send, 413, too_large, "payload_too_large", _is_openai_route(scope))
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
