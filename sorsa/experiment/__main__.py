"""`python -m sorsa.experiment FILE.yaml [flags]` is `python run.py --experiment FILE.yaml [flags]`: the command
line has one owner (run.py builds every flag from the settings' dataclasses), so this hands over to it."""
import os
import sys
from pathlib import Path

RUN_PY = Path(__file__).resolve().parents[2] / "run.py"

if __name__ == "__main__":
    if not RUN_PY.is_file():
        sys.exit(f"error: {RUN_PY} not found; run the experiment from a checkout: python run.py --experiment FILE.yaml")
    os.execv(sys.executable, [sys.executable, str(RUN_PY), "--experiment", *sys.argv[1:]])
