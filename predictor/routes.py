"""This server's own routes, on the same app as KServe's: POST /generate (image or Server-Sent Events),
the OpenAI-compatible POST /v1/images/generations, scheduler discovery, liveness and the playground page."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from kserve.errors import ModelNotFound
from PIL import Image
from starlette.datastructures import UploadFile

from predictor.codec import encode_image, to_base64
from predictor.errors import InvalidRequest, LoadTimedOut, ModelNotLoaded, PredictorError
from predictor.model import Batch, DiffusionModel, EncodedImage, RouteCall
from predictor.schemas import (
    FAMILY_FIELDS,
    HARD_MAX_BATCH_INSTANCES,
    MAX_LORA_SCALE,
    Limits,
    openai_request_json_schema,
    request_json_schema,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
logger = logging.getLogger(__name__)

ERROR_BODY_SCHEMA = {
    "type": "object",
    "required": ["error", "error_type"],
    "properties": {
        "error": {"type": "string"},
        "error_type": {"type": "string"},
        "param": {"type": ["string", "null"]},
    },
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR_BODY_SCHEMA}}}


async def _edit_form(request: Request) -> dict[str, Any]:
    """OpenAI's edit form: its files (``image`` or ``image[]``, once or more; ``mask``) and its text fields."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise InvalidRequest("POST /v1/images/edits takes multipart/form-data (an image file and a prompt)", "body")
    try:
        form = await request.form(max_files=HARD_MAX_BATCH_INSTANCES + 1, max_fields=64)
    except PredictorError:  # the body limit's 413
        raise
    except Exception as exc:  # starlette's MultiPartException and malformed bodies
        raise InvalidRequest(f"the multipart body cannot be read: {str(exc)[:120]}", param="body") from None
    images: list[bytes] = []
    mask: bytes | None = None
    fields: dict[str, str] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name in ("image", "image[]"):
                images.append(await value.read())
            elif name == "mask":
                if mask is not None:
                    raise InvalidRequest("'mask' is given twice: one mask per request", param="mask")
                mask = await value.read()
            else:
                raise InvalidRequest(f"unexpected file '{name[:64]}'; files are 'image' and 'mask'", param=name[:64])
        elif name in ("image", "image[]", "mask"):
            raise InvalidRequest(f"'{name}' must be a file", param=name.rstrip("[]"))
        elif name in fields:
            raise InvalidRequest(f"field '{name[:64]}' is given twice", param=name[:64])
        else:
            fields[name] = value
    await form.close()
    return {"fields": fields, "images": images, "mask": mask}


def openai_openapi(limits: Limits) -> dict[str, Any]:
    """The OpenAPI entry of POST /v1/images/generations: the request schema with this server's limits."""
    error = {
        "type": "object",
        "properties": {"error": {"type": "object", "required": ["message", "type"]}},
        "required": ["error"],
    }
    error_response = {"content": {"application/json": {"schema": error}}}
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": openai_request_json_schema(limits)}},
        },
        "responses": {
            "200": {"description": "Images as base64 (b64_json)"},
            **{
                code: {"description": "Error in OpenAI's shape", **error_response}
                for code in ("400", "413", "500", "503", "504")
            },
        },
    }


def openai_edit_openapi() -> dict[str, Any]:
    """The OpenAPI entry of POST /v1/images/edits: OpenAI's multipart form."""
    text = {"type": "string"}
    form = {
        "type": "object",
        "required": ["image", "prompt"],
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP; several edit each"},
            "mask": {"type": "string", "format": "binary", "description": "fully transparent pixels: the edit"},
            "prompt": text,
            "n": {"type": "integer", "minimum": 1},
            "size": text,
            "response_format": {"type": "string", "enum": ["b64_json"]},
            **{name: text for name in ("model", "user", "output_format", "negative_prompt", "scheduler")},
            **{name: {"type": "number"} for name in ("strength", "guidance_scale", "true_cfg_scale")},
            **{name: {"type": "integer"} for name in ("num_inference_steps", "seed")},
        },
    }
    edit = openai_openapi(Limits())
    edit["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": form}}}
    return edit


