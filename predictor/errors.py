"""Error types and their one HTTP mapping.

Every error a client can see is a ``PredictorError``: it carries the HTTP status, a stable
``error_type`` and, for bad input, the offending ``param``. Failures this server does not raise itself
(KServe's, the web framework's) become one too (``HTTPError``). The body is built from it by the wire format
of the route it happened on (``protocols.base.RouteSpec.error_body``): this server's own
``{"error": ..., "error_type": ..., "param": ...}`` (``body()``) everywhere but on the OpenAI routes, which
wrap the same fields in OpenAI's shape.
"""

from __future__ import annotations

from typing import Any

from kserve.errors import InvalidInput
from starlette.exceptions import HTTPException


class PredictorError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        Exception.__init__(self, message)  # not super(): PayloadTooLarge also inherits Starlette's HTTPException
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """This server's own error body, a superset of KServe's ``{"error"}``."""
        return {"error": self.message, "error_type": self.error_type, "param": self.param}


class HTTPError(PredictorError):
    """A failure reported by KServe or the web framework (an unknown route, a wrong method, KServe's own errors),
    carried as a ``PredictorError`` so that it gets the same error body."""

    def __init__(
        self,
        status_code: int,
        error_type: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message, param, headers)
        self.status_code = status_code
        self.error_type = error_type


class InvalidRequest(PredictorError, InvalidInput):
    """Bad input: 400. Also a kserve ``InvalidInput`` so KServe code paths treat it as such."""

    status_code = 400
    error_type = "invalid_input"

    def __init__(self, message: str, param: str | None = None):
        PredictorError.__init__(self, message, param)
        self.reason = message

    def __str__(self) -> str:
        return self.message


class Unauthorized(PredictorError):
    """No valid API key on a route that needs one."""

    status_code = 401
    error_type = "invalid_api_key"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class PayloadTooLarge(PredictorError, HTTPException):
    """Also a Starlette HTTPException: FastAPI's body parsing re-raises those instead of turning them into 400."""

    status_code = 413
    error_type = "payload_too_large"

    def __init__(self, message: str, param: str | None = None):
        PredictorError.__init__(self, message, param)
        HTTPException.__init__(self, status_code=413, detail=message, headers=self.headers)


class LoadTimedOut(PredictorError):
    """The model has been loading longer than --load_timeout_s: liveness fails so the pod is restarted."""

    status_code = 503
    error_type = "load_timeout"


class ModelNotLoaded(PredictorError):
    status_code = 503
    error_type = "model_not_ready"


class Overloaded(PredictorError):
    status_code = 503
    error_type = "overloaded"


class ShuttingDown(PredictorError):
    status_code = 503
    error_type = "shutting_down"


class OutOfMemory(PredictorError):
    status_code = 503
    error_type = "out_of_memory"


class DeadlineExceeded(PredictorError):
    status_code = 504
    error_type = "timeout"


class GenerationFailed(PredictorError):
    status_code = 500
    error_type = "generation_failed"


class DeviceFailed(PredictorError):
    """An unrecoverable GPU error: the process must be restarted (liveness answers 503)."""

    status_code = 503
    error_type = "device_failed"


class WorkerStopped(PredictorError):
    """The generation worker thread ended (not a device error): the process must be restarted."""

    status_code = 503
    error_type = "worker_stopped"


class LoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do. Not a request's error: the server
    reports it at start and exits (or stays not ready)."""
