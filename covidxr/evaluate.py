"""Evaluation stage: honest metrics for a checkpoint on images it has not seen.

    covidxr evaluate --checkpoint runs/x/model.safetensors --out runs/x/eval

Only patients the model was neither trained nor tuned on are scored: the checkpoint's own split
file (runs/x/split.csv, or NAME.split.csv beside a shipped NAME.safetensors) says which;
without one the command refuses unless told --all-patients.

Reports accuracy; per class sensitivity, specificity, PPV and NPV with 95% Wilson intervals at
the effective sample size of the patients behind them; one-vs-rest AUROC with a bootstrap
interval that resamples patients; the confusion matrix; all of it again per
`age_group` and per `source_dataset`; the COVID false negatives by file; how images of labels
the model was never trained on (SARS, or pneumonia for a binary model) are called; and a
side-by-side table against the 2020 tool.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix, roc_auc_score, roc_curve  # noqa: E402

from tqdm.auto import tqdm  # noqa: E402

from .checkpoint import checkpoint_path, update_config  # noqa: E402
from .data import data_dir, load_grayscale, parse_filters, patient_groups, read_manifest, select  # noqa: E402
from .predictor import SHIPPED_CHECKPOINT, Predictor  # noqa: E402

# The 2020 demo's published numbers (206 PA COVID vs 206 Kermany normals, binary).
REFERENCE_2020 = {
    "train_accuracy": 0.945,
    "test_accuracy": 0.893,
    "covid_false_negatives": 5,
    "pneumonia_called_covid": (2, 206),
    "sars_called_covid": (8, 8),
}


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def proportion(successes: int, total: int, effective_n: float | None = None) -> dict:
    """A rate with its 95% Wilson score interval; None where there is nothing to count.

    `effective_n`: how many independent observations the `total` rows are worth (see
    `clustered_proportion`); the interval is then Wilson's at that sample size, the rate unchanged.
    """
    if total == 0:
        return {"value": None, "ci95": None, "k": 0, "n": 0}
    rate = successes / total
    n = float(total if effective_n is None else effective_n)
    return {"value": rate, "ci95": list(wilson_interval(rate, n)), "k": int(successes), "n": int(total)}


def wilson_interval(rate: float, n: float, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's score interval for a rate observed on n (possibly fractional) observations."""
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def clustered_proportion(hits: np.ndarray, groups: np.ndarray) -> dict:
    """A rate over rows that come in patient groups (ieee8023 has several films of one patient,
    and a patient's films are called alike more often than two strangers' are).

    The interval is Wilson's at the effective sample size n / deff, with the design effect deff
    from the ratio estimator's cluster variance (Kish 1965): rows of one patient count for
    less than independent rows. The effective size is kept between the number of patients (all
    of a patient's films called alike) and the number of rows (no patient effect); at a rate of 0
    or 1, where the variance says nothing, it is the number of patients.
    """
    hits = np.asarray(hits, dtype=float)
    if len(hits) == 0:
        return proportion(0, 0)
    _, cluster = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    successes = np.bincount(cluster, weights=hits)
    sizes = np.bincount(cluster).astype(float)
    clusters, n, rate = len(sizes), len(hits), hits.mean()
    if clusters < 2 or rate in (0.0, 1.0):
        effective = float(clusters)
    else:
        variance = clusters / (clusters - 1) * ((successes - rate * sizes) ** 2).sum() / n ** 2
        effective = rate * (1 - rate) / variance if variance > 0 else float(n)
        effective = float(np.clip(effective, clusters, n))
    result = proportion(int(hits.sum()), n, effective)
    result["patients"] = int(clusters)
    return result


