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
# The native front (native/, C++; docs/NATIVE_FRONT.md) is built in a stage of its own with the
# base's gRPC packages (Debian bookworm: gRPC 1.51); the runtime installs only the shared
# libraries it links (read from ldd) and runs it with LSTM_SERVE_NATIVE_FRONT=true. The default
# stays the Python front.
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

# ---- native: the native front, compiled with the base's own gRPC C++ packages ---------------
FROM ${BASE_IMAGE} AS native
WORKDIR /src
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler cmake g++ make \
       pkg-config \
    && rm -rf /var/lib/apt/lists/*
COPY native/CMakeLists.txt ./native/
COPY native/src/ ./native/src/
COPY proto/lstmserve/v1/ ./proto/lstmserve/v1/
# /out/runtime-packages: the packages holding the libraries the binary links (ldd -> dpkg -S),
# which the runtime installs instead of the -dev packages and the compiler.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN cmake -S native -B native/build -DCMAKE_BUILD_TYPE=Release >/dev/null \
    && cmake --build native/build -j "$(nproc)" \
    && install -D -s native/build/lstm-serve-front /out/lstm-serve-front \
    && ldd /out/lstm-serve-front | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | xargs realpath \
       | { xargs dpkg -S 2>/dev/null || true; } | cut -d: -f1 | sort -u > /out/runtime-packages \
    && grep -q '^libgrpc++' /out/runtime-packages

# ---- runtime: the venv, the models, the native front, a non-root user ----------------------
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
COPY --from=native /out/runtime-packages /tmp/native-front-packages
# hadolint ignore=DL3008
RUN apt-get update \
    && xargs -a /tmp/native-front-packages env DEBIAN_FRONTEND=noninteractive \
       apt-get install -y --no-install-recommends \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /tmp/native-front-packages
COPY --from=native /out/lstm-serve-front /usr/local/bin/lstm-serve-front
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN ! ldd /usr/local/bin/lstm-serve-front | grep "not found"
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
    LSTM_SERVE_LOG_JSON=true \
    LSTM_SERVE_NATIVE_FRONT=false
WORKDIR /app
USER 10001:10001
# Triton's ports: HTTP/REST (KServe v2), gRPC, metrics.
EXPOSE 8000 8001 8002
# Kubernetes probes gRPC health natively; this is for docker run / compose.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]
ENTRYPOINT ["lstm-serve"]
