#!/usr/bin/env bash
# The main job on the embedded default, offline on a CPU: set up .venv (as scripts/test.sh does), then
# train SORSA on the tiny built-in model -> merge -> test, printing the loss falling and the accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
start=$(date +%s)
python run.py --config configs/quickstart.yaml "$@"
python - <<'PY'
from sorsa.train.runs import RunDir
run = RunDir("runs/quickstart")
losses = [(r["step"], r["loss"]) for r in run.read_train_log()]
print("training loss by step: " + ", ".join(f"{s}: {l:.3f}" for s, l in losses[:: max(1, len(losses) // 8)] + losses[-1:]))
res = next(r for r in run.eval_results() if r["eval_dir"] == "gsm-8k")
print(f"test accuracy (built-in arithmetic, GSM-8K protocol): {100 * res['accuracy']:.1f}% ({res['correct']}/{res['total']})")
PY
echo "quickstart finished in $(( $(date +%s) - start )) s; the run is in runs/quickstart/"
