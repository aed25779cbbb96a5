# syntax=docker/dockerfile:1
# Optional: the predictor image with weights baked in, for cold starts without a storage download.
#   docker build -t predictor .
#   docker build -f docker/baked.Dockerfile --build-arg BASE_IMAGE=predictor \
#     --build-arg MODEL_ID=CompVis/stable-diffusion-v1-4 -t predictor:sd-v1-4 .
# Then run without storageUris: the weights sit in /opt/model (MODEL_DIR) and nothing is downloaded.
ARG BASE_IMAGE=predictor:latest
FROM ${BASE_IMAGE}
ARG MODEL_ID=CompVis/stable-diffusion-v1-4
ARG REVISION=main
USER 0:0
# Only the safetensors weights and configs: no pickles, no other precisions.
RUN python -c "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1], revision=sys.argv[2], local_dir='/opt/model', allow_patterns=['*.json', '*.txt', '*.safetensors'], ignore_patterns=['*.fp16.*', '*.non_ema.*', '*.ema.*'])" "${MODEL_ID}" "${REVISION}" \
 && rm -rf /tmp/huggingface \
 && chmod -R a+rX /opt/model
ENV MODEL_DIR=/opt/model HF_HUB_OFFLINE=1
USER 10001:10001
