"""This server's own routes, on the same app as KServe's: POST /generate (prompt in, image out)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response

from predictor.errors import DeviceFailed, ModelNotLoaded
from predictor.model import DiffusionModel, EncodedImage, RouteCall
from predictor.schemas import Limits, request_json_schema

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


def generate_openapi(limits: Limits) -> dict[str, Any]:
    """The OpenAPI entry of POST /generate: the request schema with this server's limits, every real status."""
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": request_json_schema(limits)}}},
        "responses": {
            "200": {
                "description": "The encoded image; its seed in X-Seed.",
                "content": {
                    media: {"schema": {"type": "string", "format": "binary"}}
                    for media in ("image/png", "image/jpeg", "image/webp")
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


def register_routes(app: FastAPI, model: DiffusionModel) -> None:
    router = APIRouter(tags=["Images"])

    @router.post("/generate", response_class=Response, openapi_extra=generate_openapi(model.limits))
    async def generate(request: Request) -> Response:
        """Generate one image; the body is the generation request, the response the encoded image."""
        if not model.ready:
            raise ModelNotLoaded(f"model {model.name} is not ready")
        body = await request.body()
        encoded, headers = await model(RouteCall("generate", body), headers=dict(request.headers))
        image: EncodedImage = encoded[0]
        return Response(content=image.data, media_type=image.media_type, headers=headers)

    @router.get("/livez", tags=["Health"], responses={503: _error("The GPU failed; restart the pod")})
    async def live() -> dict[str, bool]:
        """Liveness for Kubernetes: 503 after an unrecoverable device error, so the pod is restarted."""
        if model.engine is not None and not model.engine.healthy:
            raise DeviceFailed("the GPU is in a failed state; restart the pod")
        return {"live": True}

    app.include_router(router)
