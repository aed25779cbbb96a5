"""OpenAI's Images API: ``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits`` (a multipart form
with the image files), so OpenAI's SDKs work against this server. Their requests are ``GenerationFields`` plus
OpenAI's own fields; each is validated once and mapped onto a ``GenerationRequest`` without validating again.
Answers are OpenAI's JSON (``b64_json``) or its event stream, and every error has OpenAI's shape."""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field
from starlette.datastructures import UploadFile
from starlette.requests import Request

from predictor.codec import to_base64
from predictor.errors import InvalidRequest, PredictorError
from predictor.images import decode_mask, encode_png
from predictor.protocols.base import Context, EncodedImage, RouteSpec, json_object
from predictor.protocols.sse import preview_png, sse
from predictor.request import (
    HARD_MAX_BATCH_INSTANCES,
    GenerationFields,
    GenerationParams,
    GenerationRequest,
    ImageStrength,
    Limits,
    OperatorLimit,
    checked_image_side,
    images_of,
    json_schema,
    validate,
)

GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"


def error_body(exc: PredictorError) -> dict[str, Any]:
    """OpenAI's error shape, so OpenAI SDKs raise their usual exceptions with this server's message."""
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.error_type}}


ROUTES = (
    RouteSpec((GENERATIONS_PATH,), error_body=error_body),
    RouteSpec((EDITS_PATH,), takes_images=True, error_body=error_body),
)


class OpenAIImageRequest(GenerationFields):
    """OpenAI's image generation request; this server's other generation fields are extensions to it."""

    n: Annotated[int, Field(ge=1, le=HARD_MAX_BATCH_INSTANCES), OperatorLimit("max_batch_instances")] = Field(
        default=1, description="How many images: seeds seed, seed+1, ... (at most --max_batch_instances)."
    )
    size: Annotated[str, Field(pattern=r"^([0-9]{2,4}x[0-9]{2,4}|auto)$")] | None = Field(
        default=None, description="WIDTHxHEIGHT, or auto: the model's native size (an edit's: its input's)."
    )
    response_format: Literal["b64_json", "url"] = Field(
        default="b64_json", description="b64_json only: this server stores no images."
    )
    model: str | None = Field(default=None, description="The served model's name, if given.")
    user: str | None = Field(default=None, description="Accepted and ignored.")
    stream: bool = Field(default=False, description="Server-Sent Events: partial_images previews, then the image.")


class OpenAIEditRequest(ImageStrength, OpenAIImageRequest):
    """The text fields of OpenAI's edit form; the image files (``image``, ``mask``) come beside them."""


def _checked(request: OpenAIImageRequest, served_model: str) -> None:
    """OpenAI's fields that this server takes in part."""
    if request.response_format == "url":
        raise InvalidRequest(
            "response_format 'url' is not supported: this server stores no images; use 'b64_json'",
            param="response_format",
        )
    if request.model is not None and request.model != served_model:
        raise InvalidRequest(
            f"model '{request.model[:64]}' is not served here; this server serves '{served_model}'", param="model"
        )
    if request.stream and request.n != 1:
        raise InvalidRequest("'n' must be 1 with stream: true (one image per stream)", param="n")
    if request.partial_images and not request.stream:
        raise InvalidRequest("'partial_images' needs stream: true", param="partial_images")


def _generation(request: OpenAIImageRequest, limits: Limits, **image: Any) -> GenerationRequest:
    """The generation request an OpenAI request maps to: its shared fields as they are (validated once already),
    ``size`` as width and height."""
    fields = {name: getattr(request, name) for name in GenerationFields.model_fields}
    if request.size is not None and request.size != "auto":  # auto: the model's size, or an edit's input's
        width, height = request.size.split("x")
        fields["width"] = checked_image_side(int(width), "size", limits)
        fields["height"] = checked_image_side(int(height), "size", limits)
    return GenerationRequest.model_construct(**fields, **image)


# ---- generations ------------------------------------------------------------------------------------------------


def read_generation(body: bytes, limits: Limits, served_model: str) -> OpenAIImageRequest:
    """The validated body of ``POST /v1/images/generations``."""
    data = json_object(body)
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object", param="body")
    request = validate(OpenAIImageRequest, data, limits)
    _checked(request, served_model)
    return request


def generation_params(request: OpenAIImageRequest, ctx: Context) -> list[GenerationParams]:
    return images_of(ctx.resolve(_generation(request, ctx.limits), ""), request.n)


# ---- edits ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditForm:
    """``POST /v1/images/edits``, read: its text fields validated, its files as sent."""

    request: OpenAIEditRequest
    images: list[bytes]
    mask: bytes | None


async def read_edit(http: Request, limits: Limits, served_model: str) -> EditForm:
    """OpenAI's edit form: its files (``image`` or ``image[]``, once or more; ``mask``) and its text fields, each
    read as the type of its field."""
    if not http.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise InvalidRequest("POST /v1/images/edits takes multipart/form-data (an image file and a prompt)", "body")
    try:
        form = await http.form(max_files=HARD_MAX_BATCH_INSTANCES + 1, max_fields=64)
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
    request = validate(OpenAIEditRequest, fields, limits, strings=True)
    _checked(request, served_model)
    if not images:
        raise InvalidRequest("'image' is required: the picture to edit (PNG, JPEG or WebP)", param="image")
    return EditForm(request, images, mask)


