"""Batch prediction: `covidxr predict PATH... [--recursive] [--csv out.csv] [--cam-dir DIR]`.

Predicts every image or DICOM file named, or found in the folders named, with a progress bar.
Nothing finished is lost: each file's result is printed (after a header line) and written to
the CSV, flushed, as soon as it is known; a file that fails gets an error row and the run goes
on (an unexpected error also prints its traceback). In folders, what is named like an image
but is no file (a folder, a FIFO, a socket, a symbolic link loop) is reported as skipped, with
the reason. Files named directly are always tried. The exit status is 1 when any file failed.

Each row is the file's verdict (report.py), the same as the app's: the decided class, or for an
input that is no frontal chest X-ray the refusal with no class in the label column; the lung
focus and lungs-outside notice of the Grad-CAM map of the decided class; warnings; the error.

File names that are not valid UTF-8, and control characters in them, are printed and written
escaped (`\\xe9`), so any name on disk gets its row. A cell that a spreadsheet would run as a
formula (`=1+2.png`: it starts with =, +, -, @, a tab or a carriage return) gets a leading `'`
(OWASP's rule for CSV injection). Heatmaps are written at most CAM_MAX_SIDE pixels a side: the
map is made for the image shrunk first, so a 64-megapixel file costs no 64-megapixel overlay.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from . import report
from .checkpoint import checkpoint_path
from .data import IMAGE_SUFFIXES, ImageLoadError, not_a_file
from .explain import METHODS, SCORING_SIDE, identical_methods
from .legend import captioned
from .predictor import Predictor
from .quality import held

PREDICTED = "predicted"

DICOM_SUFFIXES = {".dcm", ".dicom"}
# What a spreadsheet reads as the start of a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# Heatmap overlays are written at most this many pixels a side (the prediction still reads the
# whole image): a 64-megapixel input's full-size map, overlay and mask peaked at 4.7 GB.
CAM_MAX_SIDE = 2048


@dataclass
class Entry:
    path: Path
    skipped: str = ""  # why it is not predicted; empty for files to predict


def collect(paths: list[str], recursive: bool) -> list[Entry]:
    """Files named directly, plus what is named like an image or DICOM file in the folders named."""
    entries = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            _scan_folder(path, recursive, entries)
        else:
            entries.append(Entry(path))  # always tried: what is wrong with it is an error, not a skip
    return entries


def _scan_folder(folder: Path, recursive: bool, entries: list[Entry]) -> None:
    try:
        listing = sorted(os.scandir(folder), key=lambda item: item.name)
    except OSError as error:
        entries.append(Entry(folder, skipped=f"{folder.name}: cannot list this folder ({error.strerror})"))
        return
    for item in listing:
        path = Path(item.path)
        named_like_an_image = path.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES
        if _is_folder(item):
            # Linked folders are not followed, so a link back up cannot loop.
            if recursive and not item.is_symlink():
                _scan_folder(path, recursive, entries)
            elif named_like_an_image:
                entries.append(Entry(path, skipped=f"{path.name}: a folder, not an image file"))
        elif named_like_an_image:
            reason = not_a_file(path)  # e.g. a FIFO or a link loop; an empty or broken file fails later
            entries.append(Entry(path, skipped=f"{path.name}: {reason}" if reason else ""))


def _is_folder(item: os.DirEntry) -> bool:
    try:
        return item.is_dir()
    except OSError:  # e.g. a symbolic link loop
        return False


def printable(text: str) -> str:
    """`text` as valid UTF-8 without control characters: bytes of a file name that are not UTF-8
    (Python holds them as surrogates) and control characters become `\\xNN`."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    decoded = raw.decode("utf-8", "backslashreplace")
    return re.sub(r"[\x00-\x1f\x7f]", lambda match: f"\\x{ord(match.group()):02x}", decoded)


def spreadsheet_safe(cell: str) -> str:
    """`cell`, with a leading `'` when a spreadsheet would run it as a formula."""
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