def auroc(is_positive: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None,
          bootstrap: int = 500, seed: int = 0) -> dict:
    """One-vs-rest AUROC with a percentile bootstrap interval that resamples patients (`groups`,
    one per row; each row its own patient when None), not images: a patient drawn twice brings
    all their films twice. None when one side is empty."""
    is_positive = np.asarray(is_positive, dtype=bool)
    if is_positive.all() or not is_positive.any():
        return {"value": None, "ci95": None}
    value = float(roc_auc_score(is_positive, scores))
    groups = np.arange(len(scores)) if groups is None else np.asarray(groups).astype(str)
    _, cluster = np.unique(groups, return_inverse=True)
    clusters = cluster.max() + 1
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        weight = np.bincount(rng.integers(0, clusters, clusters), minlength=clusters)[cluster]
        drawn = weight > 0
        if is_positive[drawn].all() or not is_positive[drawn].any():
            continue
        samples.append(roc_auc_score(is_positive[drawn], scores[drawn], sample_weight=weight[drawn]))
    low, high = np.percentile(samples, [2.5, 97.5]) if samples else (value, value)
    return {"value": value, "ci95": [float(low), float(high)]}


def classification_metrics(true_index: np.ndarray, predicted_index: np.ndarray,
                           probabilities: np.ndarray, classes: list[str], groups: np.ndarray | None = None) -> dict:
    """Accuracy, confusion matrix and per-class rates for in-class rows; `groups` names each
    row's patient (group of patients sharing an image), so the intervals count patients."""
    groups = np.arange(len(true_index)) if groups is None else np.asarray(groups)
    matrix = confusion_matrix(true_index, predicted_index, labels=range(len(classes)))
    per_class = {}
    for k, name in enumerate(classes):
        truly, called = true_index == k, predicted_index == k
        per_class[name] = {
            "sensitivity": clustered_proportion(called[truly], groups[truly]),
            "specificity": clustered_proportion(~called[~truly], groups[~truly]),
            "ppv": clustered_proportion(truly[called], groups[called]),
            "npv": clustered_proportion(~truly[~called], groups[~called]),
            "auroc": auroc(truly, probabilities[:, k], groups),
            "support": int(truly.sum()),
        }
    return {
        "n": int(len(true_index)),
        "patients": int(len(np.unique(groups.astype(str)))),
        "accuracy": clustered_proportion(true_index == predicted_index, groups),
        "confusion_matrix": matrix.tolist(),
        "per_class": per_class,
    }


def evaluate_predictions(frame: pd.DataFrame, probabilities: np.ndarray, predicted_index: np.ndarray,
                         classes: list[str]) -> dict:
    """The full report for rows of `frame` (columns target, label, filename, age_group,
    source_dataset) with the model's probabilities and decided classes."""
    frame = frame.reset_index(drop=True)
    predicted = np.asarray(classes)[predicted_index]
    in_class = frame["target"].isin(classes).to_numpy()
    true_index = np.array([classes.index(t) if t in classes else -1 for t in frame["target"]])

    # Films of one patient, and patients who share a film, are one group for the intervals.
    groups = (patient_groups(frame).to_numpy() if {"patient_id", "sha256"} <= set(frame.columns)
              else frame["patient_id"].to_numpy() if "patient_id" in frame else np.arange(len(frame)))

    def metrics_for(mask):
        return classification_metrics(true_index[mask], predicted_index[mask], probabilities[mask], classes,
                                      groups[mask])

    report = {"classes": classes, "overall": metrics_for(in_class), "by_age_group": {}, "by_source": {}}
    for column, key in (("age_group", "by_age_group"), ("source_dataset", "by_source")):
        for value in sorted(v for v in frame[column].unique() if v):
            mask = in_class & (frame[column] == value).to_numpy()
            if mask.any():
                report[key][value] = metrics_for(mask)

    # Rows whose label the model has no class for: how are they called?
    report["out_of_class"] = {}
    for label in sorted(frame.loc[~in_class, "label"].unique()):
        mask = (~in_class) & (frame["label"] == label).to_numpy()
        report["out_of_class"][label] = {
            "n": int(mask.sum()),
            "called": {c: int((predicted[mask] == c).sum()) for c in classes},
        }

    if "covid" in classes:
        covid = classes.index("covid")
        missed = in_class & (true_index == covid) & (predicted_index != covid)
        report["covid_false_negatives"] = [
            {"filename": frame.at[i, "filename"], "source_dataset": frame.at[i, "source_dataset"],
             "view": frame.at[i, "view"], "called": predicted[i],
             "probabilities": {c: round(float(p), 4) for c, p in zip(classes, probabilities[i])}}
            for i in np.flatnonzero(missed)]
        adult_normal = in_class & (frame["target"] == "normal").to_numpy() & (frame["age_group"] == "adult").to_numpy()
        report["adult_normals_called_covid"] = clustered_proportion(predicted_index[adult_normal] == covid,
                                                                    groups[adult_normal])
        report["comparison_2020"] = _comparison_2020(report, frame, predicted, groups)
    return report


