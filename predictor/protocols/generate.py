"""``POST /generate``: one generation request as JSON; the encoded image as the response body (its seed and flags
in headers), or with ``Accept: text/event-stream`` Server-Sent Events: ``queued`` (position), ``progress`` (step
of total), ``preview`` (partial images asked for), then ``image`` or ``error``."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Response

from predictor.codec import MEDIA_TYPES, to_base64
from predictor.errors import PredictorError
from predictor.protocols.base import ERROR_RESPONSES, Context, EncodedImage, RouteSpec, json_object
from predictor.protocols.sse import preview_png, sse
from predictor.request import GenerationParams, GenerationRequest, Limits, json_schema, parse_request

PATH = "/generate"
ROUTES = (RouteSpec((PATH,), takes_images=True),)


def parse(body: bytes | dict[str, Any], ctx: Context) -> list[GenerationParams]:
    data = json_object(body) if isinstance(body, bytes) else body
    return [ctx.resolve(parse_request(data, ctx.limits), "")]


def render(images: list[EncodedImage], headers: dict[str, str]) -> Response:
    return Response(content=images[0].data, media_type=images[0].media_type, headers=headers)


def image_event(image: EncodedImage) -> dict[str, Any]:
    """The stream's last event: the image and what the request resolved to."""
    params = image.result.params
    return {
        "b64": to_base64(image.data),
        "format": params.output_format,
        "seed": params.seed,
        "width": params.width,
        "height": params.height,
        "prompt_truncated": image.result.prompt_truncated,
        "nsfw": image.result.nsfw,
    }


# ---- Server-Sent Events ------------------------------------------------------------------------------------------


def select_progress(event: str, current: int, total: int, *preview: Any) -> tuple[str, dict[str, Any], Any]:
    """Every engine report is an event here: (name, data, the preview's pixels or None)."""
    if event == "queued":
        return "queued", {"position": current}, None
    if event == "preview":
        return "preview", {"step": current, "total": total}, preview[0]
    return "progress", {"step": current, "total": total}, None


class GenerateEvents:
    """/generate's events for one image."""

    def __init__(self, params: GenerationParams) -> None:
        self.params = params

    async def event(self, item: tuple[str, dict[str, Any], Any]) -> bytes:
        name, data, pixels = item
        if pixels is not None:  # a partial image: encoded here, off the worker thread and the event loop
            png = await asyncio.to_thread(preview_png, pixels, self.params)
            data = {**data, "b64": png, "format": "png", "width": self.params.width, "height": self.params.height}
        return sse(name, data)

    def result(self, images: list[EncodedImage]) -> bytes:
        return sse("image", image_event(images[0]))

    def error(self, exc: PredictorError) -> bytes:
        return sse("error", exc.body())


# ---- OpenAPI -----------------------------------------------------------------------------------------------------


def openapi(limits: Limits) -> dict[str, Any]:
    """The OpenAPI entry of POST /generate: the request schema with this server's limits, every real status."""
    schema = json_schema(GenerationRequest, limits)
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "responses": {
            "200": {
                "description": "The encoded image; its seed in X-Seed.",
                "content": {
                    **{media: {"schema": {"type": "string", "format": "binary"}} for media in MEDIA_TYPES.values()},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
                "headers": {
                    "X-Seed": {"schema": {"type": "string", "pattern": "^[0-9]+$"}, "description": "Reproduces it"},
                    "X-Prompt-Truncated": {"schema": {"type": "string", "enum": ["true", "false"]}},
                    "X-NSFW": {"schema": {"type": "string", "enum": ["true", "false"]}},
                },
            },
            **ERROR_RESPONSES,
        },
    }
