"""The KServe model server, extended: this server's routes, one error body, safe defaults.

KServe's ``ModelServer`` serves its module-global FastAPI app; ``PredictorServer`` builds a fresh app per
server instead (so tests can build several), registers this server's routes beside KServe's v1/v2 routes,
removes the model repository load/unload routes (anyone could unload the model), and answers every error, without
tracebacks, in the error body of the route's wire format: ``{"error", "error_type", "param"}``, or OpenAI's on the
OpenAI routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import threading
from importlib import metadata

import fastapi.routing
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve import ModelServer
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferRequest
from kserve.protocol.rest.server import RESTServer, _RefreshingServer, metrics_handler
from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
from kserve.protocol.rest.v2_endpoints import register_v2_endpoints
from starlette.exceptions import HTTPException as StarletteHTTPException

from predictor.config import Settings, read_api_keys
from predictor.errors import HTTPError, PredictorError
from predictor.listener import GuardedH11Protocol, ListenerLimits
from predictor.middleware import ApiKeyGuard, RequestGuard
from predictor.model import DiffusionModel
from predictor.protocols import generate, kserve_v1, kserve_v2, openai
from predictor.protocols.base import RouteTable
from predictor.request import Limits
from predictor.routes import register_routes

logger = logging.getLogger(__name__)


# What each wire format declares for its routes (body limit, error shape), for the middleware and the error handlers.
ROUTES = RouteTable((*generate.ROUTES, *kserve_v1.ROUTES, *kserve_v2.ROUTES, *openai.ROUTES))

# Parts of a location that name the body or a union member (KServe types parameters as float|int|bool|str).
_BODY_LOC_PARTS = frozenset({"body", "InferenceRequest", "bytes", "float", "int", "bool", "str"})


class _AsciiJSONResponse(JSONResponse):
    """JSON in ASCII escapes: an error message that quotes the client's text may hold a lone surrogate
    (``"\\ud800"`` is valid JSON), which UTF-8 cannot encode."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def _respond(request: Request, exc: PredictorError) -> JSONResponse:
    """``exc`` as the error body of the wire format whose route it happened on. A refusal (4xx) is logged with its
    reason, one line, so an operator sees why clients fail: the server's own words, which never echo a request's
    values (nor a key)."""
    path = request.scope.get("path", "")
    if 400 <= exc.status_code < 500:
        logger.info("%s %s refused %d %s: %s", request.method, path[:200], exc.status_code, exc.error_type, exc.message)
    body = ROUTES.error_body(path, exc)
    return _AsciiJSONResponse(status_code=exc.status_code, content=body, headers=exc.headers or None)


async def _predictor_error(request: Request, exc: PredictorError) -> JSONResponse:
    if exc.status_code >= 500:
        logger.warning("%s: %s", exc.error_type, exc.message)
    return _respond(request, exc)


async def _kserve_invalid_input(request: Request, exc: InvalidInput) -> JSONResponse:
    # KServe raises these for bodies that are not JSON before our code sees them.
    return _respond(request, HTTPError(400, "invalid_input", str(exc)[:300], "body"))


async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI validated a KServe body model (v2); report it like our own validation does.
    errors = exc.errors()
    error = errors[0] if errors else {}
    if error.get("type") == "json_invalid":
        return _respond(request, HTTPError(400, "invalid_input", "the request body is not valid JSON", "body"))
    # The location starts with "body" and, for union bodies, the model's name: neither is a parameter.
    loc = [str(part) for part in error.get("loc", ()) if part not in _BODY_LOC_PARTS]
    param = ".".join(loc)[:64] or "body"
    if error.get("type") == "missing":
        return _respond(request, HTTPError(400, "invalid_input", f"'{param}' is required", param))
    message = f"'{param}': {error.get('msg', 'invalid value')}"
    return _respond(request, HTTPError(400, "invalid_input", message, param))


async def _not_ready(request: Request, exc: Exception) -> JSONResponse:
    return _respond(request, HTTPError(503, "model_not_ready", str(exc)))


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    error_type = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    failure = HTTPError(exc.status_code, error_type, str(exc.detail), headers=getattr(exc, "headers", None))
    return _respond(request, failure)


async def _repository_disabled(model_name: str) -> JSONResponse:
    raise HTTPError(403, "forbidden", "model load/unload over HTTP is disabled on this server")


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error", exc_info=exc)
    return _respond(request, HTTPError(500, "internal_error", "internal server error"))