def edit_params(edit: EditForm, ctx: Context) -> list[GenerationParams]:
    """One generation request per input image, each making ``n`` images; on a model that edits by reference
    (FLUX.2), one request whose references are all the images (``images.edit(image=[f1, f2])``). The mask
    follows OpenAI's convention (its fully transparent pixels mark the area to edit) and becomes this server's
    (white repaints)."""
    limits, request = ctx.limits, edit.request
    if any(not data for data in edit.images):
        raise InvalidRequest("'image' must not be empty", param="image")
    encoded = [base64.b64encode(data).decode() for data in edit.images]
    edits = [encoded if len(encoded) > 1 else encoded[0]] if ctx.edits_by_reference else encoded
    if len(edits) > limits.max_batch_instances:
        raise InvalidRequest(f"at most {limits.max_batch_instances} images per request", param="image")
    if request.stream and len(edits) > 1:
        raise InvalidRequest("one image per request with stream: true", param="image")
    if request.n * len(edits) > limits.max_batch_instances:
        raise InvalidRequest(
            f"{len(edits)} images x n {request.n} make more than {limits.max_batch_instances} (--max_batch_instances)",
            param="n",
        )
    mask = None
    if edit.mask is not None:
        mask = encode_png(decode_mask(edit.mask, "mask", limits.max_input_pixels, transparent_edits=True))
    params: list[GenerationParams] = []
    for image in edits:
        generation = _generation(request, limits, image=image, mask=mask, strength=request.strength)
        params += images_of(ctx.resolve(generation, ""), request.n)
    return params


# ---- answers ----------------------------------------------------------------------------------------------------


def render(images: list[EncodedImage]) -> dict[str, Any]:
    data = [{"b64_json": to_base64(image.data), "seed": image.result.params.seed} for image in images]
    return {"created": int(time.time()), "data": data}


def select_progress(event: str, current: int, total: int, *preview: Any) -> Any:
    """OpenAI's streams carry the partial images only: their pixels."""
    return preview[0] if event == "preview" else None


class OpenAIEvents:
    """OpenAI's streamed images (``stream: true``): ``{kind}.partial_image`` events for the previews asked for
    (``partial_images``), then ``{kind}.completed`` with the image, as the openai SDK's stream iterator reads them.
    ``kind`` is ``image_generation`` or ``image_edit``."""

    def __init__(self, kind: str, params: GenerationParams) -> None:
        self.kind = kind
        self.params = params
        self.partial_images = 0

    def _shared(self) -> dict[str, Any]:
        return {
            "created_at": int(time.time()),
            "size": f"{self.params.width}x{self.params.height}",
            "quality": "auto",
            "background": "opaque",
            "output_format": self.params.output_format,
        }

    async def event(self, pixels: Any) -> bytes:
        png = await asyncio.to_thread(preview_png, pixels, self.params)
        name = f"{self.kind}.partial_image"
        event = {"type": name, "b64_json": png, "partial_image_index": self.partial_images}
        self.partial_images += 1
        return sse(name, {**event, **self._shared(), "output_format": "png"})

    def result(self, images: list[EncodedImage]) -> bytes:
        usage = {
            "input_tokens": 0,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
            "output_tokens": 0,
            "total_tokens": 0,
        }
        name = f"{self.kind}.completed"
        completed = {"type": name, "b64_json": to_base64(images[0].data), "usage": usage}
        return sse(name, {**completed, **self._shared()})

    def error(self, exc: PredictorError) -> bytes:
        return sse("error", {"type": "error", **error_body(exc)})


# ---- OpenAPI -----------------------------------------------------------------------------------------------------


def _responses() -> dict[str, Any]:
    error = {
        "type": "object",
        "properties": {"error": {"type": "object", "required": ["message", "type"]}},
        "required": ["error"],
    }
    error_response = {"content": {"application/json": {"schema": error}}}
    return {
        "200": {"description": "Images as base64 (b64_json)"},
        **{
            code: {"description": "Error in OpenAI's shape", **error_response}
            for code in ("400", "413", "500", "503", "504")
        },
    }


def generations_openapi(limits: Limits) -> dict[str, Any]:
    """The OpenAPI entry of POST /v1/images/generations: the request schema with this server's limits."""
    schema = json_schema(OpenAIImageRequest, limits)
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "responses": _responses(),
    }


def edits_openapi(limits: Limits) -> dict[str, Any]:
    """The OpenAPI entry of POST /v1/images/edits: OpenAI's multipart form, its text fields from the same request
    model (a form field is present or absent, never null) with this server's limits, and the files."""
    schema = json_schema(OpenAIEditRequest, limits)
    for name, prop in schema["properties"].items():
        variants = [variant for variant in prop.get("anyOf", ()) if variant != {"type": "null"}]
        if len(variants) == 1:
            del prop["anyOf"]
            schema["properties"][name] = {**variants[0], **prop}
    schema["properties"] = {
        "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP; several edit each"},
        "mask": {"type": "string", "format": "binary", "description": "fully transparent pixels: the edit"},
        **schema["properties"],
    }
    schema["required"] = ["image", *schema.get("required", [])]
    form = {"schema": schema, "encoding": {"loras": {"contentType": "application/json"}}}
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": form}},
        "responses": _responses(),
    }
