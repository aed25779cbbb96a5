"""ASGI middleware for every route, KServe's included: API keys, a request body limit and cancel-on-disconnect.

They work on the ASGI scope and ``receive`` channel, so they apply the same to /generate, v1 and v2 without
touching KServe's handlers. What differs by route (the body limit, the error shape) is what each wire format
declares for its routes (``server.ROUTES``), looked up by path before routing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from predictor.errors import PayloadTooLarge, PredictorError, Unauthorized
from predictor.protocols.base import RouteTable

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger(__name__)


async def _send_error(send: Send, scope: Scope, routes: RouteTable, exc: PredictorError) -> None:
    """``exc`` answered in the error shape of the route asked for."""
    body = json.dumps(routes.error_body(scope.get("path", ""), exc)).encode()
    headers = [(name.lower().encode(), value.encode()) for name, value in exc.headers.items()]
    await send(
        {
            "type": "http.response.start",
            "status": exc.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ApiKeyGuard:
    """Every request that is not a read (every POST: the generation routes) needs ``Authorization: Bearer KEY``
    with one of ``keys``; health, readiness, metrics, the model's description and the playground page are GETs and
    stay open. The LoRA listing is a read that needs the key too: it names the files in --lora_dir and why any was
    refused, which is the operator's business, and only a client that may generate can use an adapter anyway.
    Keys are compared in constant time, each one, so timing tells nothing about which part of a key matched."""

    OPEN_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
    KEYED_READS = re.compile(r"/v1/models/[^/]+/loras/?")

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], routes: RouteTable) -> None:
        self.app = app
        self._keys = tuple(key.encode() for key in keys)
        self._routes = routes

    def _authorized(self, scope: Scope) -> bool:
        header = next((value for name, value in scope.get("headers", []) if name == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(token, key)
        return scheme.lower() == b"bearer" and matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        open_read = scope.get("method") in self.OPEN_METHODS and not self.KEYED_READS.fullmatch(scope.get("path", ""))
        if scope["type"] != "http" or open_read or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        unauthorized = Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'")
        await _send_error(send, scope, self._routes, unauthorized)


class RequestGuard:
    """Refuses bodies over ``max_body_bytes`` (``max_image_bytes`` on the routes whose wire format takes input
    images: img2img, inpainting, OpenAI edits) with 413 before reading them whole, and cancels the handler when
    the client disconnects after sending its request, so abandoned generations stop at the next step."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, routes: RouteTable, max_image_bytes: int | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_image_bytes = max_image_bytes if max_image_bytes is not None else max_body_bytes
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._routes.takes_images(scope.get("path", "")):
            limit, flag = self.max_image_bytes, "--max_image_bytes"
        else:
            limit, flag = self.max_body_bytes, "--max_body_bytes"
        too_large = f"the request body exceeds {limit} bytes ({flag})"
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _send_error(send, scope, self._routes, PayloadTooLarge(too_large, param="body"))
                return

        body_done = asyncio.Event()
        disconnected = asyncio.Event()
        upload_dropped = asyncio.Event()  # the client went away before its body was whole
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
                upload_dropped.set()
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
        except Exception:
            if not upload_dropped.is_set():
                raise
            # Whatever the route made of the missing body (Starlette's ClientDisconnect): nobody is left to answer.
            client = scope.get("client") or ("a client", 0)
            logger.info(
                "%s:%s went away during its upload to %s (%d bytes received): request dropped",
                *client[:2],
                scope.get("path", ""),
                received,
            )
        finally:
            watcher.cancel()
