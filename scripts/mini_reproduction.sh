#!/usr/bin/env bash
# CPU-scale reproduction of the SORSA paper's comparison (SORSA vs PiSSA vs LoRA vs full fine-tuning) as the
# experiment configs/experiments/mini.yaml: pre-train a small Llama model on synthetic arithmetic, choose each
# method's learning rate on held-out problems, fine-tune 3 seeds, test, analyse, and regenerate
# docs/mini_reproduction.md and docs/mini_reproduction.png (see the wall time measured there; ~25 min on 2 cores).
# --prepare: only build the base model and the data (then: python run.py --experiment configs/experiments/mini.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec python scripts/mini_reproduction.py "$@"
