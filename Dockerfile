# syntax=docker/dockerfile:1
# Stable Diffusion predictor for KServe. Weights are not baked in: KServe's storage initializer puts them in
# /mnt/models (storageUri). To bake them in for faster cold starts, see docker/baked.Dockerfile.
# checkov:skip=CKV_DOCKER_7: the base image is pinned (python:3.11.14-slim-bookworm) through this build argument
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first, from the hash-pinned lock: this layer is reused until the lock changes.
COPY docker/requirements.lock /tmp/requirements.lock
RUN pip install --require-hashes --no-deps -r /tmp/requirements.lock
COPY pyproject.toml README.md /src/
COPY predictor /src/predictor
RUN pip install --no-deps --no-build-isolation /src

FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
RUN groupadd --system --gid "${UID}" predictor \
 && useradd --system --uid "${UID}" --gid "${UID}" --home-dir /tmp --no-create-home --shell /usr/sbin/nologin predictor
COPY --from=build /opt/venv /opt/venv
# Every cache on /tmp: the container runs with a read-only root filesystem and an emptyDir on /tmp.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MODEL_DIR=/mnt/models
USER 10001:10001
EXPOSE 8080
# For `docker run`; Kubernetes uses the probes in manifests/ instead.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/livez', timeout=4)"]
ENTRYPOINT ["python", "-m", "predictor"]
CMD ["--model_name", "sd"]
