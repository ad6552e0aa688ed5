"""`python -m covidxr ...` is the `covidxr` command (cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
