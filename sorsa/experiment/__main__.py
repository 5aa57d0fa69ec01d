"""`python -m sorsa.experiment FILE.yaml [flags]` is `sorsa-run --experiment FILE.yaml [flags]`: the package's own
command line (sorsa.cli), not the checkout's run.py."""
import sys

from ..cli import entry

if __name__ == "__main__":
    sys.argv[1:1] = ["--experiment"]
    entry()
