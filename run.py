"""The command line of the design card; the same as the installed `sorsa-run` (sorsa/cli.py holds it)."""
from sorsa.cli import entry

if __name__ == "__main__":
    entry()
