#!/usr/bin/env bash
# Creates .venv and installs DynamICCL with its test tools. Idempotent: reinstalls only
# when pyproject.toml changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.dynamiccl-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # The CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
    .venv/bin/python -m pip install --quiet "torch==${DYNAMICCL_TORCH_VERSION:-2.13.0}"
    .venv/bin/python -m pip install --quiet -e ".[test,torch,demo]"
    echo "$want" > "$stamp"
fi