def generate_openapi(limits: Limits) -> dict[str, Any]:
    """The OpenAPI entry of POST /generate: the request schema with this server's limits, every real status."""
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": request_json_schema(limits)}}},
        "responses": {
            "200": {
                "description": "The encoded image; its seed in X-Seed.",
                "content": {
                    **{
                        media: {"schema": {"type": "string", "format": "binary"}}
                        for media in ("image/png", "image/jpeg", "image/webp")
                    },
                    "text/event-stream": {"schema": {"type": "string"}},
                },
                "headers": {
                    "X-Seed": {"schema": {"type": "string", "pattern": "^[0-9]+$"}, "description": "Reproduces it"},
                    "X-Prompt-Truncated": {"schema": {"type": "string", "enum": ["true", "false"]}},
                    "X-NSFW": {"schema": {"type": "string", "enum": ["true", "false"]}},
                },
            },
            "400": _error("Invalid input"),
            "413": _error("Request body too large"),
            "500": _error("The model produced no valid image"),
            "503": _error("Not ready, overloaded, out of GPU memory or shutting down"),
            "504": _error("Deadline exceeded"),
        },
    }


def _openai_error(exc: PredictorError) -> JSONResponse:
    """OpenAI's error shape, so OpenAI SDKs raise their usual exceptions with our message."""
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    body = {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.error_type}}
    return JSONResponse(status_code=exc.status_code, content=body, headers=exc.headers)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _image_event(image: EncodedImage) -> dict[str, Any]:
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


PIXELS = "pixels"  # a preview event's raw picture, before it is encoded


def _preview_event(data: dict[str, Any], params: Any) -> dict[str, Any]:
    """A partial image as PNG base64, at the output size (the linear map's latent-resolution preview scaled up)."""
    picture = Image.fromarray(data.pop(PIXELS)).resize((params.width, params.height), Image.Resampling.BILINEAR)
    return {
        **data,
        "b64": to_base64(encode_image(picture, "png")),
        "format": "png",
        "width": params.width,
        "height": params.height,
    }


# While an image waits in the queue no event is due; a comment line this often keeps proxies from timing out.
_HEARTBEAT_S = 15.0


def _openai_stream_requested(body: bytes) -> bool:
    """Whether a generations body asks for a stream (validation proper happens with the rest of it)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("stream") is True


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


async def _openai_stream(model: DiffusionModel, call: RouteCall, kind: str) -> EventStream:
    """OpenAI's streamed images (``stream: true``): ``{kind}.partial_image`` events for the previews asked for
    (``partial_images``), then ``{kind}.completed`` with the image, as the openai SDK's stream iterator reads them.
    ``kind`` is ``image_generation`` or ``image_edit``. Validated and queued before the stream starts."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    def on_progress(event: str, current: int, total: int, *preview: Any) -> None:
        if event == "preview":
            loop.call_soon_threadsafe(events.put_nowait, ("preview", {PIXELS: preview[0]}))

    call.on_progress, call.streaming = on_progress, True
    batch = await model.preprocess(call)
    model.submit(batch)
    params = batch.params[0]

    def shared() -> dict[str, Any]:
        return {
            "created_at": int(time.time()),
            "size": f"{params.width}x{params.height}",
            "quality": "auto",
            "background": "opaque",
            "output_format": params.output_format,
        }

    async def stream() -> AsyncIterator[bytes]:
        async def run() -> list[EncodedImage]:
            return await model.postprocess(await model.predict(batch))

        task = asyncio.ensure_future(run())
        index = 0
        getter: asyncio.Future | None = None
        try:
            while not task.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, task}, timeout=_HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    if not task.done():
                        yield b": waiting\n\n"
                    continue
                _, data = getter.result()
                preview = await asyncio.to_thread(_preview_event, data, params)
                event = {"type": f"{kind}.partial_image", "b64_json": preview["b64"], "partial_image_index": index}
                index += 1
                yield _sse(f"{kind}.partial_image", {**event, **shared(), "output_format": "png"})
            try:
                image = task.result()[0]
            except PredictorError as exc:
                error = {"message": exc.message, "type": "server_error", "param": exc.param, "code": exc.error_type}
                yield _sse("error", {"type": "error", "error": error})
                return
            except Exception:
                logger.exception("streamed generation failed")
                error = {"message": "internal server error", "type": "server_error", "param": None, "code": None}
                yield _sse("error", {"type": "error", "error": {**error, "code": "internal_error"}})
                return
            usage = {
                "input_tokens": 0,
                "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                "output_tokens": 0,
                "total_tokens": 0,
            }
            completed = {"type": f"{kind}.completed", "b64_json": to_base64(image.data), "usage": usage}
            yield _sse(f"{kind}.completed", {**completed, **shared()})
        finally:
            if getter is not None:
                getter.cancel()
            task.cancel()

    return EventStream(stream(), batch)


