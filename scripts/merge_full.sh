#!/usr/bin/env bash
# Merge full: bash scripts/merge_full.sh [llama2_7b|mistral_7b|gemma_7b] [math|code] [run.py flags...]
exec bash "$(dirname "$0")/paper.sh" merge full "$@"
