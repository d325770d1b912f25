#!/usr/bin/env bash
# The test command: installs what the tests need (tests/install.sh: moto into .venv/, the Debian
# packages prometheus and prometheus-alertmanager), then runs every test: the unit tests of
# every crate and the one integration test binary. The integration tests start the emulator
# (tests/emulator) and its moto on free loopback ports, and a real Prometheus where they need
# one; they fail loudly when any of these is missing, and never skip.
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/install.sh

cargo test --workspace "$@"
