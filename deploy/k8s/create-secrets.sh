#!/usr/bin/env bash
# Create the Secrets lstm-serve's pods read, once, with generated values. A Secret that already
# exists is kept as it is, never overwritten: running this again (or `kubectl apply -k` of any
# overlay, which renders no Secret) leaves real values alone.
#   usage: deploy/k8s/create-secrets.sh [-n NAMESPACE] [--redis] [--out DIR] [--dry-run]
#
#   lstm-serve-snapshot-key  key: k1:<32 random bytes, base64>, LSTM_SERVE_SNAPSHOT_KEY (the
#                            first KEY_ID:BASE64 signs session snapshots, every one verifies;
#                            rotate with "k2:NEW,k1:OLD", a rollout, then "k2:NEW")
#   lstm-serve-tls           tls.crt, tls.key: a self-signed certificate (EC P-256, 825 days) for
#                            the Services' names and localhost (port-forward); use cert-manager
#                            for a renewed one (docs/OPERATIONS.md, "Exposing lstm-serve")
#   lstm-serve-auth          tokens: `principal:token` lines; one caller, `client`, random token
#   lstm-serve-redis         password (--redis: the redis-sentinel overlay's Redis and server)
#
# What a client needs is left in DIR (default ./lstm-serve-secrets, mode 700) when its Secret is
# created: ca.crt (the self-signed certificate, for --tls-ca) and tokens (LSTM_SERVE_TOKEN is the
# part after the colon). Keys never touch DIR.
# --dry-run prints the Secrets as YAML instead of creating them (kubectl --dry-run=client: no
# cluster needed; tests/e2e/test_deploy_k8s_secrets.py starts a server with them).
# Needs kubectl ($KUBECTL if set) and openssl.
set -euo pipefail

namespace=lstm-serve
out=./lstm-serve-secrets
redis=false
dry_run=false
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--namespace) namespace="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --redis) redis=true; shift ;;
    --dry-run) dry_run=true; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "create-secrets.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
kubectl="${KUBECTL:-kubectl}"
for tool in "$kubectl" openssl; do
  command -v "$tool" >/dev/null || { echo "create-secrets.sh: $tool is not installed" >&2; exit 2; }
done

umask 077
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

# create NAME KUBECTL-CREATE-SECRET-ARGS...: unless NAME exists (kept: returns 1), or print it
# (--dry-run). A kubectl error (no such namespace, no cluster) stops the script.
create() {
  local name="$1"
  shift
  if "$dry_run"; then
    echo "---"
    "$kubectl" create secret "$@" --namespace "$namespace" --dry-run=client -o yaml || exit 1
  elif "$kubectl" --namespace "$namespace" get secret "$name" >/dev/null 2>&1; then
    echo "secret/$name exists in $namespace: kept (delete it first to replace it)" >&2
    return 1
  else
    "$kubectl" create secret "$@" --namespace "$namespace" >&2 || exit 1
  fi
}

printf 'k1:%s' "$(openssl rand -base64 32)" > "$work/key"
create lstm-serve-snapshot-key generic lstm-serve-snapshot-key --from-file=key="$work/key" || true

names="DNS:localhost,IP:127.0.0.1"
for service in lstm-serve lstm-serve-headless; do
  for suffix in "" ".$namespace" ".$namespace.svc" ".$namespace.svc.cluster.local"; do
    names="$names,DNS:$service$suffix"
  done
done
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
  -subj "/CN=lstm-serve.$namespace.svc" -addext "subjectAltName=$names" \
  -keyout "$work/tls.key" -out "$work/tls.crt" 2>/dev/null
if create lstm-serve-tls tls lstm-serve-tls --cert="$work/tls.crt" --key="$work/tls.key"; then
  cp "$work/tls.crt" "$out/ca.crt"
  echo "clients verify the server with --tls-ca $out/ca.crt" >&2
fi

printf '# principal:token (one per line)\nclient:%s\n' "$(openssl rand -hex 32)" > "$work/tokens"
if create lstm-serve-auth generic lstm-serve-auth --from-file=tokens="$work/tokens"; then
  cp "$work/tokens" "$out/tokens"
  echo "the caller 'client' has the token after the colon in $out/tokens (LSTM_SERVE_TOKEN)" >&2
fi

if "$redis"; then
  openssl rand -base64 32 | tr -d '\n' > "$work/password"
  create lstm-serve-redis generic lstm-serve-redis --from-file=password="$work/password" || true
fi
