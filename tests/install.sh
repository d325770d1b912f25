#!/usr/bin/env bash
# Installs what the tests and benchmarks need, once: into .venv/ inside the repository, moto
# (which the project's emulator fronts) and the AWS CLI (which scripts on emulated hosts call);
# the Debian packages prometheus (Prometheus and promtool), prometheus-alertmanager (amtool),
# curl, git, time and dash (the sh pushed scripts run under, as on Ubuntu hosts). Sourced by
# tests/run.sh and tests/bench.sh.
set -euo pipefail

# .venv/requirements.txt records what the virtualenv was made from: a change reinstalls.
if [ ! -x .venv/bin/moto_server ] || ! cmp -s tests/requirements.txt .venv/requirements.txt; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
  cp tests/requirements.txt .venv/requirements.txt
fi
export STACKWARDEN_MOTO="$PWD/.venv/bin/moto_server"

missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v amtool >/dev/null || missing+=(prometheus-alertmanager)
command -v curl >/dev/null || missing+=(curl)
command -v git >/dev/null || missing+=(git)
# The emulator runs pushed scripts under dash, the sh of Ubuntu and Debian hosts.
command -v dash >/dev/null || missing+=(dash)
[ -x /usr/bin/time ] || missing+=(time)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