async def _start_stream(model: DiffusionModel, body: bytes) -> EventStream:
    """Validate and queue first, so bad input (400) and a full queue (503) are plain responses, not streams;
    then stream Server-Sent Events: queued, progress per step, and the image (or an error).

    The engine reports from its worker thread; events cross to the event loop through a queue. When the client
    goes away the response stops iterating and the generation is cancelled at its next step.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    def on_progress(kind: str, current: int, total: int, *preview: Any) -> None:
        if kind == "queued":
            event: tuple[str, dict[str, Any]] = ("queued", {"position": current})
        elif kind == "preview":
            event = ("preview", {"step": current, "total": total, PIXELS: preview[0]})
        else:
            event = ("progress", {"step": current, "total": total})
        loop.call_soon_threadsafe(events.put_nowait, event)

    batch = await model.preprocess(RouteCall("generate", body, on_progress=on_progress, streaming=True))
    model.submit(batch)
    return EventStream(_stream(model, batch, events), batch)


async def _stream(model: DiffusionModel, batch: Batch, events: asyncio.Queue) -> AsyncIterator[bytes]:
    async def run() -> list[EncodedImage]:
        return await model.postprocess(await model.predict(batch))

    task = asyncio.ensure_future(run())
    getter: asyncio.Future | None = None
    try:
        while not task.done() or not events.empty():
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, task}, timeout=_HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                name, data = getter.result()
                if PIXELS in data:  # a partial image: encoded here, off the worker thread
                    data = await asyncio.to_thread(_preview_event, data, batch.params[0])
                yield _sse(name, data)
            else:
                getter.cancel()
                if not task.done():
                    yield b": waiting\n\n"
        try:
            yield _sse("image", _image_event(task.result()[0]))
        except PredictorError as exc:
            yield _sse("error", exc.body())
        except Exception:
            logger.exception("streamed generation failed")
            yield _sse("error", {"error": "internal server error", "error_type": "internal_error", "param": None})
    finally:
        if getter is not None:
            getter.cancel()
        task.cancel()


async def _openai_images(
    model: DiffusionModel, request: Request, read: Callable[[], Awaitable[tuple[RouteCall, bool]]], kind: str
) -> Response:
    """An OpenAI images route: ``read`` gives the call and whether it asks for a stream; the answer is OpenAI's
    JSON (or its event stream), and every error has OpenAI's shape."""
    try:
        if not model.ready:
            raise ModelNotLoaded(f"model {model.name} is not ready")
        call, streamed = await read()
        if streamed:
            return await _openai_stream(model, call, kind)
        encoded, _ = await model(call, headers=dict(request.headers))
    except PredictorError as exc:
        return _openai_error(exc)
    data = [{"b64_json": to_base64(image.data), "seed": image.result.params.seed} for image in encoded]
    return JSONResponse({"created": int(time.time()), "data": data})


