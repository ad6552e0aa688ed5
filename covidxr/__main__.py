"""`python -m covidxr ...` is the `covidxr` command (cli.py)."""

import sys

from .cli import main

sys.exit(main())
