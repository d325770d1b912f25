#!/usr/bin/env bash
# Installs what the tests and benchmarks need, once: moto (which the project's emulator fronts)
# into .venv/ inside the repository, and the Debian packages prometheus (Prometheus and
# promtool), prometheus-alertmanager (amtool), curl, git and time. Sourced by tests/run.sh and tests/bench.sh.
set -euo pipefail

if [ ! -x .venv/bin/moto_server ] || ! .venv/bin/pip freeze 2>/dev/null | grep -qx 'moto==5.2.5'; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
fi
export STACKWARDEN_MOTO="$PWD/.venv/bin/moto_server"

missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v amtool >/dev/null || missing+=(prometheus-alertmanager)
command -v curl >/dev/null || missing+=(curl)
command -v git >/dev/null || missing+=(git)
[ -x /usr/bin/time ] || missing+=(time)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
