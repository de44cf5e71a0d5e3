# syntax=docker/dockerfile:1
# The GPU image's base: CUDA 13 + cuDNN 9 with CPython 3.11. Build it, then the image FROM it:
#   docker build -f deploy/docker/gpu-base.Dockerfile -t lstm-serve-base:gpu deploy/docker
#   docker build --build-arg TARGET=gpu --build-arg BASE_IMAGE=lstm-serve-base:gpu \
#     -t lstm-serve:gpu .
# onnxruntime-gpu 1.31 wheels on PyPI link CUDA 13 (libcudart.so.13, libcublas.so.13) and
# cuDNN 9: keep this tag's CUDA major equal to the onnxruntime-gpu build's (driver >= 580).
# The CUDA images carry no Python 3.11 (Ubuntu 24.04 ships 3.12), so this takes the CPU image's
# CPython from the official python image's /usr/local (built on Debian 12, glibc 2.36; Ubuntu
# 24.04 has glibc 2.39) plus the shared libraries its modules link.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS python-dist

FROM ${CUDA_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libbz2-1.0 libexpat1 libffi8 \
       liblzma5 libncursesw6 libreadline8t64 libsqlite3-0 libssl3t64 libuuid1 zlib1g \
    && rm -rf /var/lib/apt/lists/*
COPY --from=python-dist /usr/local/ /usr/local/
RUN ldconfig && python3.11 --version
