#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test.
#   - moto (which the project's emulator fronts) into .venv/ inside the repository;
#   - Prometheus and promtool (Debian package prometheus): the config push runs against a real
#     Prometheus; amtool (package prometheus-alertmanager) checks the default alertmanager
#     definition the way Alertmanager itself reads it;
#   - the Rust tests (unit tests of every crate and the one integration test binary).
# The integration tests start the emulator (tests/emulator) and its moto on free loopback ports,
# and fail loudly when moto is missing; they never skip.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/moto_server ] || ! .venv/bin/pip freeze 2>/dev/null | grep -qx 'moto==5.2.5'; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
fi
export STACKWARDEN_MOTO="$PWD/.venv/bin/moto_server"

missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v amtool >/dev/null || missing+=(prometheus-alertmanager)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cargo test --workspace "$@"
