#!/usr/bin/env bash
# Test full: bash scripts/test_full.sh [llama2_7b|mistral_7b|gemma_7b] [math|code] [run.py flags...]
exec bash "$(dirname "$0")/paper.sh" test full "$@"
