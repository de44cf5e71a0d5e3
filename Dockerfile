# syntax=docker/dockerfile:1
# lstm-serve serving image: onnxruntime + numpy + gRPC, never torch (docs/OPERATIONS.md).
#   CPU (default): docker build -t lstm-serve:cpu .
#   GPU:           docker build -f deploy/docker/gpu-base.Dockerfile -t lstm-serve-base:gpu deploy/docker
#                  docker build --build-arg TARGET=gpu --build-arg BASE_IMAGE=lstm-serve-base:gpu \
#                    -t lstm-serve:gpu .
# Any builder: both stages start FROM the BASE_IMAGE argument, never from a stage whose name is
# built from an argument (BuildKit resolves `FROM base-${TARGET}`, buildah 1.28 does not). CI
# builds this file with buildah on a Debian base (.ci/image.sh, tests/e2e/test_image.py).
# The package install is deploy/docker/install.sh, which tests/e2e/test_deploy_docker_scripts.py
# also runs in a fresh venv: the image installs exactly pyproject.toml's base dependencies and the
# `tracing` extra (CPU), or those with onnxruntime swapped for the `gpu` extra (GPU). No other
# extra, so no torch.
# Pin the base by digest for reproducible releases (NAME:TAG@sha256:...).

ARG TARGET=cpu
# Any image with python3.11 (and its venv module) on PATH, useradd and groupadd.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: a venv with the service installed (wheels only, no compiler needed) -------------
FROM ${BASE_IMAGE} AS build
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
FROM ${BASE_IMAGE} AS runtime
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