def route_list(app: FastAPI, model_name: str) -> list[str]:
    """Every route the app serves, as "METHOD /path" with the model's name in place, read from the app itself;
    the model repository routes, which only refuse, left out."""
    # FastAPI 0.16x keeps included routers whole; iter_route_contexts walks into them.
    walk = getattr(fastapi.routing, "iter_route_contexts", iter)
    listed: dict[str, None] = {}
    refused: set[str] = set()
    for route in walk(app.routes):
        path = str(getattr(route, "path", "")).replace("{model_name}", model_name)
        methods = sorted(set(getattr(route, "methods", None) or ()) - {"HEAD"})
        if getattr(route, "endpoint", None) is _repository_disabled:
            refused.update(f"{method} {path}" for method in methods)
        elif not methods:  # a mounted app: the playground's files
            listed[f"GET {path.rstrip('/')}/"] = None
        else:  # a path registered twice (KServe's and this server's /v2/health/ready) is served by the first
            listed.update(dict.fromkeys(f"{method} {path}" for method in methods))
    return [route for route in listed if route not in refused]


def _version() -> str:
    try:
        return metadata.version("diffusion-predictor")
    except metadata.PackageNotFoundError:  # running from a source tree that was not installed
        return "0+source"


def _hide_repository_routes(app: FastAPI) -> None:
    """Keep the disabled load/unload routes out of the OpenAPI document too."""
    build = app.openapi

    def openapi() -> dict:
        schema = build()
        for path in [p for p in schema.get("paths", {}) if p.startswith("/v2/repository/")]:
            del schema["paths"][path]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_v1_requests(app: FastAPI, limits: Limits) -> None:
    """KServe's v1 predict route reads its body itself, so its OpenAPI entry says nothing of it: state the body this
    server takes there (``{"instances": [generation request, ...]}``, with its limits) and its statuses."""
    build = app.openapi

    def openapi() -> dict:
        schema = build()
        operation = schema.get("paths", {}).get(kserve_v1.PATH, {}).get("post")
        if operation is not None:
            operation.update(kserve_v1.openapi(limits))
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


class PredictorDataPlane(DataPlane):
    """KServe's data plane, whose v2 binary extension (a JSON header of ``Inference-Header-Content-Length`` bytes,
    then each input's raw bytes) answers 400 for every body that does not match its header: KServe reads the length
    with ``int()`` and the tensors with numpy and struct, whose errors would be 500s."""

    def decode_inference_request(self, body: object, headers: dict, model_name: str) -> InferRequest:
        if not isinstance(body, bytes) or INFERENCE_CONTENT_LENGTH_HEADER not in headers:
            return super().decode_inference_request(body, headers, model_name)
        declared = headers[INFERENCE_CONTENT_LENGTH_HEADER]
        if not (declared.isascii() and declared.isdigit() and len(declared) <= 12 and 0 < int(declared) <= len(body)):
            raise InvalidInput(
                f"'Inference-Header-Content-Length' must be the byte length of the JSON header, from 1 to the "
                f"body's {len(body)} bytes"
            )
        try:
            return super().decode_inference_request(body, headers, model_name)
        except InvalidInput:
            raise
        except Exception as exc:  # anything that goes wrong reading the client's bytes is theirs
            logger.info("v2 binary request refused: %s: %s", type(exc).__name__, str(exc)[:200])
            raise InvalidInput(
                "the binary data does not match the JSON header (each input's 'binary_data_size' bytes, in order)"
            ) from None


# Past the grace period the engine answers what is left 503 shutting_down; uvicorn waits this much longer for those
# answers to be written before it cancels what still runs.
ANSWER_MARGIN_S = 5.0
# After a second signal, how long the 503s and streams' error events have to be written before uvicorn stops waiting.
WRITE_S = 0.5


class _Uvicorn(_RefreshingServer):
    """KServe's uvicorn server, whose exit signals also reach the model: the first begins the engine's drain, a
    second (SIGTERM or SIGINT) stops waiting for anything."""

    def __init__(self, config: object, model: DiffusionModel, grace_s: float) -> None:
        super().__init__(config)
        self.model = model
        self.grace_s = grace_s

    def handle_exit(self, sig: int, frame: object) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first:
            logger.info("%s: finishing in-flight requests (up to %g s)", signal.Signals(sig).name, self.grace_s)
            self.model.begin_shutdown(self.grace_s)
        else:
            logger.warning("%s again: answering in-flight requests 503 and exiting now", signal.Signals(sig).name)
            loop = asyncio.get_running_loop()  # signal handlers run on the main thread, which runs the loop
            self.model.abort(then=lambda: loop.call_soon_threadsafe(loop.call_later, WRITE_S, self._stop_waiting))

    def _stop_waiting(self) -> None:
        self.force_exit = True  # uvicorn stops waiting for connections and tasks


