# syntax=docker/dockerfile:1
# A KServe modelcar: the files of a diffusers pipeline that the server reads, in an OCI image whose /models the
# predictor sees as /mnt/models (storageUri oci://...). Nodes pull and cache it like any image, so a cold pod on a
# node that already ran it moves no weights at all. Build it from a pipeline directory (a Hub snapshot or a
# save_pretrained output), named as the build context "model":
#   docker build -f docker/model.Dockerfile --build-context model=/path/to/pipeline \
#     --build-arg VARIANT=fp16 -t registry.example.com/diffusion-models/stable-diffusion-v1-4:fp16 .
# VARIANT: auto (fp16 when every component has it), none (the plain files), or a variant name.
# The cluster must enable modelcars: "enableModelcar": true in the storageInitializer section of KServe's
# inferenceservice-config ConfigMap (manifests/kserve/overlays/modelcar).
# checkov:skip=CKV_DOCKER_7: both base images are pinned through build arguments
# checkov:skip=CKV_DOCKER_2: the image holds files only; KServe runs it as a sidecar that sleeps
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG BUSYBOX_IMAGE=busybox:1.37.0

FROM ${PYTHON_IMAGE} AS stage
ARG VARIANT=auto
COPY predictor/weights.py /weights.py
# The standard library only: predictor/weights.py copies just what the server reads (configs, tokenizers, one
# variant's safetensors), never pickles, single-file checkpoints, ONNX or Flax copies.
RUN --mount=type=bind,from=model,target=/src python /weights.py stage /src /models --variant "${VARIANT}" \
 && chmod -R a+rX /models

# KServe's modelcar sidecar runs `sh -c "ln -sf /proc/$$/root/models /mnt/models && sleep infinity"`: busybox
# has both, and adds about 4 MB to the weights.
FROM ${BUSYBOX_IMAGE}
COPY --from=stage /models /models
USER 1010:1010