def _comparison_2020(report: dict, frame: pd.DataFrame, predicted: np.ndarray, groups: np.ndarray) -> dict:
    def called_covid(label):
        mask = (frame["label"] == label).to_numpy()
        return clustered_proportion(predicted[mask] == "covid", groups[mask])

    covid = report["overall"]["per_class"]["covid"]
    return {
        "test_accuracy": report["overall"]["accuracy"],
        "covid_false_negatives": {"k": len(report["covid_false_negatives"]), "n": covid["support"]},
        "pneumonia_called_covid": called_covid("pneumonia"),
        "sars_called_covid": called_covid("sars"),
    }


def unseen_set(split_name: str, test_rows: int, images: int) -> dict:
    """What a checkpoint's stored metrics were measured on, in words and numbers: every image of
    its classes whose patient it was neither trained nor tuned on (`images`: those with a class of
    the model's; images of other labels, SARS among them, are scored apart). That is the split file's test
    rows and, for a model trained on a selection (the 2020 recipe), every image the selection
    left out too (adult normals, other sources)."""
    return {"split_file": split_name, "test_rows": test_rows, "images": images,
            "rule": "every image of the model's classes whose patient it was neither trained nor tuned on: the "
                    "split file's test rows, and the images its training selection left out"}


def summarise(report: dict, measured_on: dict | None = None) -> dict:
    """The headline test numbers a checkpoint carries about itself (its `metrics`), and the set
    they describe (`unseen_set`)."""
    overall = report["overall"]
    summary = {"split": "test", "n": overall["n"], "accuracy": overall["accuracy"]["value"],
               "train_accuracy": report.get("train_accuracy")}
    if measured_on:
        summary["measured_on"] = measured_on
    for name, m in overall["per_class"].items():
        summary[name] = {"sensitivity": m["sensitivity"]["value"], "specificity": m["specificity"]["value"],
                         "auroc": m["auroc"]["value"]}
    if "adult_normals_called_covid" in report:
        summary["adult_normals_called_covid"] = report["adult_normals_called_covid"]["value"]
        summary["sars_called_covid"] = report["comparison_2020"]["sars_called_covid"]
    return summary


# --------------------------------------------------------------------------------------------
# Running a checkpoint over a manifest
# --------------------------------------------------------------------------------------------

def unseen_rows(frame: pd.DataFrame, split_csv: str | Path | None) -> pd.DataFrame:
    """Drop every row of a patient (or image) the model was trained or tuned on."""
    if not split_csv:
        return frame
    split = pd.read_csv(split_csv, dtype=str, keep_default_na=False)
    seen = split[split["split"].isin(["train", "val"])]
    keep = ~frame["patient_id"].isin(seen["patient_id"])
    if "sha256" in seen:
        keep &= ~(frame["sha256"].isin(seen["sha256"]) & (frame["sha256"] != ""))
    return frame[keep].reset_index(drop=True)


def split_file_for(checkpoint: str | Path) -> Path | None:
    """The split file written with a checkpoint, which says whose patients it was trained, tuned
    and tested on: NAME.split.csv beside NAME.safetensors (the shipped models), or split.csv in
    its run folder (`covidxr train`). None when there is neither."""
    checkpoint = Path(checkpoint)
    for candidate in (checkpoint.with_suffix(".split.csv"), checkpoint.parent / "split.csv"):
        if candidate.is_file():
            return candidate
    return None


