"""Judge a training run (or the average of several) as MODEL_CARD's lung-reader tables do.

    python -m benchmarks.judge_run runs/r9/model.safetensors runs/r9/split.csv
    python -m benchmarks.judge_run runs/r9/model.safetensors runs/r14/model.safetensors runs/r9/split.csv
    python -m benchmarks.judge_run --threshold 0.074 --temperature 1.152 runs/f0/model.safetensors ... runs/r10/split.csv

The last argument is the split every checkpoint shares. With several checkpoints their class
probabilities are averaged (the ensemble issue 24 asks about) and each member is judged too.
The COVID threshold for sensitivity 0.95 is read off the split's validation rows (a proxy for the
out-of-fold threshold `covidxr calibrate` picks; use that for anything shipped) unless
`--threshold` gives one (with `--temperature`, the one it was chosen at: fold models store none).
At it, and at argmax: the cxr test images (COVID AUROC, sensitivity, specificity, adult normals
called COVID, COVID against other pneumonia inside ieee8023; and, as the ranking's own limit, the
specificity and adult normals called at a threshold tuned on the test COVID images themselves, with
the three COVID images it ranks lowest) and every external hospital the split leaves out, per
label, with the AUROC of the validation COVID images (and of the test COVID images) against that
hospital's people: threshold-free, so it ranks recipes without the threshold's noise. Fold
models trained on part of the validation rows, so for them the test-COVID AUROC is the fair one.
Prints JSON. Images are framed through the package, as the app frames them."""
import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from covidxr import Predictor
from covidxr.calibration import choose_threshold
from covidxr.data import data_dir, read_manifest
from covidxr.hospitals import available, hospitals_dir

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("checkpoints", nargs="+", type=Path)
parser.add_argument("split_csv", type=Path)
parser.add_argument("--threshold", type=float, help="a fixed COVID threshold instead of the validation proxy")
parser.add_argument("--temperature", type=float,
                    help="divide every checkpoint's logits by this (e.g. the out-of-fold temperature that came "
                         "with --threshold; fold models store none) instead of each one's own")
args = parser.parse_args()

HOSPITAL_ROOT = hospitals_dir()
HOSPITALS = available(HOSPITAL_ROOT)
frames = [read_manifest(data_dir() / "manifest.csv").assign(set="cxr")]
for name in HOSPITALS:
    frames.append(read_manifest(HOSPITAL_ROOT / name / "manifest.csv").assign(set=name))
rows = pd.concat(frames, ignore_index=True)
split = pd.read_csv(args.split_csv, dtype=str, keep_default_na=False)[["sha256", "split"]]
rows = rows.merge(split, on="sha256", how="left")
rows["split"] = rows["split"].fillna("left_out")
trained_hospitals = set(rows.loc[(rows["set"] != "cxr") & (rows["split"] != "left_out"), "set"])
val = rows[rows["split"] == "val"].reset_index(drop=True)
test = rows[(rows["split"] == "test") & (rows["set"] == "cxr")].reset_index(drop=True)
hospitals = {name: rows[rows["set"] == name].reset_index(drop=True)
             for name in HOSPITALS if name not in trained_hospitals}


def probabilities(checkpoint: Path) -> dict:
    """Every row set's class probabilities from one checkpoint, framed as the app frames them."""
    predictor = Predictor.load(checkpoint)
    if args.temperature is not None:
        predictor.config["calibration"] = predictor.config.get("calibration", {}) | {"temperature": args.temperature}
    sets = {"val": val, "test": test} | hospitals
    return {"classes": predictor.classes} | {
        name: predictor.probabilities(predictor.frame_files(list(frame["path"]))) for name, frame in sets.items()}


