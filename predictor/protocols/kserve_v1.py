"""KServe's v1 protocol, ``POST /v1/models/NAME:predict``: ``{"instances": [request, ...]}``, one generation
request per instance, answered ``{"predictions": [...]}`` in the same order."""

from __future__ import annotations

from typing import Any

from predictor.codec import to_base64
from predictor.errors import InvalidRequest
from predictor.protocols.base import ERROR_RESPONSES, Batch, Context, EncodedImage, RouteSpec, check_count
from predictor.request import GenerationParams, GenerationRequest, Limits, json_schema, parse_request

PATH = "/v1/models/{model_name}:predict"
ROUTES = (RouteSpec((PATH,), takes_images=True),)


def parse(body: dict[str, Any], ctx: Context) -> list[GenerationParams]:
    unknown = set(body) - {"instances"}
    if unknown:
        name = sorted(unknown)[0][:64]
        raise InvalidRequest(f"unknown field '{name}'; a v1 request is {{\"instances\": [...]}}", param=name)
    instances = body.get("instances")
    if not isinstance(instances, list):
        raise InvalidRequest("'instances' must be a list of generation requests", param="instances")
    check_count(len(instances), "instances", ctx.limits)
    prefixes = [f"instances[{i}]." for i in range(len(instances))]
    requests = [parse_request(item, ctx.limits, prefix) for item, prefix in zip(instances, prefixes, strict=True)]
    return [ctx.resolve(request, prefix) for request, prefix in zip(requests, prefixes, strict=True)]


def render(batch: Batch, images: list[EncodedImage]) -> dict[str, Any]:
    return {"predictions": [_prediction(image) for image in images]}


def _prediction(item: EncodedImage) -> dict[str, Any]:
    params = item.result.params
    return {
        "image": {"b64": to_base64(item.data), "format": params.output_format},
        "seed": params.seed,
        "width": params.width,
        "height": params.height,
        "prompt_truncated": item.result.prompt_truncated,
        "nsfw": item.result.nsfw,
    }


def openapi(limits: Limits) -> dict[str, Any]:
    """The request body and statuses of KServe's v1 predict route, as this server takes and answers them."""
    instances = {
        "type": "array",
        "minItems": 1,
        "maxItems": limits.max_batch_instances,
        "items": json_schema(GenerationRequest, limits),
    }
    body = {
        "type": "object",
        "required": ["instances"],
        "additionalProperties": False,
        "properties": {"instances": instances},
    }
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {"200": {"description": "One prediction per instance, in order"}, **ERROR_RESPONSES},
    }
