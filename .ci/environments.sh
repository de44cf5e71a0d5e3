#!/usr/bin/env bash
# Build each documented environment alone, as a user would in a fresh checkout, for
# tests/e2e/test_environments.py (LSTM_SERVE_ENVIRONMENTS=DIR):
#   DIR/serve        pip install -e .                 (.venv, what `make serve` builds)
#   DIR/export       pip install -e '.[export]'
#   DIR/train        pip install -e '.[train]'
#   DIR/tokenizers   pip install -e '.[tokenizers]'
#   DIR/tracing      pip install -e '.[tracing]'
# Each NAME/src is a copy of this checkout (tracked and unignored files) and NAME/venv its own
# venv, so the five builds run in parallel without sharing an egg-info. pip's cache is shared;
# torch==2.13.0 comes from wherever this machine's pip finds it (never an unpinned torch).
#   usage: .ci/environments.sh DIR [NAME...]     (default: all five)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:?usage: .ci/environments.sh DIR [NAME...]}"
shift
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(serve export train tokenizers tracing)
python="${PYTHON:-python3}"

build() {
  local name="$1" target="$dir/$1" spec=src
  [ "$name" = serve ] || spec="src[$name]"
  rm -rf "$target"
  mkdir -p "$target/src"
  git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -c 2>/dev/null | tar -C "$target/src" -x
  "$python" -m venv "$target/venv"
  (cd "$target" && venv/bin/pip install --disable-pip-version-check -q -e "$spec")
}

mkdir -p "$dir"
start=$(date +%s)
pids=()
for name in "${names[@]}"; do
  build "$name" >"$dir/$name.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!names[@]}"; do
  if wait "${pids[$i]}"; then
    echo "environments.sh: ${names[$i]} built ($(du -sh "$dir/${names[$i]}/venv" | cut -f1))"
  else
    echo "environments.sh: ${names[$i]} FAILED:" && tail -30 "$dir/${names[$i]}.log"
    failed=1
  fi
done
echo "environments.sh: ${names[*]} in $(( $(date +%s) - start )) s"
exit "$failed"
