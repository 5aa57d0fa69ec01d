#!/usr/bin/env bash
# CPU-scale reproduction of the SORSA paper's convergence claim (SORSA vs PiSSA vs LoRA, plus full fine-tuning):
# pre-train a small Llama model on synthetic arithmetic, sweep learning rates, fine-tune 3 seeds per method,
# test, analyse; regenerates docs/mini_reproduction.png and docs/mini_reproduction.md (~30 CPU-minutes: ~15 min
# on 2 free CPU cores, 26 min measured on 2 cores shared with other work).
# Extra arguments go to scripts/mini_reproduction.py (--quick: a 2-minute smoke run; --fresh: start over).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec python scripts/mini_reproduction.py "$@"
