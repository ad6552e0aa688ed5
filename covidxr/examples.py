"""Bundled examples: fetch the X-rays listed in examples/examples.csv into examples/.

The dataset images cannot be committed (their licenses), so the repository lists each example
by the sha256 of its public original and fetches it:

    covidxr examples --from ../shared/data/cxr   # copy from a local dataset folder
    covidxr examples --download                  # or download the public originals
    covidxr examples --describe                  # after a new model ships: its calls, into the CSV

A local copy is found through the dataset's manifest (same sha256); a download is checked
against the sha256 before it is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import urllib.request
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES_CSV = EXAMPLES_DIR / "examples.csv"
FETCH_COMMAND = "covidxr examples --from ../shared/data/cxr"


def read_examples(csv_path: Path = EXAMPLES_CSV) -> pd.DataFrame:
    return pd.read_csv(csv_path, dtype=str, keep_default_na=False)


def available_examples(folder: Path = EXAMPLES_DIR) -> list[tuple[Path, dict]]:
    """(path, row) for every listed example whose file is present."""
    csv_path = folder / "examples.csv"
    if not csv_path.exists():
        return []
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


def _download(examples: pd.DataFrame, dest: Path) -> list[str]:
    failed = []
    for row in tqdm(examples.to_dict("records"), desc="downloading examples", unit="img"):
        try:
            with urllib.request.urlopen(row["source_url"], timeout=60) as response:
                content = response.read()
        except OSError as error:
            print(f"{row['file_name']}: download failed ({error})", file=sys.stderr)
            failed.append(row["file_name"])
            continue
        if hashlib.sha256(content).hexdigest() != row["sha256"]:
            print(f"{row['file_name']}: sha256 mismatch, not kept", file=sys.stderr)
            failed.append(row["file_name"])
            continue
        (dest / row["file_name"]).write_bytes(content)
    return failed


def describe(csv_path: Path, predictor) -> pd.DataFrame:
    """Rewrite the CSV's `model_called` column with what `predictor` decides for each present
    example ("label (p_covid 0.40)"), so the list stays true to the shipped model."""
    examples = read_examples(csv_path)
    for path, row in tqdm(available_examples(csv_path.parent), desc="describing examples", unit="img"):
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
    parser.add_argument("--csv", type=Path, default=EXAMPLES_CSV)
    parser.add_argument("--dest", type=Path, default=None, help="where to put the images (default: beside the CSV)")
    parser.add_argument("--checkpoint", default=None, help="with --describe: the model (default: the shipped one)")
    args = parser.parse_args(argv)

    if args.describe:
        from .predictor import Predictor  # only this mode needs torch

        examples = describe(args.csv, Predictor.load(args.checkpoint))
        print(examples[["file_name", "label", "model_called"]].to_string(index=False))
        return 0
    examples = read_examples(args.csv)
    dest = args.dest or args.csv.parent
    dest.mkdir(parents=True, exist_ok=True)
    if args.dest and args.dest.resolve() != args.csv.parent.resolve():
        shutil.copyfile(args.csv, dest / "examples.csv")
    failed = _copy_from_dataset(examples, args.dataset, dest) if args.dataset else _download(examples, dest)
    print(f"{len(examples) - len(failed)} of {len(examples)} examples in {dest}")
    if failed:
        print("not found: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
