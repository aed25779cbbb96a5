"""Prometheus metrics, served on KServe's /metrics (prometheus_client's default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)

QUEUE_DEPTH = Gauge("diffusion_queue_depth", "Images waiting for a batch slot", ["model_name"])
ACTIVE_IMAGES = Gauge("diffusion_active_images", "Images in the denoising loop", ["model_name"])
BATCH_SIZE = Histogram(
    "diffusion_batch_size",
    "Images advanced by one batched denoising step",
    ["model_name"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
)
STEP_SECONDS = Histogram(
    "diffusion_step_seconds",
    "Duration of one batched denoising step",
    ["model_name"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
REQUEST_SECONDS = Histogram(
    "diffusion_image_seconds",
    "Time from admission to a finished image, queueing included",
    ["model_name"],
    buckets=_LATENCY_BUCKETS,
)
IMAGES = Counter("diffusion_images_total", "Images generated", ["model_name"])
FAILURES = Counter("diffusion_failures_total", "Images not delivered, by reason", ["model_name", "error_type"])
COMPILED_GRAPHS = Gauge(
    "diffusion_compiled_graphs",
    "Graphs torch.compile has built (constant after warm-up: no recompiles)",
    ["model_name"],
)


class ModelMetrics:
    """One model's series, labelled once: ``labels()`` is a locked lookup, too slow to repeat on every step."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.queue_depth = QUEUE_DEPTH.labels(model_name=model_name)
        self.active_images = ACTIVE_IMAGES.labels(model_name=model_name)
        self.batch_size = BATCH_SIZE.labels(model_name=model_name)
        self.step_seconds = STEP_SECONDS.labels(model_name=model_name)
        self.image_seconds = REQUEST_SECONDS.labels(model_name=model_name)
        self.images = IMAGES.labels(model_name=model_name)
        self.compiled_graphs = COMPILED_GRAPHS.labels(model_name=model_name)

    def failures(self, error_type: str) -> Counter:
        return FAILURES.labels(model_name=self.model_name, error_type=error_type)
