#!/usr/bin/env bash
# Sets up the project and runs the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/postgres.sh
PATH="$(bash scripts/prometheus.sh):$PATH"  # prometheus and promtool for tests/deploy
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
