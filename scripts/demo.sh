#!/usr/bin/env bash
# Sets up the project and runs the main job on the embedded default: `dynamiccl demo` (a server and
# an agent on loopback, simulated GPU fabrics tuning online, a real gloo training run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dynamiccl demo "$@"