def add_split_options(parser: argparse.ArgumentParser) -> None:
    """--split-csv and --all-patients, shared by `evaluate` and `audit`."""
    parser.add_argument("--split-csv", help="the checkpoint's split file: its train and val patients are left out "
                                            "(default: the one written with the checkpoint, NAME.split.csv or the "
                                            "run folder's split.csv)")
    parser.add_argument("--all-patients", action="store_true",
                        help="score every row, the patients the model was trained and tuned on included "
                             "(inflated numbers; also for a checkpoint without a split file)")


def rows_to_score(frame: pd.DataFrame, checkpoint: str | Path, split_csv: str | Path | None,
                  all_patients: bool) -> tuple[pd.DataFrame, Path | None]:
    """(the rows an honest measurement may use, the split file used): without `all_patients`,
    every patient the checkpoint was trained or tuned on is left out, and a checkpoint whose
    split is unknown is refused rather than scored on what may be its training data."""
    split = Path(split_csv) if split_csv else split_file_for(checkpoint)
    if all_patients:
        print(f"scoring all {len(frame)} rows, training and validation patients included (--all-patients): "
              "these numbers overstate the model", file=sys.stderr)
        return frame, split
    if split is None:
        raise SystemExit(f"{checkpoint}: no split file beside it, so its training patients cannot be left out. "
                         "Pass --split-csv FILE (the run's split.csv), or --all-patients to score every row anyway.")
    kept = unseen_rows(frame, split)
    if len(kept) < len(frame):
        print(f"left out {len(frame) - len(kept)} of {len(frame)} rows: patients the model was trained or tuned on "
              f"({split})", file=sys.stderr)
    return kept, split


def evaluate_checkpoint(predictor: Predictor, frame: pd.DataFrame, progress: bool = True) -> tuple[dict, np.ndarray]:
    probabilities = np.array([list(p.probabilities.values())
                              for p in predictor.predict_batch(frame["path"], progress=progress)])
    return evaluate_predictions(frame, probabilities, predictor.decide(probabilities), predictor.classes), probabilities


# --------------------------------------------------------------------------------------------
# Writing the report
# --------------------------------------------------------------------------------------------

def _fmt(rate: dict | None) -> str:
    if not rate or rate.get("value") is None:
        return "n/a"
    low, high = rate["ci95"]
    return f"{rate['value']:.3f} ({low:.2f}-{high:.2f})"


def _metrics_table(metrics: dict, classes: list[str]) -> list[str]:
    lines = [f"accuracy {_fmt(metrics['accuracy'])}, n = {metrics['n']} images of {metrics['patients']} patients", "",
             "| class | n | sensitivity | specificity | PPV | NPV | AUROC |",
             "|---|---|---|---|---|---|---|"]
    for name in classes:
        m = metrics["per_class"][name]
        lines.append(f"| {name} | {m['support']} | {_fmt(m['sensitivity'])} | {_fmt(m['specificity'])} | "
                     f"{_fmt(m['ppv'])} | {_fmt(m['npv'])} | {_fmt(m['auroc'])} |")
    return lines


