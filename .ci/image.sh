#!/usr/bin/env bash
# Build the CPU serving image from the Dockerfile with buildah (Debian's package: no daemon,
# --isolation chroot), as CI does; tests/e2e/test_image.py then runs it (LSTM_SERVE_IMAGE).
#   usage: .ci/image.sh IMAGE        e.g. .ci/image.sh localhost/lstm-serve:ci
# The Dockerfile's base is the official python image; where no registry answers (CI), a base is
# made here from Debian packages (debootstrap bookworm: python3.11 + venv, the same CPython
# minor) and passed as BASE_IMAGE. That base trusts the CAs this machine trusts (pip goes through
# the same proxy as the host's). Prints the image size; the base is removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
image="${1:?usage: .ci/image.sh IMAGE}"
official="docker.io/library/python:3.11-slim-bookworm"

need=""
command -v buildah >/dev/null || need="$need buildah"
command -v debootstrap >/dev/null || need="$need debootstrap"
if [ -n "$need" ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi

# The Debian mirror this machine's apt uses (deb822 or one-line sources), else Debian's own.
debian_mirror() {
  local uri
  uri="$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
    | grep -v security | grep -oE 'https?://[^ ]+' | head -n 1 || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}

# A python:3.11 base from Debian packages, as an image named $1.
debian_base() {
  local name="$1" root ctr mnt
  root="$(mktemp -d /var/tmp/lstm-serve-base.XXXXXX)"
  trap 'rm -rf "$root" "$root.log"; trap - RETURN' RETURN
  debootstrap --variant=minbase \
    --include=python3.11,python3.11-venv,python3-distutils,python3-lib2to3,ca-certificates \
    bookworm "$root" "$(debian_mirror)" >"$root.log" 2>&1 || { tail -20 "$root.log"; return 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/locale
  cp "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" "$root/etc/ssl/certs/ca-certificates.crt"
  ctr="$(buildah from scratch)"
  mnt="$(buildah mount "$ctr")"
  tar -C "$root" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . | tar -C "$mnt" -x
  buildah umount "$ctr" >/dev/null
  buildah config --env LANG=C.UTF-8 --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    --cmd /bin/bash "$ctr"
  buildah commit -q --rm "$ctr" "$name" >/dev/null
}

start=$(date +%s)
base="$official"
# The base made here is removed however the build ends (the image keeps its layers).
trap '[ "$base" = "$official" ] || buildah rmi "$base" >/dev/null 2>&1 || true' EXIT
if ! timeout 300 buildah pull -q "$official" >/dev/null 2>&1; then
  base="localhost/lstm-serve-base:${image##*:}"
  echo "image.sh: $official cannot be pulled; base from Debian packages: $base"
  debian_base "$base"
fi
echo "image.sh: base ready in $(( $(date +%s) - start )) s"

# --format docker keeps HEALTHCHECK (the OCI format has none).
buildah bud --isolation chroot --network host --format docker --quiet \
  --build-arg BASE_IMAGE="$base" -t "$image" . >/dev/null
size="$(buildah images --format '{{.Size}}' "$image")"
echo "image.sh: built $image ($size) in $(( $(date +%s) - start )) s"
