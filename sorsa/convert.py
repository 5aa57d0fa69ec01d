"""`python -m sorsa.convert from-reference ...`, the converter's command as the design card names it; the converter
is sorsa.tools.convert."""
import sys

from .tools.convert import main

if __name__ == "__main__":
    sys.exit(main())
