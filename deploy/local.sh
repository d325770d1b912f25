#!/usr/bin/env bash
# Runs stackwarden's main job against the local AWS emulator: installs moto into .venv if
# needed, starts the project's emulator (tests/emulator, which starts its own moto) on a free
# loopback port, or uses $AWS_ENDPOINT_URL if already set; then runs validate,
# reconcile --once and plan on the desired-state directory (default: desired/).
#
# Run Command pushes report success without running anything, as moto's do: the files and
# reload commands of a desired state (`systemctl restart ...`) are meant for EC2 hosts, not for
# this machine. The tests run pushes for real, in sandboxes of their own.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-desired}"

cargo build --quiet --bin stackwarden
cargo build --quiet -p stackwarden-emulator
bin=target/debug/stackwarden

export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}"

if [ -z "${AWS_ENDPOINT_URL:-}" ]; then
  if [ ! -x .venv/bin/moto_server ] || ! cmp -s tests/requirements.txt .venv/requirements.txt; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
    cp tests/requirements.txt .venv/requirements.txt
  fi
  log=/tmp/stackwarden-emulator.log
  coproc EMULATOR { exec target/debug/stackwarden-emulator --listen 127.0.0.1:0 \
    --moto-server .venv/bin/moto_server 2>"$log"; }
  trap 'kill $EMULATOR_PID 2>/dev/null' EXIT
  # The emulator prints endpoint=<url> once it serves.
  read -r line <&"${EMULATOR[0]}" || { cat "$log"; exit 1; }
  export AWS_ENDPOINT_URL="${line#endpoint=}"
  echo "emulator listening on $AWS_ENDPOINT_URL (log: $log)"
fi

set -x
"$bin" validate "$dir"
"$bin" reconcile --once --stats "$dir"
"$bin" plan --stats "$dir"
