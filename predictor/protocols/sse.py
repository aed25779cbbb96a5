"""The one Server-Sent Events writer, for /generate's stream and OpenAI's (``stream: true``).

A route validates and queues first, so bad input (400) and a full queue (503) are plain responses, not streams;
then it streams. The engine reports progress from its worker thread; ``Progress`` carries the reports a format
keeps onto the event loop, and ``write_events`` sends them as they come, a comment line while nothing is due,
and the result (or the error) last. When the client goes away the response stops iterating and the images are
cancelled at their next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import numpy as np
from fastapi.responses import StreamingResponse
from PIL import Image

from predictor.codec import encode_image, to_base64
from predictor.errors import PredictorError
from predictor.protocols.base import Batch, EncodedImage
from predictor.request import GenerationParams

logger = logging.getLogger(__name__)

# While an image waits in the queue no event is due; a comment line this often keeps proxies from timing out.
HEARTBEAT_S = 15.0


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def preview_png(pixels: np.ndarray, params: GenerationParams) -> str:
    """A partial image as PNG base64, at the output size (the linear map's latent-resolution preview scaled up)."""
    picture = Image.fromarray(pixels).resize((params.width, params.height), Image.Resampling.BILINEAR)
    return to_base64(encode_image(picture, "png"))


class EventFormat(Protocol):
    """How one wire format writes a stream's events."""

    async def event(self, item: Any) -> bytes:
        """A progress item (what the format's selector kept), as an event; may encode off the event loop."""

    def result(self, images: list[EncodedImage]) -> bytes:
        """The finished image, as the last event."""

    def error(self, exc: PredictorError) -> bytes:
        """A failure after the stream started, as the last event."""


class Progress:
    """The engine's progress callback for a stream. ``select`` turns a report ``(event, current, total[,
    preview])`` into the item the format writes, or None to drop it; it runs on the worker thread, so it only
    builds the item. The items cross to the event loop through ``events``."""

    def __init__(self, select: Callable[..., Any]) -> None:
        self._loop = asyncio.get_running_loop()
        self._select = select
        self.events: asyncio.Queue[Any] = asyncio.Queue()

    def __call__(self, event: str, current: int, total: int, *preview: Any) -> None:
        item = self._select(event, current, total, *preview)
        if item is not None:
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)


async def write_events(
    run: Callable[[], Awaitable[list[EncodedImage]]], events: asyncio.Queue[Any], event_format: EventFormat
) -> AsyncIterator[bytes]:
    """The events of one queued batch: its progress items as they come, then its result or error."""
    task = asyncio.ensure_future(run())
    getter: asyncio.Future | None = None
    try:
        while not task.done() or not events.empty():
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, task}, timeout=HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield await event_format.event(getter.result())
            else:
                getter.cancel()
                if not task.done():
                    yield b": waiting\n\n"
        try:
            images = task.result()
        except PredictorError as exc:
            yield event_format.error(exc)
            return
        except Exception:
            logger.exception("streamed generation failed")
            yield event_format.error(PredictorError("internal server error"))
            return
        yield event_format.result(images)
    finally:
        if getter is not None:
            getter.cancel()
        task.cancel()


class EventStream(StreamingResponse):
    """Server-Sent Events for one queued batch, whose images are cancelled however the response ends. A stream's
    own ``finally`` runs only once it has started; a client gone before the first event (the start of the response
    failing to send) would otherwise leave its images running to the end."""

    def __init__(self, content: AsyncIterator[bytes], batch: Batch) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.batch = batch

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for future in self.batch.futures:
                future.cancel()  # a finished image's future is done: nothing happens to it
