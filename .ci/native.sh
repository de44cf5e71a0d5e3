#!/usr/bin/env bash
# The native front (native/): its Debian packages, then its build (CMake, -j2 by default).
#   bash .ci/native.sh          packages (as root, where missing), then build
#   bash .ci/native.sh deps     packages only
# Builds native/build/lstm-serve-front and lstm-serve-load (the benchmarks' client); NATIVE_JOBS
# sets the build's parallelism.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES="libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler cmake g++ pkg-config"
missing=""
for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" != "0" ]; then
    echo "native front: missing Debian packages:$missing" >&2
    echo "  as root: apt-get install -y$missing   (then run make native again)" >&2
    exit 3  # .ci/run: skipped (its tests skip), not failed
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
[ "${1:-build}" = deps ] && exit 0

start=$(date +%s)
cmake -S native -B native/build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build native/build -j "${NATIVE_JOBS:-2}"
echo "native front: native/build/lstm-serve-front built in $(( $(date +%s) - start )) s" \
  "(gRPC $(pkg-config --modversion grpc++), protobuf $(pkg-config --modversion protobuf))"
