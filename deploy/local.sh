#!/usr/bin/env bash
# Runs stackwarden's main job against a local AWS emulator: installs moto into .venv if needed,
# starts it on a free loopback port (or uses $AWS_ENDPOINT_URL if already set), then runs
# validate, reconcile --once and plan on the desired-state directory (default: desired/).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-desired}"

cargo build --quiet
bin=target/debug/stackwarden

export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}"

if [ -z "${AWS_ENDPOINT_URL:-}" ]; then
  if [ ! -x .venv/bin/moto_server ]; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
  fi
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  MOTO_IAM_LOAD_MANAGED_POLICIES=true .venv/bin/moto_server -H 127.0.0.1 -p "$port" >/tmp/stackwarden-moto.log 2>&1 &
  moto_pid=$!
  trap 'kill $moto_pid 2>/dev/null' EXIT
  export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
  for _ in $(seq 1 100); do
    curl -sf "$AWS_ENDPOINT_URL/moto-api/" >/dev/null 2>&1 && break
    sleep 0.1
  done
  echo "moto listening on $AWS_ENDPOINT_URL (log: /tmp/stackwarden-moto.log)"
fi

set -x
"$bin" validate "$dir"
"$bin" reconcile --once --stats "$dir"
"$bin" plan --stats "$dir"
