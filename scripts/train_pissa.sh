#!/usr/bin/env bash
# Train pissa: bash scripts/train_pissa.sh [llama2_7b|mistral_7b|gemma_7b|rwkv6_7b] [math|code] [run.py flags...]
exec bash "$(dirname "$0")/paper.sh" train pissa "$@"
