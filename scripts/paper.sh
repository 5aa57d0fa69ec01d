#!/usr/bin/env bash
# One job for one cell of the paper's table: bash scripts/paper.sh JOB METHOD [MODEL] [TASK] [run.py flags...]
#   JOB: train | merge | test      METHOD: sorsa | pissa | lora | full
#   MODEL: llama2_7b (default) | mistral_7b | gemma_7b | rwkv6_7b (no full)      TASK: math (default) | code
# e.g. bash scripts/paper.sh test sorsa llama2_7b math --test-dataset math
set -euo pipefail
cd "$(dirname "$0")/.."
job="$1"; method="$2"; shift 2
model="${1:-llama2_7b}"; task="${2:-math}"; shift $(($# < 2 ? $# : 2))
exec python run.py --config "configs/${model}_${method}_${task}.yaml" --"${job}" "$@"