class Results:
    """Each row, as soon as it is known: a tab-separated line on stdout and a CSV row, flushed."""

    def __init__(self, columns: list[str], csv_path: Path | None):
        self.columns = columns
        self.handle = None
        if csv_path:
            csv_path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(csv_path, "w", newline="", encoding="utf-8")
            self.writer = csv.DictWriter(self.handle, fieldnames=columns)
            self.writer.writeheader()
            self.handle.flush()
        tqdm.write("\t".join(columns), file=sys.stdout)

    def write(self, row: dict) -> None:
        row = {column: spreadsheet_safe(printable(str(row.get(column, "")))) for column in self.columns}
        tqdm.write("\t".join(row.values()), file=sys.stdout)
        if self.handle:
            self.writer.writerow(row)
            self.handle.flush()

    def close(self) -> None:
        if self.handle:
            self.handle.close()


def predict_files(predictor: Predictor, entries: list[Entry], results: Results, cam_dir: Path | None,
                  method: str, cam_target: str | None = None, quality_check: bool = False) -> Counter:
    """Predict every entry, writing each row as it comes; counts of predicted, failed, skipped.
    With `quality_check`, each row also says whether the label held when the file was compressed,
    shrunk and blurred (quality.held)."""
    counts = Counter(predicted=0, failed=0, skipped=0)
    saved_names: set[str] = set()
    if cam_dir:
        cam_dir.mkdir(parents=True, exist_ok=True)
    for entry in tqdm(entries, desc="predicting", unit="img"):
        path = entry.path
        if entry.skipped:
            counts["skipped"] += 1
            tqdm.write(f"skipped: {printable(entry.skipped)}", file=sys.stderr)
            results.write({"file": str(path), **report.csv_fields(report.failure(f"skipped: {entry.skipped}"),
                                                                   predictor.classes)})
            continue
        try:
            verdict = analyse(predictor, path, cam_dir, method, cam_target, saved_names)
        except ImageLoadError as error:
            counts["failed"] += 1
            tqdm.write(f"error: {printable(str(error))}", file=sys.stderr)
            results.write({"file": str(path), **report.csv_fields(report.failure(str(error)), predictor.classes)})
            continue
        except Exception as error:  # noqa: BLE001 - one file's surprise must not end the run
            counts["failed"] += 1
            tqdm.write(f"unexpected error on {printable(str(path))}:\n{printable(traceback.format_exc())}",
                       file=sys.stderr)
            failed = report.failure(f"unexpected error: {type(error).__name__}: {error}"[:500])
            results.write({"file": str(path), **report.csv_fields(failed, predictor.classes)})
            continue
        counts["predicted"] += 1
        row = {"file": str(path), **report.csv_fields(verdict, predictor.classes)}
        if quality_check:
            row["label_held"] = label_held(predictor, path, verdict)
        results.write(row)
    return counts


def label_held(predictor: Predictor, path: Path, verdict: report.Verdict) -> str:
    """'yes', or 'no: ' and the copies under which the label changed; empty without a result."""
    if verdict.status != report.RESULT:
        return ""
    tested = held(predictor, path)
    return "yes" if tested.label_held else "no: " + ", ".join(tested.changed)


