"""Calibration stage: an operating point chosen on out-of-fold data, not defaulted.

Patient-grouped k-fold cross-validation on the training pool (train.py --folds K --fold I
--keep last, one run per fold) gives every pool image a probability from a model that never saw
its patient, nor chose its epoch by it: a fold run that kept its best epoch is refused, since it
chose that epoch on the very images it scores out of fold.
On those out-of-fold probabilities this module

1. fits a temperature T (Guo et al. 2017): logits / T before the softmax, chosen to minimise the
   negative log-likelihood; it changes how confident the model says it is, never its ranking;
2. chooses the COVID threshold: the highest one whose out-of-fold COVID sensitivity reaches the
   target (0.95 by default), since a missed COVID case costs more than a false alarm;
3. reports calibration before and after (expected calibration error, Brier score, a reliability
   diagram), and writes temperature and threshold into the checkpoint's description, where
   `Predictor`, the command line and the app read them.

    covidxr calibrate --folds-dir runs/kfold --checkpoint runs/final/model.safetensors \
        --out runs/final/calibration
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.optimize import minimize_scalar  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from .checkpoint import checkpoint_path, update_config  # noqa: E402

TARGET_SENSITIVITY = 0.95


def read_out_of_fold(folds_dir: str | Path) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """(rows, probabilities (N, C), classes) from every fold*/oof.csv under `folds_dir`."""
    files = sorted(Path(folds_dir).glob("*/oof.csv"))
    if not files:
        raise FileNotFoundError(f"{folds_dir}: no */oof.csv (train.py --folds K --fold I writes one per fold)")
    for file in files:
        # A fold run that kept its best epoch chose it on the very images it then scores out of
        # fold: those probabilities are optimistic, and so would the threshold and temperature be.
        args = file.parent / "args.json"
        keep = json.loads(args.read_text()).get("keep") if args.is_file() else None
        if keep != "last":
            raise ValueError(f"{file.parent}: this fold run kept {'its ' + keep + ' epoch' if keep else 'an epoch'} "
                             "chosen on its own held-out fold, so its out-of-fold probabilities are optimistic; "
                             "train the folds with --keep last (a fixed number of epochs)")
    table = pd.concat([pd.read_csv(f, dtype={"target": str}, keep_default_na=False) for f in files],
                      ignore_index=True)
    if table["filename"].duplicated().any():
        raise ValueError(f"{folds_dir}: an image is out-of-fold in two runs; the folds overlap")
    classes = [c[2:] for c in table.columns if c.startswith("p_")]
    return table, table[[f"p_{c}" for c in classes]].to_numpy(float), classes


def rescale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the same as softmax(logits / T), since log p differs from the logits
    by one constant per row."""
    scaled = np.log(np.clip(probabilities, 1e-12, 1.0)) / temperature
    scaled -= scaled.max(1, keepdims=True)
    return np.exp(scaled) / np.exp(scaled).sum(1, keepdims=True)


def negative_log_likelihood(probabilities: np.ndarray, targets: np.ndarray) -> float:
    return float(-np.log(np.clip(probabilities[np.arange(len(targets)), targets], 1e-12, 1.0)).mean())


def fit_temperature(probabilities: np.ndarray, targets: np.ndarray) -> float:
    result = minimize_scalar(lambda t: negative_log_likelihood(rescale(probabilities, t), targets),
                             bounds=(0.05, 20.0), method="bounded")
    return float(result.x)


def reliability(probabilities: np.ndarray, targets: np.ndarray, bins: int = 10) -> tuple[np.ndarray, ...]:
    """(accuracy, mean confidence, images) per non-empty confidence bin of the top class, from
    sklearn's `calibration_curve` with its uniform bins."""
    confidence = probabilities.max(1)
    correct = (probabilities.argmax(1) == targets).astype(float)
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=bins, strategy="uniform")
    # The bins' sizes, counted the way calibration_curve assigns them.
    sizes = np.bincount(np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], confidence), minlength=bins)
    return accuracy, mean_confidence, sizes[sizes > 0]


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE: |accuracy - confidence| per confidence bin, weighted by the bin's size."""
    accuracy, confidence, sizes = reliability(probabilities, targets, bins)
    return float((np.abs(accuracy - confidence) * sizes).sum() / sizes.sum())


