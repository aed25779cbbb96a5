"""This server's own routes, on the same app as KServe's v1 and v2: POST /generate (the image, or Server-Sent
Events), OpenAI's POST /v1/images/generations and POST /v1/images/edits, the model's description
(GET /v1/models/NAME/schedulers) and LoRA adapters (GET /v1/models/NAME/loras), liveness and the playground.
Each route reads its wire format through ``predictor.protocols`` and goes through the same model path."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from kserve.errors import ModelNotFound

from predictor.errors import LoadTimedOut
from predictor.model import DiffusionModel
from predictor.protocols import generate, openai
from predictor.protocols.base import RouteCall, error_response
from predictor.protocols.sse import EventFormat, EventStream, Progress, write_events
from predictor.request import FAMILY_FIELDS, MAX_LORA_SCALE, GenerationParams

STATIC_DIR = Path(__file__).resolve().parent / "static"


async def _event_stream(
    model: DiffusionModel,
    call: RouteCall,
    select: Callable[..., Any],
    event_format: Callable[[GenerationParams], EventFormat],
) -> EventStream:
    """Validate and queue first, so bad input (400) and a full queue (503) are plain responses, not streams; then
    stream the engine's reports that ``select`` keeps, written by ``event_format``."""
    progress = Progress(select)
    call.on_progress, call.streaming = progress, True
    batch = await model.preprocess(call)
    model.submit(batch)

    async def run() -> Any:
        return await model.postprocess(await model.predict(batch))

    return EventStream(write_events(run, progress.events, event_format(batch.params[0])), batch)


def _check_ready(model: DiffusionModel) -> None:
    if not model.ready:
        raise model.unavailable()


def register_routes(app: FastAPI, model: DiffusionModel, api_key_required: bool = False) -> None:
    router = APIRouter(tags=["Images"])
    not_found = {404: error_response("Unknown model")}

    @router.post(generate.PATH, response_class=Response, openapi_extra=generate.openapi(model.limits))
    async def generate_image(request: Request) -> Response:
        """Generate one image; the body is the generation request, the response the encoded image.

        With ``Accept: text/event-stream`` the response is a stream of Server-Sent Events instead: ``queued``
        (position), ``progress`` (step of total), ``preview`` (with partial_images) and finally ``image`` (base64
        and seed) or ``error``.
        """
        _check_ready(model)
        call = RouteCall(generate.parse, await request.body())
        if "text/event-stream" in request.headers.get("accept", ""):
            return await _event_stream(model, call, generate.select_progress, generate.GenerateEvents)
        images, headers = await model(call, headers=dict(request.headers))
        return generate.render(images, headers)

    @router.post(
        openai.GENERATIONS_PATH,
        tags=["OpenAI"],
        response_model=None,
        openapi_extra=openai.generations_openapi(model.limits),
    )
    async def openai_generations(request: Request) -> Response:
        """OpenAI-compatible image generation: ``client.images.generate(...)`` works against this route."""
        _check_ready(model)
        body = openai.read_generation(await request.body(), model.limits, model.name)
        call = RouteCall(openai.generation_params, body)
        return await _openai_answer(request, call, body.stream, "image_generation")

    @router.post(
        openai.EDITS_PATH, tags=["OpenAI"], response_model=None, openapi_extra=openai.edits_openapi(model.limits)
    )
    async def openai_edits(request: Request) -> Response:
        """OpenAI-compatible image edits: ``client.images.edit(image=..., mask=..., prompt=...)`` works against this
        route. Without a mask the image is reworked whole (img2img); with one, its transparent part is repainted."""
        _check_ready(model)
        edit = await openai.read_edit(request, model.limits, model.name)
        call = RouteCall(openai.edit_params, edit)
        return await _openai_answer(request, call, edit.request.stream, "image_edit")

    async def _openai_answer(request: Request, call: RouteCall, streamed: bool, kind: str) -> Response:
        if streamed:
            return await _event_stream(
                model, call, openai.select_progress, functools.partial(openai.OpenAIEvents, kind)
            )
        images, _ = await model(call, headers=dict(request.headers))
        return JSONResponse(openai.render(images))

    @router.get(
        "/v1/models/{model_name}/schedulers",
        tags=["Discovery"],
        summary="Describe the served model",
        responses=not_found,
    )
    async def describe_model(model_name: str) -> dict[str, Any]:
        """Everything a client building a request form needs, in one answer (the path names its first use, the
        scheduler list): the model's family and scheduler config, native size, the family-only fields it takes,
        its guidance kind, prompt token windows and image modes; the schedulers and defaults; the request limits;
        and whether POST routes need an API key."""
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
        if traits.takes("true_cfg_scale"):  # the pipeline's default: FLUX's 1 (off), Qwen-Image's 4
            limits["default_true_cfg_scale"] = traits.default_true_cfg_scale
        limits["max_image_bytes"] = model.settings.server.max_image_bytes
        return {"model": model.name, **described, "api_key_required": api_key_required, **limits}

    @router.get("/v1/models/{model_name}/loras", tags=["Discovery"], responses=not_found)
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

    @router.get(
        "/livez",
        tags=["Health"],
        responses={503: error_response("The GPU or the worker failed; restart the pod")},
    )
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