def render_markdown(report: dict) -> str:
    classes = report["classes"]
    lines = ["# Evaluation report", "", "Values are rates with 95% confidence intervals "
             "(Wilson for proportions, at the effective sample size of the patients behind them; a bootstrap "
             "over patients for AUROC).", "", "## Overall", ""]
    lines += _metrics_table(report["overall"], classes)
    lines += ["", "Confusion matrix (rows true, columns predicted): " + ", ".join(classes), ""]
    lines += ["    " + " ".join(f"{v:5d}" for v in row) for row in report["overall"]["confusion_matrix"]]
    for key, title in (("by_age_group", "By age group"), ("by_source", "By source dataset")):
        lines += ["", f"## {title}"]
        for value, metrics in report[key].items():
            lines += ["", f"### {value}", ""] + _metrics_table(metrics, classes)
    if report["out_of_class"]:
        lines += ["", "## Labels the model has no class for", "", "| label | n | " +
                  " | ".join(f"called {c}" for c in classes) + " |", "|---|---|" + "---|" * len(classes)]
        for label, row in report["out_of_class"].items():
            lines.append(f"| {label} | {row['n']} | " + " | ".join(str(row["called"][c]) for c in classes) + " |")
    if "covid_false_negatives" in report:
        lines += ["", f"## COVID false negatives ({len(report['covid_false_negatives'])})", ""]
        lines += [f"- `{fn['filename']}` ({fn['source_dataset']}, {fn['view'] or 'view n/a'}): called "
                  f"{fn['called']}, p = {fn['probabilities']}" for fn in report["covid_false_negatives"]]
        lines += ["", f"Adult normals called COVID: {_fmt(report['adult_normals_called_covid'])}"]
        lines += ["", "## Against the 2020 tool", ""] + comparison_table(report["comparison_2020"])
    return "\n".join(lines) + "\n"


def comparison_table(ours: dict) -> list[str]:
    ref = REFERENCE_2020

    def count(rate):
        return f"{rate['k']} of {rate['n']}" if rate["n"] else "n/a (none in this set)"

    return [
        "| measure | 2020 tool | this model |",
        "|---|---|---|",
        f"| test accuracy | {ref['test_accuracy']:.3f} | {_fmt(ours['test_accuracy'])} |",
        f"| COVID false negatives | {ref['covid_false_negatives']} | {count(ours['covid_false_negatives'])} |",
        f"| pneumonia called COVID | {ref['pneumonia_called_covid'][0]} of {ref['pneumonia_called_covid'][1]} | "
        f"{count(ours['pneumonia_called_covid'])} |",
        f"| SARS called COVID | {ref['sars_called_covid'][0]} of {ref['sars_called_covid'][1]} | "
        f"{count(ours['sars_called_covid'])} |",
    ]


def plot_report(report: dict, frame: pd.DataFrame, probabilities: np.ndarray, out_dir: Path) -> None:
    classes = report["classes"]
    figure, axis = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay(np.array(report["overall"]["confusion_matrix"]), display_labels=classes).plot(
        ax=axis, colorbar=False, cmap="Blues")
    axis.set_title("Confusion matrix (test)")
    figure.tight_layout()
    figure.savefig(out_dir / "confusion_matrix.png", dpi=120)
    plt.close(figure)

    in_class = frame["target"].isin(classes).to_numpy()
    figure, axis = plt.subplots(figsize=(4.5, 4))
    for k, name in enumerate(classes):
        positive = (frame["target"].to_numpy()[in_class] == name)
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probabilities[in_class, k])
        auc = report["overall"]["per_class"][name]["auroc"]["value"]
        axis.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.set_xlabel("1 - specificity")
    axis.set_ylabel("sensitivity")
    axis.set_title("One-vs-rest ROC (test)")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out_dir / "roc.png", dpi=120)
    plt.close(figure)


