"""Batch prediction: `covidxr predict PATH... [--recursive] [--csv out.csv] [--cam-dir DIR]`.

Predicts every image file given, or found in the folders given, with a progress bar. Files
that cannot be read are reported one by one and skipped; the exit status is 1 when any failed.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from tqdm.auto import tqdm

from .data import IMAGE_SUFFIXES, ImageLoadError
from .explain import METHODS
from .predictor import Predictor

DICOM_SUFFIXES = {".dcm", ".dicom"}


def collect(paths: list[str], recursive: bool) -> list[Path]:
    """Files named directly, plus image and DICOM files inside the folders named."""
    found = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            pattern = path.rglob("*") if recursive else path.glob("*")
            found += sorted(p for p in pattern
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES)
        else:
            found.append(path)
    return found


def predict_files(predictor: Predictor, files: list[Path], cam_dir: Path | None, method: str) -> tuple[list[dict], int]:
    rows, failures = [], 0
    if cam_dir:
        cam_dir.mkdir(parents=True, exist_ok=True)
    for path in tqdm(files, desc="predicting", unit="img"):
        try:
            if cam_dir:
                explanation = predictor.explain(path, method=method)
                prediction = explanation.prediction
                explanation.overlay.save(cam_dir / f"{path.stem}_{method}.png")
            else:
                prediction = predictor.predict(path)
        except ImageLoadError as error:
            failures += 1
            tqdm.write(f"error: {error}", file=sys.stderr)
            rows.append({"file": str(path), "label": "", "error": str(error),
                         **{f"p_{c}": "" for c in predictor.classes}, "warning": ""})
            continue
        rows.append({"file": str(path), "label": prediction.label, "error": "",
                     **{f"p_{c}": f"{p:.4f}" for c, p in prediction.probabilities.items()},
                     "warning": "; ".join(prediction.warnings)})
    return rows, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="files or folders")
    parser.add_argument("--recursive", action="store_true", help="also look in sub-folders")
    parser.add_argument("--csv", type=Path, help="write file, label, every probability, warning, error")
    parser.add_argument("--cam-dir", type=Path, help="also save a heatmap overlay PNG per image here")
    parser.add_argument("--method", default="gradcam", choices=sorted(METHODS))
    parser.add_argument("--checkpoint", default=None, help="safetensors checkpoint (default: the shipped model)")
    args = parser.parse_args(argv)

    predictor = Predictor.load(args.checkpoint)
    files = collect(args.paths, args.recursive)
    if not files:
        print("no image files found", file=sys.stderr)
        return 1
    rows, failures = predict_files(predictor, files, args.cam_dir, args.method)
    columns = ["file", "label", *[f"p_{c}" for c in predictor.classes], "warning", "error"]
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    for row in rows:
        print("\t".join(str(row[c]) for c in columns if c != "error" or row["error"]))
    print(f"{len(rows) - failures} predicted, {failures} failed", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
