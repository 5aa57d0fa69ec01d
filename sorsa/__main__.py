"""`python -m sorsa ...` is `python run.py ...` and the installed `sorsa-run ...` (sorsa/cli.py)."""
from .cli import entry

if __name__ == "__main__":
    entry()