def write_report(report: dict, frame: pd.DataFrame, probabilities: np.ndarray, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(render_markdown(report))
    predictions = frame[["filename", "label", "target", "age_group", "source_dataset"]].copy()
    for k, name in enumerate(report["classes"]):
        predictions[f"p_{name}"] = probabilities[:, k].round(5)
    predictions.to_csv(out_dir / "predictions.csv", index=False)
    plot_report(report, frame, probabilities, out_dir)
    return out_dir


def write_gallery(predictor: Predictor, frame: pd.DataFrame, report: dict, out_dir: str | Path,
                  true_positives: int = 6, method: str = "gradcam", seed: int = 0) -> Path | None:
    """A contact sheet of every COVID false negative and a sample of true positives: the X-ray,
    the heatmap for covid and the heatmap for the class predicted, with the probabilities."""
    if "covid" not in report["classes"]:
        return None
    missed = [fn["filename"] for fn in report["covid_false_negatives"]]
    found = frame.loc[(frame["target"] == "covid") & ~frame["filename"].isin(missed), "filename"]
    found = found.sample(n=min(true_positives, len(found)), random_state=seed).tolist()
    cases = [(name, "missed") for name in missed] + [(name, "found") for name in found]
    if not cases:
        return None
    paths = dict(zip(frame["filename"], frame["path"]))
    figure, axes = plt.subplots(len(cases), 3, figsize=(9, 3.1 * len(cases)), squeeze=False)
    for row, (name, kind) in zip(axes, tqdm(cases, desc="gallery", unit="img")):
        for_covid = predictor.explain(paths[name], method=method, target="covid")
        label = for_covid.prediction.decided
        for_label = predictor.explain(paths[name], method=method, target=label)
        probabilities = ", ".join(f"{c} {p:.2f}" for c, p in for_covid.prediction.probabilities.items())
        row[0].imshow(load_grayscale(paths[name]), cmap="gray")
        row[0].set_title(f"{'MISSED' if kind == 'missed' else 'found'}: {Path(name).name[:28]}", fontsize=8)
        row[1].imshow(for_covid.overlay)
        row[1].set_title("evidence for covid", fontsize=8)
        row[2].imshow(for_label.overlay)
        row[2].set_title(f"evidence for {label} (predicted)\n{probabilities}", fontsize=8)
        for axis in row:
            axis.axis("off")
    figure.tight_layout()
    path = Path(out_dir) / "covid_gallery.png"
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=checkpoint_path, metavar="FILE_OR_NAME", default=None,
                        help="safetensors checkpoint (default: the shipped model)")
    parser.add_argument("--data", default=None,
                        help="data folder with manifest.csv (default: $COVIDXR_DATA, else ../shared/data/cxr)")
    parser.add_argument("--manifest", default=None,
                        help="another manifest CSV or a folder-per-class tree (default: the data folder's)")
    add_split_options(parser)
    parser.add_argument("--filter", action="append", help="COLUMN=VALUE[,VALUE], e.g. view=PA")
    parser.add_argument("--limit", type=int, help="evaluate only the first N rows (smoke tests)")
    parser.add_argument("--out", default="runs/eval", help="folder for report.md, metrics.json, plots")
    parser.add_argument("--no-gallery", action="store_true", help="skip the false-negative heatmap gallery")
    parser.add_argument("--store-metrics", action="store_true",
                        help="write the headline numbers into --checkpoint's description as its current metrics "
                             "(after `covidxr calibrate` changed its rule); needs --checkpoint and its split")
    args = parser.parse_args(argv)
    if args.store_metrics and (not args.checkpoint or args.all_patients or args.limit or args.filter or args.manifest):
        parser.error("--store-metrics measures the checkpoint named by --checkpoint on all its unseen patients: "
                     "no --all-patients, --limit, --filter or --manifest")

    predictor = Predictor.load(args.checkpoint)
    label_map = predictor.config.get("label_map") or {c: c for c in predictor.classes}
    manifest = args.manifest or data_dir(args.data) / "manifest.csv"
    frame = select(read_manifest(manifest), parse_filters(args.filter), label_map)
    frame, split = rows_to_score(frame, args.checkpoint or SHIPPED_CHECKPOINT, args.split_csv, args.all_patients)
    if args.limit:
        frame = frame.head(args.limit)
    report, probabilities = evaluate_checkpoint(predictor, frame)
    out_dir = write_report(report, frame, probabilities, args.out)
    if args.store_metrics:
        split_rows = pd.read_csv(split, dtype=str, keep_default_na=False)
        measured_on = unseen_set(Path(split).name, int((split_rows["split"] == "test").sum()), report["overall"]["n"])
        update_config(args.checkpoint, {"metrics": summarise(report, measured_on)}, why="covidxr evaluate --store-metrics")
        print(f"metrics stored in {args.checkpoint}")
    if not args.no_gallery:
        write_gallery(predictor, frame, report, out_dir)
    print(render_markdown(report))
    print(f"written to {out_dir}")
    return report


if __name__ == "__main__":
    main()
