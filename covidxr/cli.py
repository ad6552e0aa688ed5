"""The `covidxr` command line: one command, a sub-command per stage.

    covidxr predict scans/ --csv predictions.csv      # many files at once
    covidxr serve                                     # the web app
    covidxr SUBCOMMAND --help                         # the options of each

`python -m covidxr` is the same command, built from argparse sub-parsers. Each sub-command is the
`main(argv)` of the module that does the work, imported only when it is run, so `covidxr --help` stays instant and one stage's
dependencies (Gradio for `serve`) are not loaded by another.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from . import __version__

# name: (module, what it does). Options the stages share have one name everywhere:
# --data DIR (the data folder), --checkpoint FILE, --out DIR, --limit N (use only N).
COMMANDS = {
    "predict": ("covidxr.batch", "predict image and DICOM files and folders; CSV and heatmaps"),
    "serve": ("covidxr.app.server", "the web app (Gradio): upload an X-ray, see the label and the heatmap"),
    "train": ("covidxr.training", "train a classifier; writes a run folder"),
    "calibrate": ("covidxr.calibration", "temperature and COVID threshold from k-fold out-of-fold probabilities"),
    "evaluate": ("covidxr.evaluate", "metrics with confidence intervals, per age group and source"),
    "audit": ("covidxr.audit", "shortcut audit: how much of each heatmap lies on the lungs"),
    "segment": ("covidxr.segment", "train the lung U-Net, or draw its masks on a contact sheet"),
    "ood": ("covidxr.ood_measure", "fit, measure and store the not-a-chest-X-ray check"),
    "quality": ("covidxr.quality", "does each model's answer survive a JPEG, a smaller copy or a blur?"),
    "hospitals": ("covidxr.hospitals", "how often a model calls adults of hospitals it never saw COVID"),
    "describe": ("covidxr.checkpoint", "print a checkpoint's description; --card sets what the app says of it"),
    "examples": ("covidxr.examples", "fetch the bundled example X-rays (sha256-checked)"),
    "data": ("covidxr.download", "data download: fetch the training images from their public sources"),
    "bench": ("benchmarks.bench", "speed benchmark (from a checkout: benchmarks/ is not installed)"),
    "loadtest": ("benchmarks.loadtest", "the app under concurrent clients (from a checkout)"),
}

# Stages whose dependencies are an extra of the package, not installed by a plain `pip install`.
EXTRAS = {"serve": "app", "bench": "test", "loadtest": "test"}


def build_parser() -> argparse.ArgumentParser:
    """One sub-parser per command. Each takes no options of its own here: what follows the
    command's name goes, unparsed, to the stage's own parser (parse_known_args), which owns its
    options and its --help."""
    parser = argparse.ArgumentParser(
        prog="covidxr",
        description="COVID-19, normal or other pneumonia on chest X-rays, with the evidence shown. "
                    "Research and teaching only: not a medical device.",
        epilog="`covidxr COMMAND --help` lists a command's options.")
    parser.add_argument("--version", action="version", version=f"covidxr {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    for name, (_, help_) in COMMANDS.items():
        command = commands.add_parser(name, help=help_, add_help=False)
        if name == "data":  # a group of one action for now: `covidxr data download ...`
            actions = command.add_subparsers(dest="action", metavar="ACTION", required=True)
            actions.add_parser("download", help="fetch the training images from their public sources",
                               add_help=False)
    return parser


def _import(name: str, module: str):
    if module.startswith("benchmarks."):
        # The benchmarks are tooling, not part of the installed package: found in a checkout only.
        checkout = Path(__file__).resolve().parents[1]
        if (checkout / "benchmarks").is_dir() and str(checkout) not in sys.path:
            sys.path.insert(0, str(checkout))
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name not in (module, module.rsplit(".", 1)[0]):
            # The stage is there, a package it needs is not: most likely an extra not installed.
            extra = EXTRAS.get(name.split()[0])
            hint = f': pip install "covidxr[{extra}]"' if extra else ""
            raise SystemExit(f"covidxr {name} needs the package {error.name!r}, which is not installed{hint}") from None
        where = ("benchmarks/ sits in the repository, not in the installed package: run it from a checkout"
                 if module.startswith("benchmarks.") else "this version of covidxr does not have it")
        raise SystemExit(f"covidxr {name}: {module} is not available ({where}).") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    name = f"{args.command} {args.action}" if args.command == "data" else args.command
    module = _import(name, COMMANDS[args.command][0])
    # The stage's own parser names itself after sys.argv[0]: "covidxr train", not "covidxr".
    saved = sys.argv[0]
    sys.argv[0] = f"covidxr {name}"
    from .checkpoint import CheckpointError

    try:
        status = module.main(rest)
    except CheckpointError as error:  # a missing or damaged model file: named, and nothing runs
        raise SystemExit(f"covidxr {name}: {error}") from None
    finally:
        sys.argv[0] = saved
    # Stages that return a status (predict, examples, data) pass it on; the others return their
    # results (a report, a run folder), and reaching the end is success.
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
