"""`covidxr ood`: measure the not-a-chest-X-ray check (xray_check.py), and fit, measure and
store the feature-distance warning (ood.py) for a trained run.

    covidxr ood --checkpoint covidxr/weights/covidxr-cxrnet.safetensors \\
        --split-csv covidxr/weights/covidxr-cxrnet.split.csv --out runs/shipped

The refusal (xray_check.py; no classifier involved) is measured on
- the run's test X-rays, as they are and after each simulated change of hospital (shifts.py):
  false refusals;
- X-rays from hospitals in no training source (`--external`, default ../shared/data/external/*):
  false refusals;
- the pictures of not_xrays.py: missed refusals;
into check.json and check_scores.csv (one row per image, with the evidence) in `--out`.

The feature warning is fitted on the run's train split (class means, covariance), its threshold
set on the val split, and its warnings counted on the test X-rays and the non-X-rays (ood.json,
ood_scores.csv, ood_distances.png). `--write` stores that fit in the checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .data import data_dir, load_image
from .model import build_model
from .not_xrays import non_xray_images
from .ood import OutOfDistribution, fit_for
from .predictor import SHIPPED_CHECKPOINT, Predictor
from .shifts import SHIFTS, shifted
from .xray_check import XrayCheck, fit_template


def measure(predictor, detector: OutOfDistribution, test_paths: list[str], out_dir: Path | None = None) -> dict:
    """The feature warning: how often it fires on real test X-rays and on non-X-ray images,
    per image in a CSV. (It warns only; the refusal is measured by `measure_check`.)"""
    rows = []
    for kind, items in (("xray", [(path, path) for path in test_paths]), ("not_xray", non_xray_images())):
        for name, image in tqdm(items, desc=f"feature warning: {kind}", unit="img"):
            distance, colour, shape = predictor.ood_scores(image)
            rows.append({"kind": kind, "name": str(name), "distance": distance, "colourfulness": colour,
                         "warned": bool(detector.warnings(distance))})
    table = pd.DataFrame(rows)
    xrays, others = table[table.kind == "xray"], table[table.kind == "not_xray"]
    result = {"threshold": detector.threshold, "percentile": detector.percentile,
              "test_xrays": int(len(xrays)), "false_alarms": int(xrays.warned.sum()),
              "false_alarm_rate": float(xrays.warned.mean()),
              "non_xrays": int(len(others)), "detected": int(others.warned.sum()),
              "detection_rate": float(others.warned.mean()),
              "missed": others.loc[~others.warned, "name"].tolist()}
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(out_dir) / "ood_scores.csv", index=False)
        (Path(out_dir) / "ood.json").write_text(json.dumps(result, indent=2))
        _plot(table, detector, Path(out_dir) / "ood_distances.png")
    return result


def _plot(table, detector: OutOfDistribution, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    top = float(np.percentile(table.distance, 99)) * 1.1
    bins = np.linspace(0, top, 50)
    for kind, label in (("xray", "test chest X-rays"), ("not_xray", "not X-rays")):
        axis.hist(table.loc[table.kind == kind, "distance"].clip(upper=top), bins=bins, alpha=0.6, label=label)
    axis.axvline(detector.threshold, color="k", linestyle="--", label=f"threshold ({detector.percentile}th pct of val)")
    axis.set_xlabel("Mahalanobis distance of penultimate features")
    axis.set_ylabel("images")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _wilson(k: int, n: int) -> list[float]:
    from scipy.stats import binomtest

    if not n:
        return [0.0, 1.0]
    interval = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(interval.low), float(interval.high)]


EVIDENCE = ("area", "confidence", "undecided", "template_iou", "notch")  # check_scores.csv's columns, per side


def measure_check(check: XrayCheck, segmenter, test_paths: list[str], external: dict[str, list[str]],
                  shifts: list[str], out_dir: Path | None = None) -> dict:
    """The refusal: false refusals on test X-rays, on simulated hospital changes of them and on
    X-rays of other hospitals; missed refusals on the pictures of not_xrays.py. One row per
    image in check_scores.csv (with the evidence), the summary in check.json."""
    rows = []

    def examine(group: str, name: str, image, shift: str = "") -> None:
        gray, colour = load_image(image)
        finding = check.examine(gray, colour, segmenter)
        lungs, inverse = finding.evidence.get("lungs", {}), finding.evidence.get("inverse_lungs", {})
        rows.append({"group": group, "shift": shift, "name": str(name), "refused": finding.refused,
                     "inverted_warning": any("inverted" in w for w in finding.warnings),
                     "reasons": " | ".join(finding.reasons), "colourfulness": colour,
                     **{f"lungs_{k}": lungs.get(k) for k in EVIDENCE},
                     **{f"inverse_{k}": inverse.get(k) for k in EVIDENCE}})

    for path in tqdm(test_paths, desc="check: test X-rays", unit="img"):
        gray = load_image(path)[0]
        examine("test X-rays", path, gray)
        for index, name in enumerate(shifts):
            examine("test X-rays, shifted", path, shifted(gray, name, seed=index), name)
    for hospital, paths in external.items():
        for path in tqdm(paths, desc=f"check: {hospital}", unit="img"):
            examine(f"external: {hospital}", path, path)
    for name, image in tqdm(non_xray_images(), desc="check: not X-rays", unit="img"):
        examine("not X-rays", name, image)
    table = pd.DataFrame(rows)
    result = {"rules": {k: v for k, v in check.rules.items() if k != "lungs"} | {
        "lungs": {k: v for k, v in check.rules.get("lungs", {}).items() if k != "template"}}}
    for (group, shift), part in table.groupby(["group", "shift"], sort=False):
        key = f"{group}: {shift}" if shift else group
        k, n = int(part.refused.sum()), len(part)
        result[key] = {"images": n, "refused": k, "rate": k / n, "ci95": _wilson(k, n),
                       "inverted_warnings": int(part.inverted_warning.sum())}
    xrays = table[table.group != "not X-rays"]
    others = table[table.group == "not X-rays"]
    result["all X-rays"] = {"images": len(xrays), "refused": int(xrays.refused.sum()),
                            "rate": float(xrays.refused.mean()), "ci95": _wilson(int(xrays.refused.sum()), len(xrays))}
    result["not X-rays"]["missed"] = others.loc[~others.refused, "name"].tolist()
    result["not X-rays"]["by_reason"] = {reason: int(others.reasons.str.contains(reason).sum()) for reason in
                                         ("too small", "blank", "in colour", "No pair of lungs")}
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(out_dir) / "check_scores.csv", index=False)
        (Path(out_dir) / "check.json").write_text(json.dumps(result, indent=2))
    return result


def external_sets(folders: list[str] | None, root: Path) -> dict[str, list[str]]:
    """{hospital: image paths} from folders holding a manifest.csv (or images/ only)."""
    if folders is None:
        base = root.parent / "external"
        folders = sorted(str(p) for p in base.iterdir() if (p / "manifest.csv").exists()) if base.is_dir() else []
    found = {}
    for folder in map(Path, folders):
        manifest = folder / "manifest.csv"
        if manifest.exists():
            found[folder.name] = [str(folder / name) for name in pd.read_csv(manifest)["filename"]]
        else:
            found[folder.name] = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in
                                        (".png", ".jpg", ".jpeg", ".dcm"))
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=(
        "Measure the not-a-chest-X-ray check (false refusals on test X-rays, their simulated hospital changes "
        "and other hospitals' X-rays; missed refusals on pictures that are not X-rays), and fit, measure and "
        "store a run's feature-distance warning."))
    parser.add_argument("--checkpoint", type=checkpoint_path, metavar="FILE_OR_NAME", default=None,
                        help="the run's checkpoint (default: the shipped model)")
    parser.add_argument("--split-csv", required=True, help="the run's split.csv (its test rows are measured)")
    parser.add_argument("--data", default=None,
                        help="data folder holding the split's images (default: $COVIDXR_DATA, else ../shared/data/cxr)")
    parser.add_argument("--external", action="append", default=None, metavar="DIR",
                        help="a folder of X-rays from another hospital (a manifest.csv and its images), repeatable "
                             "(default: every folder in ../shared/data/external beside the data folder)")
    parser.add_argument("--shifts", nargs="*", default=sorted(SHIFTS), choices=sorted(SHIFTS), metavar="SHIFT",
                        help=f"simulated hospital changes applied to each test X-ray (default: all: {', '.join(sorted(SHIFTS))})")
    parser.add_argument("--limit", type=int, default=None, help="use only N test X-rays and N per hospital")
    parser.add_argument("--check-only", action="store_true",
                        help="measure the refusal only; do not fit the feature warning")
    parser.add_argument("--out", default=None, help="folder for check.json, check_scores.csv, ood.json, ood_scores.csv "
                        "and the plot (default: the checkpoint's folder)")
    parser.add_argument("--cache-dir", default=None, help="cache the decoded images here (default: no cache)")
    parser.add_argument("--write", action="store_true", help="store the fitted feature warning in the checkpoint")
    parser.add_argument("--fit-template", default=None, metavar="RULES_JSON",
                        help="first refit the check's lung template on the split's training X-rays with the "
                             "checkpoint's lung model and write the rules, with it, to this file (then measured); "
                             "needed after the lung model is retrained")
    args = parser.parse_args(argv)

    checkpoint = args.checkpoint or str(SHIPPED_CHECKPOINT)
    predictor = Predictor.load(checkpoint)
    root = data_dir(args.data)
    frame = pd.read_csv(args.split_csv)
    frame = frame[frame["split"].isin(["train", "val", "test"])].reset_index(drop=True)
    paths = [str(root / name) for name in frame["filename"]]
    test_paths = [p for p, s in zip(paths, frame["split"]) if s == "test"][:args.limit]
    out = Path(args.out or Path(checkpoint).parent)
    external = {name: found[:args.limit] for name, found in external_sets(args.external, root).items()}
    if args.fit_template:
        training = [p for p, s in zip(paths, frame["split"]) if s == "train"]
        rules = predictor.xray_check.rules | {"lungs": predictor.xray_check.rules["lungs"] | {"template": fit_template(
            (load_image(p)[0] for p in tqdm(training, desc="template: training X-rays", unit="img")),
            predictor.segmenter)}}
        Path(args.fit_template).write_text(json.dumps(rules))
        predictor.xray_check = XrayCheck(rules)
    result = {"refusal": measure_check(predictor.xray_check, predictor.segmenter, test_paths, external, args.shifts, out)}
    if args.check_only:
        print(json.dumps(result, indent=2))
        return result
    # Framed as the checkpoint reads them (the lungs' box for a lung-reading model).
    images = predictor.frame_files(paths, args.cache_dir)
    targets = np.array([predictor.classes.index(t) for t in frame["target"]])
    detector = fit_for(predictor, images, targets, frame["split"].to_numpy())
    predictor.ood = detector
    warning = measure(predictor, detector, test_paths, out)
    result["feature_warning"] = warning
    print(json.dumps(result, indent=2))
    if args.write:
        state, config = load_checkpoint(checkpoint)
        OutOfDistribution.from_checkpoint(state, config)  # drop any earlier fit
        config["ood"] = detector.describe() | {key: warning[key] for key in (
            "test_xrays", "false_alarm_rate", "non_xrays", "detection_rate")}
        # The weights as stored, not the predictor's copy (its batch norms are folded for inference).
        model = build_model(config["arch"], len(config["classes"]))
        model.load_state_dict(state)
        save_checkpoint(checkpoint, model, {k: v for k, v in config.items() if k != "format"},
                        extra_tensors=detector.tensors())
        print(f"stored in {checkpoint}")
    return result