def register_routes(app: FastAPI, model: DiffusionModel, api_key_required: bool = False) -> None:
    router = APIRouter(tags=["Images"])

    @router.post("/generate", response_class=Response, openapi_extra=generate_openapi(model.limits))
    async def generate(request: Request) -> Response:
        """Generate one image; the body is the generation request, the response the encoded image.

        With ``Accept: text/event-stream`` the response is a stream of Server-Sent Events instead: ``queued``
        (position), ``progress`` (step of total) and finally ``image`` (base64 and seed) or ``error``.
        """
        if not model.ready:
            raise ModelNotLoaded(f"model {model.name} is not ready")
        body = await request.body()
        if "text/event-stream" in request.headers.get("accept", ""):
            return await _start_stream(model, body)
        encoded, headers = await model(RouteCall("generate", body), headers=dict(request.headers))
        image: EncodedImage = encoded[0]
        return Response(content=image.data, media_type=image.media_type, headers=headers)

    @router.post(
        "/v1/images/generations", tags=["OpenAI"], response_model=None, openapi_extra=openai_openapi(model.limits)
    )
    async def openai_images(request: Request) -> Response:
        """OpenAI-compatible image generation: ``client.images.generate(...)`` works against this route."""

        async def call() -> tuple[RouteCall, bool]:
            body = await request.body()
            return RouteCall("openai", body), _openai_stream_requested(body)

        return await _openai_images(model, request, call, "image_generation")

    @router.post("/v1/images/edits", tags=["OpenAI"], response_model=None, openapi_extra=openai_edit_openapi())
    async def openai_edits(request: Request) -> Response:
        """OpenAI-compatible image edits: ``client.images.edit(image=..., mask=..., prompt=...)`` works against this
        route. Without a mask the image is reworked whole (img2img); with one, its transparent part is repainted."""

        async def call() -> tuple[RouteCall, bool]:
            edit = await _edit_form(request)
            return RouteCall("openai_edit", edit), edit["fields"].get("stream") == "true"

        return await _openai_images(model, request, call, "image_edit")

    @router.get("/v1/models/{model_name}/schedulers", tags=["Discovery"], responses={404: _error("Unknown model")})
    async def schedulers(model_name: str) -> dict[str, Any]:
        """The model's family, native size, schedulers, defaults and request limits, for clients that build forms."""
        if model_name != model.name:
            raise ModelNotFound(model_name)
        if model.loaded is None:
            return {
                "model": model.name,
                "native_size": None,
                "api_key_required": api_key_required,
                **model.limits.as_dict(),
            }
        traits = model.traits
        described = {
            **model.loaded.describe(),
            "native_size": traits.native_size,
            "request_fields": {name: traits.takes(name) for name in FAMILY_FIELDS},
            "guidance": traits.guidance,
            "max_prompt_tokens": traits.max_prompt_tokens,
            "modes": sorted(traits.modes),  # "text", "img2img", "inpaint": what requests with images may ask
        }
        limits = {
            **model.limits.as_dict(),
            "schedulers": list(traits.schedulers),
            "image_size_multiple": traits.size_multiple,
        }
        if traits.max_image_size is not None:
            limits["max_image_size"] = min(limits["max_image_size"], traits.max_image_size)
        limits["max_image_bytes"] = model.settings.server.max_image_bytes
        return {"model": model.name, **described, "api_key_required": api_key_required, **limits}

    @router.get("/v1/models/{model_name}/loras", tags=["Discovery"], responses={404: _error("Unknown model")})
    async def loras(model_name: str) -> dict[str, Any]:
        """The LoRA adapters a request may name in 'loras' (the server's --lora_dir): each with its size and
        whether it can be used (the reason when not), those in the model now, and the limits; ``slots`` says the
        model holds them in --compile's fixed slots (an image waits for a free one)."""
        if model_name != model.name:
            raise ModelNotFound(model_name)
        library = model.adapters
        return {
            "model": model.name,
            "loras": [] if library is None else library.describe(),
            "loaded": [] if library is None else library.loaded_names(),
            "max_loras_per_request": model.limits.max_loras_per_request,
            "max_lora_scale": MAX_LORA_SCALE,
            "batching": model.settings.engine.lora_batching,
            # How many adapters the model holds at once; with --compile a hard bound (fixed slots).
            "max_loaded": model.settings.engine.max_loaded_loras,
            "slots": model.settings.engine.compile,
        }

    @router.get("/livez", tags=["Health"], responses={503: _error("The GPU or the worker failed; restart the pod")})
    async def live() -> dict[str, bool]:
        """Liveness for Kubernetes: 503 after an unrecoverable device error, a stopped generation worker, a hung
        step or a load over --load_timeout_s, so the pod is restarted; 200 while the model loads."""
        engine = model.generation_engine
        failure = engine.liveness_failure() if engine is not None else None
        if failure is not None:
            raise failure
        loading_for, limit = model.loading_for(), model.settings.server.load_timeout_s
        if loading_for is not None and loading_for > limit:
            raise LoadTimedOut(f"the model has been loading for {loading_for:.0f} s, over --load_timeout_s {limit:g}")
        return {"live": True}

    @router.get("/playground", include_in_schema=False)
    async def playground_redirect() -> RedirectResponse:
        return RedirectResponse("/playground/")

    app.include_router(router)
    app.mount("/playground/", StaticFiles(directory=STATIC_DIR, html=True), name="playground")
