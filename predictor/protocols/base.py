"""What the wire formats share: the call a route of this server hands the model, the batch it becomes, the encoded
images, and the metadata each format declares for its routes (body limit, error shape)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from starlette.routing import compile_path

from predictor.errors import InvalidRequest, PredictorError
from predictor.jobs import GenerationResult, ProgressCallback
from predictor.request import GenerationParams, GenerationRequest, Limits

# The error body of a wire format, built from the one error type.
ErrorBody = Callable[[PredictorError], dict[str, Any]]


@dataclass(frozen=True)
class Context:
    """What a wire format's parser needs from the served model."""

    limits: Limits
    served_model: str
    # The request checked against the model's traits and adapters, with its defaults filled; the string names
    # where the request sits in its body (a prefix of every error's param).
    resolve: Callable[[GenerationRequest, str], GenerationParams]
    # The model edits by reference images (FLUX.2): several input images are one edit's references.
    edits_by_reference: bool = False


# A wire format's parser: its body (already read) -> the images to generate.
Parser = Callable[[Any, Context], list[GenerationParams]]


@dataclass
class RouteCall:
    """A request from one of this server's own routes, carried through the same model path as v1 and v2."""

    parse: Parser
    body: Any
    on_progress: ProgressCallback | None = None
    streaming: bool = False  # the response is a stream, which can carry partial images


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    media_type: str
    result: GenerationResult

    @property
    def headers(self) -> dict[str, str]:
        return {
            "X-Seed": str(self.result.params.seed),
            "X-Prompt-Truncated": str(self.result.prompt_truncated).lower(),
            "X-NSFW": str(self.result.nsfw).lower(),
        }


@dataclass
class Batch:
    params: list[GenerationParams]
    request_id: str | None = None
    on_progress: ProgressCallback | None = None
    # The response of a KServe protocol (v1, v2); None for this server's own routes, which answer themselves.
    render: Callable[[Batch, list[EncodedImage]], Any] | None = None
    model_name: str = ""
    futures: list[Future[GenerationResult]] = field(default_factory=list)
    results: list[GenerationResult] = field(default_factory=list)


@dataclass(frozen=True)
class RouteSpec:
    """A route's metadata, declared by its wire format: its path templates, whether its body may carry input
    images (then --max_image_bytes bounds it instead of --max_body_bytes), and the error body its clients read."""

    paths: tuple[str, ...]
    takes_images: bool = False
    error_body: ErrorBody = PredictorError.body


class RouteTable:
    """The routes' declared metadata, looked up by request path (before routing: the middleware needs it)."""

    def __init__(self, specs: Iterable[RouteSpec]) -> None:
        self._patterns = [(compile_path(path)[0], spec) for spec in specs for path in spec.paths]

    def spec_for(self, path: str) -> RouteSpec | None:
        return next((spec for pattern, spec in self._patterns if pattern.match(path)), None)

    def takes_images(self, path: str) -> bool:
        spec = self.spec_for(path)
        return spec is not None and spec.takes_images

    def error_body(self, path: str, exc: PredictorError) -> dict[str, Any]:
        """The error body in the shape of the route at ``path``; this server's own shape off its routes."""
        spec = self.spec_for(path)
        return exc.body() if spec is None else spec.error_body(exc)


# OpenAPI: this server's own error body.
ERROR_BODY_SCHEMA = {
    "type": "object",
    "required": ["error", "error_type"],
    "properties": {
        "error": {"type": "string"},
        "error_type": {"type": "string"},
        "param": {"type": ["string", "null"]},
    },
}


def error_response(description: str) -> dict[str, Any]:
    """An OpenAPI response of this server's own error body."""
    return {"description": description, "content": {"application/json": {"schema": ERROR_BODY_SCHEMA}}}


# The statuses a generation request can get besides 200, in this server's error body.
ERROR_RESPONSES = {
    "400": error_response("Invalid input"),
    "413": error_response("Request body too large"),
    "500": error_response("The model produced no valid image"),
    "503": error_response("Not ready, overloaded, out of GPU memory or shutting down"),
    "504": error_response("Deadline exceeded"),
}


def json_object(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest("the request body is not valid JSON", param="body") from None
    except ValueError:  # an integer past Python's int-string conversion limit (4300 digits)
        raise InvalidRequest("the request body holds a number too long to read", param="body") from None


def check_count(count: int, param: str, limits: Limits) -> None:
    """How many requests one call carries (v1 instances, v2 prompts)."""
    if count < 1:
        raise InvalidRequest(f"'{param}' must hold at least one request", param=param)
    if count > limits.max_batch_instances:
        raise InvalidRequest(
            f"'{param}' holds {count} requests; at most {limits.max_batch_instances} (--max_batch_instances) per call",
            param=param,
        )