def analyse(predictor: Predictor, path: Path, cam_dir: Path | None, method: str, cam_target: str | None,
            saved_names: set[str]) -> report.Verdict:
    """One file's verdict (report.py), as the app gives it: the label or the refusal, and the
    lung focus and lungs-outside notice of the map the notice is measured on (Grad-CAM of the
    decided class). With `cam_dir`, also the heatmap PNG of `method` for `cam_target` (default:
    the decided class), with a caption strip saying what it shows."""
    rule = report.notice_rule(predictor.config)
    # (Lung focus and the notice are scored at explain.SCORING_SIDE whatever the size drawn.)
    scored = predictor.explain(path, method=rule["method"], max_side=CAM_MAX_SIDE if cam_dir else SCORING_SIDE)
    verdict = scored.verdict
    if cam_dir:
        same = identical_methods(predictor.config)
        same_map = method == rule["method"] or method in same.get(rule["method"], ()) or \
            rule["method"] in same.get(method, ())
        wanted = cam_target if cam_target in predictor.classes else None
        drawn = scored if same_map and wanted in (None, scored.target) else \
            predictor.explain(path, method=method, target=wanted, max_side=CAM_MAX_SIDE)
        picture = captioned(drawn.overlay, report.caption(drawn.verdict))
        picture.save(cam_dir / _unique_name(f"{path.stem}_{method}", saved_names))
    return verdict


def _unique_name(stem: str, used: set[str]) -> str:
    """`stem.png`, or `stem-2.png`, ... when two inputs share a stem (a/x.png and b/x.png)."""
    name, number = f"{stem}.png", 1
    while name in used:
        number += 1
        name = f"{stem}-{number}.png"
    used.add(name)
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="covidxr predict", description=__doc__.split("\n\n")[1].split(".")[0] + ".")
    parser.add_argument("paths", nargs="+", help="files or folders")
    parser.add_argument("--recursive", action="store_true", help="also look in sub-folders")
    parser.add_argument("--csv", type=Path, help="write file, label, every probability, lung_focus, chance_focus, notice, "
                        "warning, error (a refused input's label is 'not a frontal chest X-ray', never a class)")
    parser.add_argument("--cam-dir", type=Path, help="also save a heatmap overlay PNG per image here, captioned "
                        "with the class, method and probability it shows and the colour scale")
    parser.add_argument("--method", default="gradcam", choices=sorted(METHODS), help="the heatmaps' method")
    parser.add_argument("--cam-target", default=PREDICTED, metavar="CLASS",
                        help="the class whose evidence the heatmaps show (default: the predicted class)")
    parser.add_argument("--checkpoint", type=checkpoint_path, metavar="FILE_OR_NAME", default=None,
                        help="safetensors checkpoint (default: the shipped model)")
    parser.add_argument("--quality", action="store_true",
                        help="add a column label_held: does the label hold when the file is compressed (JPEG "
                             "quality 30), shrunk (256 px) and blurred? (three more predictions a file)")
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # a terminal that cannot show a character gets an escape
        sys.stdout.reconfigure(errors="backslashreplace")

    entries = collect(args.paths, args.recursive)
    if not any(not entry.skipped for entry in entries):
        for entry in entries:
            print(f"skipped: {printable(entry.skipped)}", file=sys.stderr)
        print("no image files found", file=sys.stderr)
        return 1
    predictor = Predictor.load(args.checkpoint)
    if args.cam_target not in (PREDICTED, *predictor.classes):
        parser.error(f"--cam-target: choose {PREDICTED} or one of {', '.join(predictor.classes)}")
    columns = ["file", "label", *[f"p_{c}" for c in predictor.classes], "lung_focus", "chance_focus", "notice",
               *(["label_held"] if args.quality else []), "warning", "error"]
    try:
        results = Results(columns, args.csv)
    except OSError as error:
        print(f"cannot write {printable(str(args.csv))}: {error.strerror or error}", file=sys.stderr)
        return 2
    try:
        counts = predict_files(predictor, entries, results, args.cam_dir, args.method,
                               None if args.cam_target == PREDICTED else args.cam_target, args.quality)
    except KeyboardInterrupt:
        print("interrupted: the rows above are complete" + (f" and in {args.csv}" if args.csv else ""),
              file=sys.stderr)
        return 130
    finally:
        results.close()
    skipped = " (named like images but no files: folders, FIFOs, link loops)" if counts["skipped"] else ""
    print(f"{counts['predicted']} predicted, {counts['failed']} failed, {counts['skipped']} skipped{skipped}",
          file=sys.stderr)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
