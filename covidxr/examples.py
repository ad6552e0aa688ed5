"""Bundled examples: fetch the X-rays listed in covidxr/lists/examples.csv.

The dataset images cannot be committed (their licenses), so the package lists each example by
the sha256 of its public original and fetches it:

    covidxr examples --download                  # download the public originals (sha256-checked)
    covidxr examples --from ../shared/data/cxr   # or copy them from a local dataset folder
    covidxr examples --describe                  # after a new model ships: its calls, into the list

The list is package data, so an installed covidxr finds it from any folder. The images go to
`examples/` in a checkout, else to the user's cache folder (~/.cache/covidxr/examples), or
wherever $COVIDXR_EXAMPLES says; `covidxr serve` shows them from there. A local copy is found
through the dataset's manifest (same sha256); a download is checked against the sha256 before
it is kept (download.fetch_verified, the one downloader for data and examples).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from .checkpoint import checkpoint_path
from .download import DownloadError, fetch_verified, mirrored

EXAMPLES_CSV = Path(__file__).resolve().parent / "lists" / "examples.csv"
EXAMPLES_ENV = "COVIDXR_EXAMPLES"
FETCH_COMMAND = "covidxr examples --download"


def examples_dir() -> Path:
    """Where the example images live: $COVIDXR_EXAMPLES, else examples/ in a checkout, else the
    user's cache folder (an installed package's own folder may not be writable)."""
    if os.environ.get(EXAMPLES_ENV):
        return Path(os.environ[EXAMPLES_ENV])
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / "examples"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "covidxr" / "examples"



def read_examples(csv_path: Path = EXAMPLES_CSV) -> pd.DataFrame:
    return pd.read_csv(csv_path, dtype=str, keep_default_na=False)


def available_examples(folder: Path | None = None) -> list[tuple[Path, dict]]:
    """(path, row) for every listed example whose file is present in `folder` (default: the
    examples folder). The list is the folder's own examples.csv if it has one, else the package's."""
    folder = Path(folder) if folder is not None else examples_dir()
    csv_path = folder / "examples.csv" if (folder / "examples.csv").is_file() else EXAMPLES_CSV
    return [(folder / row["file_name"], row) for row in read_examples(csv_path).to_dict("records")
            if (folder / row["file_name"]).is_file()]


def _copy_from_dataset(examples: pd.DataFrame, dataset: Path, dest: Path) -> list[str]:
    manifest = pd.read_csv(dataset / "manifest.csv", dtype=str, keep_default_na=False)
    by_sha = dict(zip(manifest["sha256"], manifest["filename"]))
    missing = []
    for row in tqdm(examples.to_dict("records"), desc="copying examples", unit="img"):
        source = by_sha.get(row["sha256"])
        if source is None or not (dataset / source).is_file():
            missing.append(row["file_name"])
            continue
        shutil.copyfile(dataset / source, dest / row["file_name"])
    return missing


def _download(examples: pd.DataFrame, dest: Path, mirror: str | None = None) -> list[str]:
    failed = []
    for row in tqdm(examples.to_dict("records"), desc="downloading examples", unit="img"):
        try:
            content = fetch_verified(mirrored(row["source_url"], mirror), row["sha256"])
        except DownloadError as error:
            print(f"{row['file_name']}: not kept ({error})", file=sys.stderr)
            failed.append(row["file_name"])
            continue
        (dest / row["file_name"]).write_bytes(content)
    return failed


def describe(csv_path: Path, predictor, folder: Path | None = None) -> pd.DataFrame:
    """Rewrite the CSV's `model_called` column with what `predictor` decides for each example
    present in `folder` ("label (p_covid 0.40)"), so the list stays true to the shipped model."""
    examples = read_examples(csv_path)
    for path, row in tqdm(available_examples(folder or examples_dir()), desc="describing examples", unit="img"):
        prediction = predictor.predict(path)
        called = f"{prediction.verdict.shown_label} (p_covid {prediction.probabilities.get('covid', float('nan')):.2f})"
        examples.loc[examples["file_name"] == row["file_name"], "model_called"] = called
    examples.to_csv(csv_path, index=False)
    return examples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="dataset", type=Path, help="local dataset folder holding manifest.csv")
    source.add_argument("--download", action="store_true", help="download the public originals (sha256-checked)")
    source.add_argument("--describe", action="store_true",
                        help="write the model's call for each fetched example into the CSV's model_called column")
    parser.add_argument("--csv", type=Path, default=EXAMPLES_CSV, help="the list (default: the package's)")
    parser.add_argument("--dest", type=Path, default=None,
                        help=f"where to put the images (default: ${EXAMPLES_ENV}, else examples/ in a checkout, "
                             "else ~/.cache/covidxr/examples; the app shows them from there)")
    parser.add_argument("--mirror", default=None, metavar="URL",
                        help="with --download: replace the URLs' scheme and host by this one (as `covidxr data download`)")
    parser.add_argument("--checkpoint", type=checkpoint_path, metavar="FILE_OR_NAME", default=None,
                        help="with --describe: the model (default: the shipped one)")
    args = parser.parse_args(argv)

    if args.describe:
        from .predictor import Predictor  # only this mode needs torch

        examples = describe(args.csv, Predictor.load(args.checkpoint), args.dest)
        print(examples[["file_name", "label", "model_called"]].to_string(index=False))
        return 0
    examples = read_examples(args.csv)
    dest = args.dest or examples_dir()
    dest.mkdir(parents=True, exist_ok=True)
    if args.csv.resolve() != EXAMPLES_CSV and args.csv.resolve() != (dest / "examples.csv").resolve():
        shutil.copyfile(args.csv, dest / "examples.csv")  # another list: it goes with its images
    failed = (_copy_from_dataset(examples, args.dataset, dest) if args.dataset
              else _download(examples, dest, args.mirror))
    print(f"{len(examples) - len(failed)} of {len(examples)} examples in {dest}")
    if failed:
        print("not found: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