def brier_score(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """Mean squared distance to the one-hot truth, summed over classes."""
    truth = np.eye(probabilities.shape[1])[targets]
    return float(((probabilities - truth) ** 2).sum(1).mean())


def choose_threshold(scores: np.ndarray, positive: np.ndarray, rule: str, target_sensitivity: float | None = None) -> float:
    """The one threshold chooser (calibration here, the validation operating point in training.py).

    Rule "sensitivity": the highest threshold t whose sensitivity, mean(scores[positive] >= t),
    reaches `target_sensitivity`. Rule "youden": the threshold that maximises sensitivity +
    specificity (Youden's J); among equal J the lower one, since a missed positive costs more
    than a false alarm. Both read sklearn's ROC curve at every distinct score.
    """
    fpr, tpr, thresholds = roc_curve(positive, scores, drop_intermediate=False)
    if rule == "sensitivity":
        return float(thresholds[np.argmax(tpr >= target_sensitivity - 1e-12)])
    if rule == "youden":
        j = tpr - fpr
        return float(thresholds[np.flatnonzero(j == j.max())].min())
    raise ValueError(f"unknown threshold rule {rule!r}: 'sensitivity' or 'youden'")


def rates(scores: np.ndarray, positive: np.ndarray, threshold: float) -> dict:
    called = scores >= threshold
    return {"sensitivity": float(called[positive].mean()), "specificity": float((~called[~positive]).mean()),
            "positives": int(positive.sum()), "negatives": int((~positive).sum())}


def reliability_diagram(before: np.ndarray, after: np.ndarray, targets: np.ndarray, path: Path,
                        bins: int = 10) -> Path:
    figure, axis = plt.subplots(figsize=(4.6, 4.4))
    for probabilities, name, marker in ((before, "uncalibrated", "o"), (after, "temperature-scaled", "s")):
        accuracy, confidence, sizes = reliability(probabilities, targets, bins)
        used = sizes >= 3  # a bin of one or two images says little
        axis.plot(confidence[used], accuracy[used], marker=marker,
                  label=f"{name} (ECE {expected_calibration_error(probabilities, targets, bins):.3f})")
    axis.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
    axis.set_xlabel("confidence (top class probability)")
    axis.set_ylabel("accuracy")
    axis.set_title("Reliability, out-of-fold", fontsize=10)
    axis.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def calibrate(table: pd.DataFrame, probabilities: np.ndarray, classes: list[str],
              target_sensitivity: float = TARGET_SENSITIVITY) -> dict:
    """Temperature, COVID threshold and the numbers behind them, from out-of-fold probabilities."""
    targets = np.array([classes.index(t) for t in table["target"]])
    temperature = fit_temperature(probabilities, targets)
    scaled = rescale(probabilities, temperature)
    covid = classes.index("covid")
    positive = targets == covid
    threshold = choose_threshold(scaled[:, covid], positive, "sensitivity", target_sensitivity)
    argmax_called = probabilities.argmax(1) == covid
    return {
        "images": int(len(targets)), "folds": int(table["fold"].nunique()) if "fold" in table else None,
        "temperature": round(temperature, 4),
        "threshold": round(threshold, 4),
        "target_sensitivity": target_sensitivity,
        "at_threshold": rates(scaled[:, covid], positive, threshold),
        "at_argmax": {"sensitivity": float(argmax_called[positive].mean()),
                      "specificity": float((~argmax_called[~positive]).mean())},
        "covid_auroc": float(roc_auc_score(positive, scaled[:, covid])),
        "uncalibrated": {"ece": expected_calibration_error(probabilities, targets),
                         "brier": brier_score(probabilities, targets),
                         "nll": negative_log_likelihood(probabilities, targets)},
        "calibrated": {"ece": expected_calibration_error(scaled, targets), "brier": brier_score(scaled, targets),
                       "nll": negative_log_likelihood(scaled, targets)},
    }


def stamp(checkpoint: str | Path, result: dict, folds_dir: str | Path) -> dict:
    """Write temperature and threshold into the checkpoint's description. Its test metrics (and
    lungs-outside notice) were measured under the old rule: `update_config` marks them stale
    until `covidxr evaluate --store-metrics` measures them again. Returns the new description."""
    chosen_on = (f"out-of-fold probabilities of {result['folds'] or 'k'}-fold patient-grouped cross-validation "
                 f"on the training pool ({result['images']} images; {Path(folds_dir).name})")
    return update_config(checkpoint, why=f"covidxr calibrate --folds-dir {Path(folds_dir).name}", changes={
        "calibration": {"temperature": result["temperature"], "method": "temperature scaling (NLL)",
                        "chosen_on": chosen_on, "ece_out_of_fold": round(result["calibrated"]["ece"], 4)},
        "decision": {"rule": "threshold", "class": "covid", "threshold": result["threshold"],
                     "method": f"highest threshold with out-of-fold COVID sensitivity >= {result['target_sensitivity']}",
                     "chosen_on": chosen_on,
                     "out_of_fold": {k: round(v, 4) for k, v in result["at_threshold"].items()
                                     if k in ("sensitivity", "specificity")}},
    })


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="covidxr calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds-dir", required=True, help="folder whose sub-folders are the fold runs")
    parser.add_argument("--checkpoint", type=checkpoint_path, metavar="FILE_OR_NAME",
                        help="write temperature and threshold into this checkpoint")
    parser.add_argument("--target-sensitivity", type=float, default=TARGET_SENSITIVITY)
    parser.add_argument("--out", default=None, help="folder for calibration.json and reliability.png")
    args = parser.parse_args(argv)
    table, probabilities, classes = read_out_of_fold(args.folds_dir)
    result = calibrate(table, probabilities, classes, args.target_sensitivity)
    out = Path(args.out or args.folds_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = np.array([classes.index(t) for t in table["target"]])
    reliability_diagram(probabilities, rescale(probabilities, result["temperature"]), targets,
                        out / "reliability.png")
    (out / "calibration.json").write_text(json.dumps(result, indent=2))
    if args.checkpoint:
        config = stamp(args.checkpoint, result, args.folds_dir)
        print(f"{args.checkpoint}: decision {config['decision']}")
        for field, why in (config.get("stale") or {}).items():
            print(f"{args.checkpoint}: {field} marked stale ({why}); measure again with "
                  f"`covidxr evaluate --checkpoint {args.checkpoint} --store-metrics`"
                  + (" and `covidxr audit --store-notice`" if field == "lung_focus_notice" else ""))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
