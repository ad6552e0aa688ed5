"""Command line: `python -m covidxr predict PATH... [--recursive] [--csv out.csv] [--cam-dir DIR]`.

(`python -m covidxr ood ...` fits and measures the not-a-chest-X-ray check; see ood.py.
`python -m covidxr data download --out DIR ...` rebuilds the training data; see download.py.)

`predict` is batch.py: it predicts every image file given, or found in the folders given, with
a progress bar, writing each result as it comes. Files that cannot be read get an error row
and the run goes on; the exit status is 1 when any failed.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ood"]:
        from . import ood

        ood.main(argv[1:])
        return 0
    if argv[:2] == ["data", "download"]:
        from . import download

        return download.main(argv[2:])
    if argv[:1] == ["predict"]:
        from . import batch

        return batch.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m covidxr", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ood", help="fit and measure the not-a-chest-X-ray check (see ood.py)", add_help=False)
    commands.add_parser("data", help="`data download --out DIR`: rebuild the training data (see download.py)",
                        add_help=False)
    commands.add_parser("predict", help="predict image or DICOM files and folders (see batch.py)", add_help=False)
    parser.parse_args(argv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
