#!/usr/bin/env bash
# The test suite: CPU, offline, tiny models. Creates .venv on first use (torch first, from TORCH_SPEC,
# default torch==2.13.0), then installs the project with its test extras and runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec python -m pytest -q "$@"
