"""`covidxr ood`: fit the not-a-chest-X-ray check (ood.py) for a trained run, measure it, and
store it in the checkpoint.

    covidxr ood --checkpoint covidxr/weights/covidxr-cxrnet.safetensors \\
        --split-csv covidxr/weights/covidxr-cxrnet.split.csv --out runs/shipped

Fits on the run's train split (class means, covariance), sets the threshold on its val split,
then counts false alarms on its test X-rays and detections on the pictures of not_xrays.py
(ood.json, ood_scores.csv, ood_distances.png in `--out`). `--write` stores the fit in the
checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .data import data_dir
from .framing import frame_all, uses_lungs
from .model import build_model
from .not_xrays import non_xray_images
from .ood import OutOfDistribution, fit_for
from .predictor import Predictor


def measure(predictor, detector: OutOfDistribution, test_paths: list[str], out_dir: Path | None = None) -> dict:
    """False alarms on real test X-rays, detection on non-X-ray images, per image in a CSV."""
    rows = []
    for kind, items in (("xray", [(path, path) for path in test_paths]), ("not_xray", non_xray_images())):
        for name, image in tqdm(items, desc=f"ood check: {kind}", unit="img"):
            distance, colour, shape = predictor.ood_scores(image)
            warnings = detector.warnings(distance, colour, shape)
            rows.append({"kind": kind, "name": str(name), "distance": distance, "colourfulness": colour,
                         "small_warning": min(shape) < detector.min_side,
                         "colour_warning": colour > detector.colour_threshold,
                         "feature_warning": distance > detector.threshold, "warned": bool(warnings)})
    table = pd.DataFrame(rows)
    xrays, others = table[table.kind == "xray"], table[table.kind == "not_xray"]
    result = {"threshold": detector.threshold, "percentile": detector.percentile,
              "colour_threshold": detector.colour_threshold,
              "test_xrays": int(len(xrays)), "false_alarms": int(xrays.warned.sum()),
              "false_alarm_rate": float(xrays.warned.mean()),
              "non_xrays": int(len(others)), "detected": int(others.warned.sum()),
              "detection_rate": float(others.warned.mean()),
              "detected_by_features": int(others.feature_warning.sum()),
              "detected_by_colour": int(others.colour_warning.sum()),
              "detected_by_size": int(others.small_warning.sum()),
              "xray_alarms_by_kind": {kind: int(xrays[f"{kind}_warning"].sum()) for kind in ("feature", "colour", "small")},
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=(
        "Fit the not-a-chest-X-ray check for a trained run (train split: class means and covariance; "
        "val split: threshold), measure it, and store it in the checkpoint."))
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split-csv", required=True, help="the run's split.csv")
    parser.add_argument("--data", default=None,
                        help="data folder holding the split's images (default: $COVIDXR_DATA, else ../shared/data/cxr)")
    parser.add_argument("--out", default=None, help="run folder for ood.json, ood_scores.csv and the plot")
    parser.add_argument("--cache-dir", default=None, help="cache the decoded images here (default: no cache)")
    parser.add_argument("--write", action="store_true", help="store the fitted check in the checkpoint")
    args = parser.parse_args(argv)

    predictor = Predictor.load(args.checkpoint)
    root = data_dir(args.data)
    frame = pd.read_csv(args.split_csv)
    frame = frame[frame["split"].isin(["train", "val", "test"])].reset_index(drop=True)
    paths = [str(root / name) for name in frame["filename"]]
    # Framed as the checkpoint reads them (the lungs' box for a lung-reading model).
    images, _ = frame_all(paths, predictor.framing_recipe, predictor.config["input_size"],
                          predictor.config["normalisation"]["method"] == "equalize",
                          predictor.segmenter if uses_lungs(predictor.framing_recipe) else None, args.cache_dir)
    targets = np.array([predictor.classes.index(t) for t in frame["target"]])
    detector = fit_for(predictor, images, targets, frame["split"].to_numpy())
    predictor.ood = detector
    out = Path(args.out or Path(args.checkpoint).parent)
    result = measure(predictor, detector, [p for p, s in zip(paths, frame["split"]) if s == "test"], out)
    print(json.dumps(result, indent=2))
    if args.write:
        state, config = load_checkpoint(args.checkpoint)
        OutOfDistribution.from_checkpoint(state, config)  # drop any earlier fit
        config["ood"] = detector.describe() | {key: result[key] for key in (
            "test_xrays", "false_alarm_rate", "non_xrays", "detection_rate")}
        # The weights as stored, not the predictor's copy (its batch norms are folded for inference).
        model = build_model(config["arch"], len(config["classes"]))
        model.load_state_dict(state)
        save_checkpoint(args.checkpoint, model, {k: v for k, v in config.items() if k != "format"},
                        extra_tensors=detector.tensors())
        print(f"stored in {args.checkpoint}")
    return result
