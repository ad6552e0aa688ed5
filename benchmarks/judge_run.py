"""Judge a training run as MODEL_CARD's lung-reader tables do, for runs without folds.

    python -m benchmarks.judge_run runs/r9/model.safetensors runs/r9/split.csv

The COVID threshold for sensitivity 0.95 is read off the run's own validation rows (a proxy for
the out-of-fold threshold `covidxr calibrate` picks; use that for anything shipped). At it, and at
argmax: the cxr test images (COVID AUROC, sensitivity, specificity, adult normals called COVID,
COVID against other pneumonia inside ieee8023) and every external hospital the run did not train
on, per label, with the AUROC of the run's validation COVID images against that hospital's people
(threshold-free, so it ranks recipes without the proxy's noise). Prints JSON. Images are framed
through the package, as the app frames them."""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from covidxr import Predictor
from covidxr.calibration import choose_threshold
from covidxr.data import data_dir, read_manifest
from covidxr.hospitals import available, hospitals_dir

checkpoint, split_csv = sys.argv[1], sys.argv[2]
predictor = Predictor.load(checkpoint)
covid = predictor.classes.index("covid")
HOSPITAL_ROOT = hospitals_dir()
HOSPITALS = available(HOSPITAL_ROOT)
frames = [read_manifest(data_dir() / "manifest.csv").assign(set="cxr")]
for name in HOSPITALS:
    frames.append(read_manifest(HOSPITAL_ROOT / name / "manifest.csv").assign(set=name))
rows = pd.concat(frames, ignore_index=True)
split = pd.read_csv(split_csv, dtype=str, keep_default_na=False)[["sha256", "split"]]
rows = rows.merge(split, on="sha256", how="left")
rows["split"] = rows["split"].fillna("left_out")
trained_hospitals = set(rows.loc[(rows["set"] != "cxr") & (rows["split"] != "left_out"), "set"])


def p_covid(frame):
    return predictor.probabilities(predictor.frame_files(list(frame["path"])))


val = rows[rows["split"] == "val"].reset_index(drop=True)
pv = p_covid(val)
threshold = choose_threshold(pv[:, covid], (val["label"] == "covid").to_numpy(), "sensitivity", 0.95)
val_cxr = (val["set"] == "cxr").to_numpy()
out = {"checkpoint": checkpoint, "threshold": threshold,
       "val_auroc": roc_auc_score(val["label"][val_cxr] == "covid", pv[val_cxr, covid]),
       "val_auroc_all": roc_auc_score(val["label"] == "covid", pv[:, covid]), "val_n": len(val)}
test = rows[(rows["split"] == "test") & (rows["set"] == "cxr")].reset_index(drop=True)
pt = p_covid(test)
positive = (test["label"] == "covid").to_numpy()
called = pt[:, covid] >= threshold
adult_normal = ((test["label"] == "normal") & (test["age_group"] == "adult")).to_numpy()
out |= {"test_n": len(test), "test_auroc": roc_auc_score(positive, pt[:, covid]),
        "sens": called[positive].mean(), "spec": (~called[~positive]).mean(),
        "adult_normals_called": called[adult_normal].mean(), "adult_normals_n": int(adult_normal.sum()),
        "argmax_sens": (pt.argmax(1) == covid)[positive].mean(),
        "argmax_adult_normals": (pt.argmax(1) == covid)[adult_normal].mean()}
ieee = (test["source_dataset"] == "ieee8023") & test["label"].isin(["covid", "pneumonia"])
if ieee.sum():
    out["ieee_covid_vs_pneumonia_auroc"] = roc_auc_score(test["label"][ieee] == "covid", pt[ieee.to_numpy(), covid])
val_covid = pv[(val["label"] == "covid").to_numpy() & val_cxr, covid]
for name in HOSPITALS:
    if name in trained_hospitals:
        continue
    h = rows[rows["set"] == name].reset_index(drop=True)
    ph = p_covid(h)
    out[f"{name}_auroc_vs_val_covid"] = roc_auc_score(
        np.r_[np.ones(len(val_covid)), np.zeros(len(h))], np.r_[val_covid, ph[:, covid]])
    for label in sorted(h["label"].unique()):
        m = (h["label"] == label).to_numpy()
        out[f"{name}_{label}_threshold"] = (ph[m, covid] >= threshold).mean()
        out[f"{name}_{label}_argmax"] = (ph[m].argmax(1) == covid).mean()
        out[f"{name}_{label}_n"] = int(m.sum())
print(json.dumps({k: (round(float(v), 4) if isinstance(v, (float, np.floating)) else v) for k, v in out.items()},
                 indent=1))
