"""KServe's v2 (Open Inference) protocol, ``POST /v2/models/NAME/infer``: the request's text fields as BYTES input
tensors of shape [N] (one element per image; the input image and mask as base64, as v2 returns images), every
other field as a request parameter shared by the N images."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse

from predictor.codec import to_base64
from predictor.errors import InvalidRequest
from predictor.protocols.base import Batch, Context, EncodedImage, RouteSpec, check_count
from predictor.request import GenerationParams, GenerationRequest, parse_request, value_type

ROUTES = (
    RouteSpec(
        ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer"),
        takes_images=True,
    ),
)
# Request parameters that belong to the protocol, not to the generation request.
_PROTOCOL_PARAMETERS = frozenset({"binary_data_output"})


def _text(annotation: object) -> bool:
    """A field a string fills: ``str``, or a union with ``str`` (``image``: one image, or a list of references,
    which a tensor of one element per prompt cannot carry: v2 sends one)."""
    kind = value_type(annotation)
    return kind is str or any(value_type(member) is str for member in getattr(kind, "__args__", ()))


# The input tensors: the request's text fields, in its order ("prompt" first and required); a Literal is a
# choice, sent as a parameter.
TEXT_INPUTS: tuple[str, ...] = tuple(
    name for name, info in GenerationRequest.model_fields.items() if _text(info.annotation)
)


def parse(request: InferRequest, ctx: Context) -> list[GenerationParams]:
    tensors: dict[str, list[str]] = {}
    for tensor in request.inputs:
        if tensor.name not in TEXT_INPUTS:
            names = ", ".join(f"'{name}'" for name in TEXT_INPUTS[1:])
            raise InvalidRequest(
                f"unknown input '{tensor.name[:64]}'; inputs are 'prompt' and optional {names}",
                param=f"inputs.{tensor.name[:64]}",
            )
        tensors[tensor.name] = _strings(tensor.name, tensor.datatype, tensor.shape, tensor.data)
    if "prompt" not in tensors:
        raise InvalidRequest("input 'prompt' (BYTES, shape [N]) is required", param="inputs.prompt")
    prompts = tensors["prompt"]
    check_count(len(prompts), "inputs.prompt", ctx.limits)
    for name, values in tensors.items():
        if len(values) != len(prompts):
            raise InvalidRequest(f"input '{name}' must have as many elements as 'prompt'", param=f"inputs.{name}")
    parameters = {k: v for k, v in (request.parameters or {}).items() if k not in _PROTOCOL_PARAMETERS}
    for name in TEXT_INPUTS:
        if name in parameters:
            raise InvalidRequest(f"'{name}' is an input tensor, not a parameter", param=f"parameters.{name}")
    params = []
    for index in range(len(prompts)):
        body = {**parameters, **{name: values[index] for name, values in tensors.items()}}
        generation = parse_request(body, ctx.limits)
        try:
            params.append(ctx.resolve(generation, ""))
        except InvalidRequest as exc:
            if exc.param in TEXT_INPUTS:  # a check against the model on a text: it came as an input tensor
                raise InvalidRequest(exc.message, param=f"inputs.{exc.param}") from None
            raise
    return params


def render(batch: Batch, images: list[EncodedImage]) -> InferResponse:
    n = len(images)
    outputs = [
        InferOutput("image", [n], "BYTES", [to_base64(item.data) for item in images]),
        InferOutput("seed", [n], "INT64", [item.result.params.seed for item in images]),
        InferOutput("nsfw", [n], "BOOL", [item.result.nsfw for item in images]),
        InferOutput("prompt_truncated", [n], "BOOL", [item.result.prompt_truncated for item in images]),
    ]
    formats = sorted({item.result.params.output_format for item in images})
    return InferResponse(
        response_id=batch.request_id or str(uuid.uuid4()),
        model_name=batch.model_name,
        infer_outputs=outputs,
        parameters={"output_format": ",".join(formats)},
    )


def _strings(name: str, datatype: str, shape: list[int], data: Any) -> list[str]:
    param = f"inputs.{name}"
    if datatype != "BYTES":
        raise InvalidRequest(f"input '{name}' must have datatype BYTES, not {datatype[:16]}", param=param)
    values = data.tolist() if isinstance(data, np.ndarray) else data
    if not isinstance(values, list):
        raise InvalidRequest(f"input '{name}' must hold a list of strings", param=param)
    if len(shape) != 1 or shape[0] != len(values):
        raise InvalidRequest(f"input '{name}' must have shape [N] matching its {len(values)} elements", param=param)
    strings = []
    for value in values:
        if isinstance(value, bytes) and name in ("image", "mask") and not value.isascii():
            value = base64.b64encode(value).decode("ascii")  # a binary tensor holding the file itself
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(f"input '{name}' is not valid UTF-8", param=param) from None
        if not isinstance(value, str):
            raise InvalidRequest(f"input '{name}' must hold strings", param=param)
        strings.append(value)
    return strings