def judge(p: dict, fixed_threshold: float | None) -> dict:
    """MODEL_CARD's rows for one model's (or one average's) probabilities `p`."""
    covid = p["classes"].index("covid")
    pv, pt = p["val"], p["test"]
    val_cxr = (val["set"] == "cxr").to_numpy()
    threshold = fixed_threshold if fixed_threshold is not None else choose_threshold(
        pv[:, covid], (val["label"] == "covid").to_numpy(), "sensitivity", 0.95)
    out = {"threshold": threshold, "threshold_from": "given" if fixed_threshold is not None else "validation",
           "val_auroc": roc_auc_score(val["label"][val_cxr] == "covid", pv[val_cxr, covid]),
           "val_auroc_all": roc_auc_score(val["label"] == "covid", pv[:, covid]), "val_n": len(val)}
    positive = (test["label"] == "covid").to_numpy()
    called = pt[:, covid] >= threshold
    adult_normal = ((test["label"] == "normal") & (test["age_group"] == "adult")).to_numpy()
    out |= {"test_n": len(test), "test_auroc": roc_auc_score(positive, pt[:, covid]),
            "sens": called[positive].mean(), "spec": (~called[~positive]).mean(),
            "adult_normals_called": called[adult_normal].mean(), "adult_normals_n": int(adult_normal.sum()),
            "argmax_sens": (pt.argmax(1) == covid)[positive].mean(),
            "argmax_adult_normals": (pt.argmax(1) == covid)[adult_normal].mean()}
    # What a threshold tuned on the test COVID images themselves would give: the ranking's own limit,
    # with none of the threshold's transfer from validation or folds. Not an operating point anyone
    # could ship; it splits a miss into the ranking's part and the threshold's.
    tuned = pt[:, covid] >= choose_threshold(pt[:, covid], positive, "sensitivity", 0.95)
    lowest = test["filename"][positive].iloc[np.argsort(pt[positive, covid])[:3]]
    out |= {"test_tuned_spec": (~tuned[~positive]).mean(),
            "test_tuned_adult_normals_called": tuned[adult_normal].mean(),
            "lowest_test_covid": [Path(name).name for name in lowest]}
    ieee = ((test["source_dataset"] == "ieee8023") & test["label"].isin(["covid", "pneumonia"])).to_numpy()
    if ieee.sum():
        out["ieee_covid_vs_pneumonia_auroc"] = roc_auc_score(test["label"][ieee] == "covid", pt[ieee, covid])
    val_covid = pv[(val["label"] == "covid").to_numpy() & val_cxr, covid]
    test_covid = pt[positive, covid]
    for name, h in hospitals.items():
        ph = p[name]
        for which, covid_scores in (("val", val_covid), ("test", test_covid)):
            out[f"{name}_auroc_vs_{which}_covid"] = roc_auc_score(
                np.r_[np.ones(len(covid_scores)), np.zeros(len(h))], np.r_[covid_scores, ph[:, covid]])
        for label in sorted(h["label"].unique()):
            m = (h["label"] == label).to_numpy()
            out[f"{name}_{label}_threshold"] = (ph[m, covid] >= threshold).mean()
            out[f"{name}_{label}_argmax"] = (ph[m].argmax(1) == covid).mean()
            out[f"{name}_{label}_n"] = int(m.sum())
    return out


def rounded(result: dict) -> dict:
    return {k: (round(float(v), 4) if isinstance(v, (float, np.floating)) else v) for k, v in result.items()}


members = [probabilities(checkpoint) for checkpoint in args.checkpoints]
if any(m["classes"] != members[0]["classes"] for m in members):
    raise SystemExit("the checkpoints name different classes; they cannot be averaged")
report = {"checkpoints": [str(c) for c in args.checkpoints], "split": str(args.split_csv)}
if len(members) == 1:
    report |= rounded(judge(members[0], args.threshold))
else:
    average = {"classes": members[0]["classes"]} | {
        name: np.mean([m[name] for m in members], axis=0) for name in members[0] if name != "classes"}
    report |= {"average": rounded(judge(average, args.threshold)),
               "members": [rounded(judge(m, args.threshold)) for m in members]}
print(json.dumps(report, indent=1))
