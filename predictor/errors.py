"""Error types and their one HTTP mapping.

Every error a client can see is a ``PredictorError``: it carries the HTTP status, a stable
``error_type`` and, for bad input, the offending ``param``. ``server.py`` turns it into the one
error body, ``{"error": ..., "error_type": ..., "param": ...}``; the OpenAI-compatible route
wraps the same fields in OpenAI's shape.
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
        return {"error": self.message, "error_type": self.error_type, "param": self.param}


class InvalidRequest(PredictorError, InvalidInput):
    """Bad input: 400. Also a kserve ``InvalidInput`` so KServe code paths treat it as such."""

    status_code = 400
    error_type = "invalid_input"

    def __init__(self, message: str, param: str | None = None):
        PredictorError.__init__(self, message, param)
        self.reason = message

    def __str__(self) -> str:
        return self.message


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
