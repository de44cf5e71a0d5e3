#!/bin/sh
# Install lstm-serve for the serving image into the active Python (the image's /opt/venv).
#   usage: deploy/docker/install.sh cpu|gpu [SOURCE_DIR]   (SOURCE_DIR defaults to .)
# The Dockerfile's build stage runs this, and so does tests/unit/test_deploy_docker.py in a fresh
# venv, so the image's install cannot drift from pyproject.toml unnoticed.
#   cpu: the base dependencies (onnxruntime, numpy, grpc, prometheus-client, ...) and the
#        `tracing` extra (OpenTelemetry, off unless --trace-otlp-endpoint); no other extra, so
#        never torch (the `train` extra).
#   gpu: the same list with onnxruntime swapped for the `gpu` extra (onnxruntime-gpu), resolved
#        in one pip call: the two wheels share the `onnxruntime` package directory, and
#        "install both, uninstall onnxruntime" would delete files onnxruntime-gpu needs.
# Then the project itself with --no-deps (its dependencies are already there).
set -eu
target="${1:?usage: install.sh cpu|gpu [SOURCE_DIR]}"
src="${2:-.}"
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python}"

reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
"$python" "$here/requirements.py" "$target" "$src/pyproject.toml" > "$reqs"
echo "install.sh: $target requirements:" && sed 's/^/  /' "$reqs"

"$python" -m pip install --no-cache-dir --disable-pip-version-check -r "$reqs"
"$python" -m pip install --no-cache-dir --disable-pip-version-check --no-deps "$src"
"$python" -m pip check
