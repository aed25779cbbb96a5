"""DiffusionModel: the kserve.Model that every route goes through.

preprocess   protocol body (v1 dict, v2 InferRequest, or a RouteCall from this server's routes) -> validated
             params, through the wire format's parser (``predictor.protocols``)
predict      submit the images to the engine and await them (torch runs on the engine's thread only)
postprocess  encode the images (off the event loop) and shape the protocol's response
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kserve import InferRequest, Model
from PIL import Image

from predictor.codec import MEDIA_TYPES, encode_image
from predictor.config import Settings
from predictor.errors import DeadlineExceeded, InvalidRequest, ModelNotLoaded, PredictorError, ShuttingDown
from predictor.images import encode_png
from predictor.jobs import GenerationResult
from predictor.protocols import kserve_v1, kserve_v2
from predictor.protocols.base import Batch, Context, EncodedImage, RouteCall, json_object
from predictor.request import GenerationParams, GenerationRequest, ModelTraits, resolve

if TYPE_CHECKING:  # torch and diffusers are imported by load(), so the HTTP listener can come up before them
    from predictor.engine import GenerationEngine
    from predictor.loading import LoadedPipeline

logger = logging.getLogger(__name__)

# A warm-up that takes longer than this means the device is unusable: fail the load instead of hanging.
_WARMUP_TIMEOUT_S = 600.0
# Grace beyond --request_timeout_s before a request whose step is stuck is answered 504 anyway.
_DEADLINE_SLACK_S = 2.0
# At shutdown, how long a worker still inside a step is waited for before its clients are answered from outside
# (a step of a large model on a slow GPU takes about a second; answering early is harmless, settling is idempotent).
_ABORT_JOIN_S = 1.0


class DiffusionModel(Model):
    def __init__(
        self,
        settings: Settings,
        pipeline_loader: Callable[[Settings], LoadedPipeline] | None = None,
    ):
        super().__init__(settings.model_name, return_response_headers=True)
        self.settings = settings
        self.limits = settings.limits
        # Not "engine": kserve.Model's ``engine`` flag means "call start_engine()" to KServe's server.
        self.generation_engine: GenerationEngine | None = None
        self.loaded: LoadedPipeline | None = None
        self._pipeline_loader = pipeline_loader or _load_from_settings
        self._load_lock = threading.Lock()
        self._load_claimed = False
        self._load_thread: threading.Thread | None = None
        self._load_started_at: float | None = None
        self.stopping = False
        self._draining = False  # begin_shutdown() started the engine's drain
        self.ready = False

    # ---- lifecycle -----------------------------------------------------------------------------

    def load(self) -> bool:
        """Load, compile and warm up, then report ready. Called once: a second call (KServe's data plane calls
        ``load()`` for a model that is not ready yet) returns at once while the first is still under way."""
        if not self._claim_load():
            return self.ready
        return self._load()

    def start_loading(self, on_failure: Callable[[BaseException], None]) -> None:
        """Load on a thread of its own, so the HTTP server answers meanwhile: live, not ready, 503 to requests."""
        if not self._claim_load():
            return

        def run() -> None:
            try:
                self._load()
            except BaseException as exc:  # reported to the server, which stops and exits non-zero
                if not self.stopping:  # a load cut short by shutdown has not failed
                    on_failure(exc)

        self._load_thread = threading.Thread(target=run, name="model-load", daemon=True)
        self._load_thread.start()

    def _claim_load(self) -> bool:
        with self._load_lock:
            claimed, self._load_claimed = self._load_claimed, True
        return not claimed

    def _load(self) -> bool:
        from predictor.engine import create_engine
        from predictor.errors import LoadError

        started = time.perf_counter()
        self._load_started_at = time.monotonic()
        self.loaded = self._pipeline_loader(self.settings)
        if self.stopping:
            return False
        self.limits = self.limits.for_model(self.traits)  # "auto" defaults become the family's
        try:
            self.default_params("check the defaults")  # e.g. --default_steps past what scheduler lcm takes here
        except InvalidRequest as exc:
            raise LoadError(f"the request defaults do not suit this checkpoint: {exc.message}") from None
        engine = create_engine(self.loaded, self.settings.engine)
        engine.start()
        with self._load_lock:
            if self.stopping:  # stop() ran while the engine compiled or started: it did not see this engine
                engine.close(timeout=0)
                return False
            self.generation_engine = engine
        if self.settings.server.warmup_steps:
            warmup = self.default_params("warm-up", steps=self.settings.server.warmup_steps)
            engine.generate(warmup, timeout=_WARMUP_TIMEOUT_S, counted=False)
        self.ready = True
        logger.info("model %s ready in %.1f s", self.name, time.perf_counter() - started)
        return self.ready

    def start(self) -> None:
        # KServe's default marks the model ready here; readiness belongs to load() and its warm-up.
        pass

    def stop(self) -> None:
        """KServe's unload: stop, letting in-flight work finish within the grace period unless a shutdown already
        drains it."""
        engine, draining = self._stop_admitting()
        if engine is not None:
            if draining:  # the drain answered everyone, or is answering them: do not wait for the worker again
                engine.close(timeout=0, join_s=0)
            else:
                engine.close(timeout=self.settings.server.grace_period_s, join_s=_ABORT_JOIN_S)

    def unavailable(self) -> PredictorError:
        """Why a request cannot be served now: 503 shutting_down once a shutdown began, else model_not_ready."""
        if self.stopping:
            return ShuttingDown("the server is shutting down; retry on another replica")
        return ModelNotLoaded(f"model {self.name} is not ready")

    def begin_shutdown(self, grace_s: float) -> None:
        """The first SIGTERM: refuse new work (503 shutting_down), give in-flight work ``grace_s``, then answer what
        is left 503 shutting_down. The drain runs on its own thread: the event loop keeps answering meanwhile."""
        engine, draining = self._stop_admitting(drain=True)
        if engine is not None and not draining:
            threading.Thread(
                target=engine.close, args=(grace_s, _ABORT_JOIN_S), name="shutdown-drain", daemon=True
            ).start()

    def abort(self, then: Callable[[], None]) -> None:
        """The second SIGTERM: answer everything in flight 503 shutting_down now (at the worker's next step
        boundary, or from outside a step that hangs), then call ``then`` (on another thread)."""
        engine, _ = self._stop_admitting(drain=True)

        def answer_all() -> None:
            try:
                if engine is not None:
                    engine.close(timeout=0, join_s=_ABORT_JOIN_S)
            finally:
                then()

        threading.Thread(target=answer_all, name="shutdown-abort", daemon=True).start()

    def _stop_admitting(self, drain: bool = False) -> tuple[GenerationEngine | None, bool]:
        """Mark the model stopping (a load under way stops at its next phase and starts no engine); the engine, and
        whether a drain had already begun."""
        with self._load_lock:
            self.stopping = True
            engine = self.generation_engine
            draining = self._draining
            self._draining = self._draining or drain
        self.ready = False
        if engine is not None:
            engine.stop_admitting()
        return engine, draining

    @property
    def loading(self) -> bool:
        """A load was started and has not finished (nor failed)."""
        thread = self._load_thread
        return thread is not None and thread.is_alive()

    def loading_for(self, now: float | None = None) -> float | None:
        """Seconds the load has been running, None when none is (liveness gives up after --load_timeout_s)."""
        if self.ready or self._load_started_at is None or not self.loading:
            return None
        return (time.monotonic() if now is None else now) - self._load_started_at

    @property
    def traits(self) -> ModelTraits:
        if self.loaded is None:
            raise ModelNotLoaded(f"model {self.name} is not loaded yet")
        return self.loaded.traits

    def default_params(self, prompt: str, steps: int | None = None) -> GenerationParams:
        request = GenerationRequest(prompt=prompt, num_inference_steps=steps, seed=0)
        if "text" not in self.traits.modes:
            size = (self.traits.native_size, self.traits.native_size)
            image = encode_png(Image.new("RGB", size, (128, 128, 128)))
            if "edit" in self.traits.modes:  # an edit-only checkpoint: edit a grey picture, at the native size
                update = {"image": image, "width": size[0], "height": size[1]}
            else:  # an inpainting checkpoint: repaint the whole of a grey picture
                update = {"image": image, "mask": encode_png(Image.new("L", size, 255))}
            request = request.model_copy(update=update)
        return resolve(request, self.limits, self.traits)

    # ---- protocol path -------------------------------------------------------------------------

    def validate(self, payload: Any) -> Any:
        # preprocess already validated everything (predictor.request, through the protocol's parser).
        return payload

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> Batch:
        if not self.ready or self.generation_engine is None:
            raise self.unavailable()
        request_id = (headers or {}).get("x-request-id")
        # A full queue refuses a request with eight 4096 px images as fast as a prompt: before they are decoded.
        self.generation_engine.check_admission()
        # Off the event loop: input images are decoded here (a large PNG takes a fraction of a second).
        batch = await asyncio.to_thread(self._preprocess, payload, request_id)
        streaming = isinstance(payload, RouteCall) and payload.streaming
        if not streaming and any(p.partial_images for p in batch.params):
            raise InvalidRequest(
                "'partial_images' needs a streamed response: /generate with Accept: text/event-stream, or "
                "stream: true on the OpenAI routes",
                param="partial_images",
            )
        return batch

    @property
    def adapters(self) -> Any:
        """The LoRA adapters requests may name (lora.LoraLibrary); None without --lora_dir."""
        return None if self.loaded is None else self.loaded.loras

    def _preprocess(self, payload: Any, request_id: str | None) -> Batch:
        batch = self._parsed(payload, request_id)
        if self.adapters is not None:  # read the adapters' files here, off the worker thread
            self.adapters.prefetch(dict.fromkeys(name for p in batch.params for name, _ in p.loras))
        return batch

    def _parsed(self, payload: Any, request_id: str | None) -> Batch:
        ctx = Context(self.limits, self.name, self._resolve, edits_by_reference="edit" in self.traits.modes)
        if isinstance(payload, RouteCall):
            return Batch(payload.parse(payload.body, ctx), request_id, payload.on_progress)
        if isinstance(payload, InferRequest):
            params = kserve_v2.parse(payload, ctx)
            return Batch(params, payload.id or request_id, render=kserve_v2.render, model_name=self.name)
        if isinstance(payload, bytes):
            # KServe hands over the raw body when the content type is not JSON (curl -d sends a form type).
            payload = json_object(payload)
        if isinstance(payload, dict):
            return Batch(kserve_v1.parse(payload, ctx), request_id, render=kserve_v1.render, model_name=self.name)
        raise InvalidRequest("the request body must be a JSON object", param="body")

    def _resolve(self, request: GenerationRequest, prefix: str) -> GenerationParams:
        return resolve(request, self.limits, self.traits, prefix=prefix, adapters=self.adapters)

    def submit(self, batch: Batch) -> None:
        """Queue the batch's images (503 overloaded / shutting_down raise here, before any response starts)."""
        if self.generation_engine is None:
            raise self.unavailable()
        batch.futures = self.generation_engine.submit(batch.params, on_progress=batch.on_progress)

    async def predict(
        self, batch: Batch, headers: dict[str, str] | None = None, response_headers: dict[str, str] | None = None
    ) -> Batch:
        if not batch.futures:
            self.submit(batch)
        futures = batch.futures
        waiters = [asyncio.wrap_future(future) for future in futures]
        # The engine enforces the deadline between steps; this bound also holds when a step itself hangs.
        timeout_s = self.settings.engine.request_timeout_s
        hard_deadline = None if timeout_s is None else timeout_s + _DEADLINE_SLACK_S
        try:
            _, pending = await asyncio.wait(waiters, timeout=hard_deadline, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            # Client gone (this task cancelled), one image failed, or time is up: stop the others too.
            for future in futures:
                if not future.done():
                    future.cancel()
        failed = [w for w in waiters if w.done() and not w.cancelled() and w.exception() is not None]
        if failed:
            raise failed[0].exception()
        if pending:
            raise DeadlineExceeded(f"the request did not finish within {timeout_s:g} s (--request_timeout_s)")
        batch.results = [w.result() for w in waiters]
        return batch

    async def postprocess(
        self, batch: Batch, headers: dict[str, str] | None = None, response_headers: dict[str, str] | None = None
    ) -> Any:
        encoded = await asyncio.to_thread(_encode_all, batch.results)
        if batch.render is not None:
            return batch.render(batch, encoded)
        # This server's own routes answer with the images themselves; one image's facts go in the headers.
        if response_headers is not None and len(encoded) == 1:
            response_headers.update(encoded[0].headers)
        return encoded


def _load_from_settings(settings: Settings) -> LoadedPipeline:
    from predictor.loading import load_source

    return load_source(settings.source)


def _encode_all(results: list[GenerationResult]) -> list[EncodedImage]:
    encoded = []
    for r in results:
        image = _pasted_back(r) if r.params.paste_back else r.image
        encoded.append(
            EncodedImage(encode_image(image, r.params.output_format), MEDIA_TYPES[r.params.output_format], r)
        )
    return encoded


def _pasted_back(result: GenerationResult) -> Image.Image:
    """The input over the kept area of an inpainted result, by diffusers' own ``apply_overlay``."""
    from diffusers.image_processor import VaeImageProcessor

    params = result.params
    return VaeImageProcessor().apply_overlay(params.mask, params.image, result.image)