class PredictorRESTServer(RESTServer):
    def __init__(
        self, *args, max_body_bytes: int, max_image_bytes: int, api_keys: tuple[str, ...] = (), **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_body_bytes = max_body_bytes
        self.max_image_bytes = max_image_bytes
        self.api_keys = api_keys

    def create_application(self) -> FastAPI:
        app = FastAPI(
            title="diffusion-predictor",
            version=_version(),
            docs_url=None,
            redoc_url=None,
        )
        self._add_middlewares(app)
        app.add_middleware(
            RequestGuard, max_body_bytes=self.max_body_bytes, max_image_bytes=self.max_image_bytes, routes=ROUTES
        )
        if self.api_keys:  # outermost: a request without a key is refused before anything else reads it
            app.add_middleware(ApiKeyGuard, keys=self.api_keys, routes=ROUTES)
        self._register_endpoints(app)
        self._add_exception_handlers(app)
        _hide_repository_routes(app)
        self.config.app = app  # uvicorn serves this instance, not kserve's module-global app
        self.app = app
        return app

    def _register_endpoints(self, app: FastAPI) -> None:
        # Registered first, so they shadow KServe's model repository routes: anyone could unload the model.
        for action in ("load", "unload"):
            app.add_api_route(
                f"/v2/repository/models/{{model_name}}/{action}",
                _repository_disabled,
                methods=["POST"],
                include_in_schema=False,
            )
        # KServe's own routes, without its probes for LLM (OpenAI completions) and time-series models, which
        # this server is not, and whose "not registered" lines read as if the OpenAI images route were missing.
        # KServe's v2 server-ready says ready as soon as the listener is up; here the listener comes up before the
        # model is loaded, so server-ready means every registered model is ready.
        app.add_api_route("/v2/health/ready", self._server_ready, methods=["GET"], tags=["V2"])
        root = APIRouter()
        root.add_api_route("/", self.dataplane.live)
        root.add_api_route("/metrics", metrics_handler, methods=["GET"])
        app.include_router(root)
        register_v1_endpoints(app, self.dataplane, self.model_repository_extension)
        register_v2_endpoints(app, self.dataplane, self.model_repository_extension)

    async def _server_ready(self) -> dict[str, bool]:
        models = self.dataplane.model_registry.get_models().values()
        if not models or not all(model.ready for model in models):
            raise ServerNotReady()
        return {"ready": True}

    def _add_middlewares(self, app: FastAPI) -> None:
        # Not KServe's timing middleware: two log lines per request that uvicorn's access line and /metrics
        # already cover. --enable_latency_logging true adds one line per request with the model's phases.
        if self.access_log_format:  # KServe's custom access log, as KServe sets it up
            from asgi_logger import AccessLoggerMiddleware

            logging.getLogger("uvicorn.access").handlers = []
            app.add_middleware(AccessLoggerMiddleware, format=self.access_log_format)

    async def _model_not_ready(self, request: Request, exc: ModelNotReady) -> JSONResponse:
        # KServe's data plane refuses a model that is not ready: after SIGTERM, say why.
        for model in self.dataplane.model_registry.get_models().values():
            if isinstance(model, DiffusionModel) and model.stopping:
                return _respond(request, model.unavailable())
        return await _not_ready(request, exc)

    async def _model_not_found(self, request: Request, exc: ModelNotFound) -> JSONResponse:
        # KServe's words ("Model with name X does not exist."), and which names this server answers to.
        served = ", ".join(sorted(self.dataplane.model_registry.get_models())) or "none yet"
        return _respond(request, HTTPError(404, "model_not_found", f"{exc} This server serves: {served}."))

    def _add_exception_handlers(self, app: FastAPI) -> None:
        super()._add_exception_handlers(app)
        app.add_exception_handler(PredictorError, _predictor_error)
        app.add_exception_handler(InvalidInput, _kserve_invalid_input)
        app.add_exception_handler(RequestValidationError, _request_validation)
        app.add_exception_handler(ModelNotReady, self._model_not_ready)
        app.add_exception_handler(ServerNotReady, _not_ready)
        app.add_exception_handler(ModelNotFound, self._model_not_found)
        app.add_exception_handler(StarletteHTTPException, _http_exception)
        app.add_exception_handler(Exception, _internal_error)


class PredictorServer(ModelServer):
    def __init__(
        self,
        settings: Settings,
        http_port: int,
        grpc_port: int,
        enable_grpc: bool,
        grpc_options: dict | None = None,
        **kwargs,
    ):
        super().__init__(
            http_port=http_port,
            grpc_port=grpc_port,
            workers=1,
            enable_grpc=enable_grpc,
            enable_docs_url=False,
            grace_period=settings.server.grace_period_s,
            **kwargs,
        )
        self.settings = settings
        self.dataplane = PredictorDataPlane(model_registry=self.registered_models)
        self.grpc_options = grpc_options or {}
        self.api_keys = read_api_keys(settings.server.api_key_file)  # checked when the flags were parsed
        self.model: DiffusionModel | None = None
        self.load_error: BaseException | None = None  # set when the model failed to load: the process exits 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def create_app(self, model: DiffusionModel) -> FastAPI:
        """Register the model and build the HTTP app (without serving it): used by start() and tests."""
        self.register_model(model)
        model.enable_latency_logging = self.enable_latency_logging
        self.model = model
        self._rest_server = PredictorRESTServer(
            "kserve.model_server:app",  # replaced by the app built in create_application
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            access_log_format=self.access_log_format,
            workers=1,
            grace_period=self.grace_period,
            event_loop=self.event_loop,
            timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile,
            max_body_bytes=self.settings.server.max_body_bytes,
            max_image_bytes=self.settings.server.max_image_bytes,
            api_keys=self.api_keys,
        )
        self._guard_listener(model)
        app = self._rest_server.create_application()
        register_routes(app, model, api_key_required=bool(self.api_keys))
        _document_v1_requests(app, model.limits)
        return app

    def _guard_listener(self, model: DiffusionModel) -> None:
        """uvicorn's settings for this server: the listener's limits (predictor.listener), the connection cap, and
        a shutdown in which the model hears the signals and answers what is left before uvicorn gives up."""
        server = self.settings.server
        rest = self._rest_server
        limits = ListenerLimits(server.max_header_bytes, server.header_timeout_s, server.body_timeout_s)
        rest.config.http = functools.partial(GuardedH11Protocol, limits=limits)
        # uvicorn counts the connection a request arrives on: one more than the cap refuses the cap's first extra.
        rest.config.limit_concurrency = server.max_connections + 1
        rest.config.timeout_graceful_shutdown = int(server.grace_period_s + ANSWER_MARGIN_S)
        rest._server = _Uvicorn(rest.config, model, server.grace_period_s)

    def serve(self, model: DiffusionModel) -> None:
        """Load the model in the background and serve until SIGTERM/SIGINT; in-flight requests get
        --grace_period_s to finish. The listener is up while the model loads, compiles and warms up: liveness
        answers, readiness and requests say 503 until the model is ready. A failed load stops the server
        (``load_error`` is then set, and the process exits non-zero)."""
        self.create_app(model)
        model.start_loading(self._load_failed)
        logger.info(
            "serving model %s on port %d: %s; %s",
            model.name,
            self.http_port,
            ", ".join(route_list(self._rest_server.app, model.name)),
            f"POST routes need an API key ({len(self.api_keys)} configured)"
            if self.api_keys
            else "no API key required",
        )
        rest = self._rest_server
        self.servers.append(rest._server.serve())
        if self.enable_grpc:
            from kserve.protocol.grpc.server import GRPCServer

            self._grpc_server = GRPCServer(
                self.grpc_port,
                self.dataplane,
                self.model_repository_extension,
                kwargs=self.grpc_options,  # KServe's gRPC flags (message sizes), as KServe's own start() passes them
                grace_period=self.grace_period,
            )
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            failed = self.load_error is not None
        if failed:  # before the loop ran: stop now
            self.stop(signal.SIGTERM)
        await super()._serve()

    def _load_failed(self, exc: BaseException) -> None:
        """On the loading thread: report the failure and shut the server down."""
        name = self.model.name if self.model is not None else "?"
        logger.error("failed to load model '%s': %s", name, exc, exc_info=logger.isEnabledFor(logging.DEBUG))
        with self._lock:
            self.load_error = exc
            loop = self._loop
        rest = getattr(self._rest_server, "_server", None)
        if rest is not None:
            rest.should_exit = True  # uvicorn checks it on its next tick, even before its start-up is done
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed: the server is stopping anyway
                loop.call_soon_threadsafe(self.stop, signal.SIGTERM)

    def stop(self, sig: int) -> None:
        if self.model is not None and self.model.generation_engine is not None:
            self.model.generation_engine.stop_admitting()
        super().stop(sig)
