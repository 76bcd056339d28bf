#!/usr/bin/env bash
# Sets up the project and runs the main job on the embedded default (the simulated fabric).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dynamiccl bench --oracle "$@"
