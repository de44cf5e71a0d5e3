# syntax=docker/dockerfile:1
# lstm-serve serving image: onnxruntime + numpy + gRPC, never torch (docs/OPERATIONS.md).
#   CPU (default): docker build -t lstm-serve:cpu .
#   GPU:           docker build --build-arg TARGET=gpu -t lstm-serve:gpu .
# The package install is deploy/docker/install.sh, which tests/unit/test_deploy_docker.py also
# runs in a fresh venv: the image installs exactly pyproject.toml's base dependencies (CPU), or
# those with onnxruntime swapped for the `gpu` extra (GPU). No `train` extra, so no torch.
# Pin the bases by digest for reproducible releases (NAME:TAG@sha256:...).

ARG TARGET=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu 1.31 wheels on PyPI link CUDA 13 (libcudart.so.13, libcublas.so.13) and
# cuDNN 9: keep this tag's CUDA major equal to the onnxruntime-gpu build's (driver >= 580).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---- bases: one per TARGET; BuildKit builds only the one `base-${TARGET}` names -------------
FROM ${PYTHON_IMAGE} AS base-cpu

FROM ${PYTHON_IMAGE} AS python-dist

# The CUDA images carry no Python 3.11 (Ubuntu 24.04 ships 3.12), so the GPU base takes the
# same CPython as the CPU image from the official python image's /usr/local (built on Debian
# 12, glibc 2.36; Ubuntu 24.04 has glibc 2.39) plus the shared libraries its modules link.
FROM ${CUDA_IMAGE} AS base-gpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libbz2-1.0 libexpat1 libffi8 \
       liblzma5 libncursesw6 libreadline8t64 libsqlite3-0 libssl3t64 libuuid1 zlib1g \
    && rm -rf /var/lib/apt/lists/*
COPY --from=python-dist /usr/local/ /usr/local/
RUN ldconfig && python3.11 --version

# ---- build: a venv with the service installed (wheels only, no compiler needed) -------------
# hadolint ignore=DL3006
FROM base-${TARGET} AS build
ARG TARGET
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ ./service/
COPY lstmserve/ ./lstmserve/
COPY deploy/docker/install.sh deploy/docker/requirements.py ./deploy/docker/
RUN python3.11 -m venv /opt/venv \
    && sh deploy/docker/install.sh "${TARGET}" . \
    && python -c "import service.server" \
    && ! python -c "import torch" 2>/dev/null

# ---- runtime: the venv, the models, a non-root user ----------------------------------------
# hadolint ignore=DL3006
FROM base-${TARGET} AS runtime
ARG TARGET
LABEL org.opencontainers.image.title="lstm-serve" \
      org.opencontainers.image.description="gRPC server for recurrent sequence classifiers (ONNX)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.lstm-serve.target="${TARGET}"
RUN groupadd --system --gid 10001 lstm \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /app \
       --shell /usr/sbin/nologin lstm
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /app/healthcheck.py
# The model repository: baked in here; mount a volume over /app/models to serve others.
COPY models/ /app/models/
# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only on Kubernetes (pip compiled the
# venv's .pyc files at build time).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LSTM_SERVE_MODEL_REPOSITORY=/app/models \
    LSTM_SERVE_HOST=0.0.0.0 \
    LSTM_SERVE_HTTP_PORT=8000 \
    LSTM_SERVE_GRPC_PORT=8001 \
    LSTM_SERVE_METRICS_PORT=8002 \
    LSTM_SERVE_LOG_JSON=true
WORKDIR /app
USER 10001:10001
# Triton's ports: HTTP/REST (KServe v2), gRPC, metrics.
EXPOSE 8000 8001 8002
# Kubernetes probes gRPC health natively; this is for docker run / compose.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]
ENTRYPOINT ["lstm-serve"]
