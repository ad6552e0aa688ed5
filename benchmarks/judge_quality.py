"""Judge a training run against the file-quality shortcut (issue 35) without the test split: on
its validation rows and the hospital it left out, the numbers a recipe is chosen by.

    python -m benchmarks.judge_quality runs/q1-sz/model.safetensors --hospital montgomery

For the validation split's cxr images (COVID, adult normals, adult pneumonias) and the left-out
hospital's people (no COVID), each as it is and under the ship rule's variants (quality.
RULE_VARIANTS: longer side 256 and 1024 px, JPEG quality 30, a blur):

- the ranking: validation COVID AUROC (COVID against every other cxr image), COVID against other
  pneumonia inside ieee8023, and the validation COVID images against the hospital's people;
- under the checkpoint's own rule (argmax for a run not yet calibrated) and at the validation
  proxy threshold for COVID sensitivity 0.95: validation
  sensitivity, adult normals called COVID, the hospital's people called COVID;
- the file: the share of each group's labels a variant changes (the bar: at most 10%), and the
  share called COVID under it.

Prints JSON. The test split is never read: it is for the model shipped (issue 35: choose on
validation and the left-out hospital)."""

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from covidxr import Predictor, quality
from covidxr.calibration import choose_threshold
from covidxr.data import data_dir


def judge(checkpoint: Path, hospital: str, sample: int | None) -> dict:
    predictor = Predictor.load(checkpoint)
    data = data_dir()
    paths, groups = quality.audit_sets(checkpoint, data, data.parent / "external", sample, split_name="val",
                                       hospitals=[hospital])
    rows = quality.audit_rows(predictor, paths, groups, list(quality.RULE_VARIANTS))
    split_file = Path(checkpoint).with_suffix(".split.csv")
    split_file = split_file if split_file.is_file() else Path(checkpoint).parent / "split.csv"
    split = pd.read_csv(split_file, dtype=str, keep_default_na=False)
    source = dict(zip([str(data / f) for f in split["filename"]], split["source_dataset"]))
    base = rows[rows["variant"] == quality.AS_IS].assign(source=lambda t: t["path"].map(source))
    covid = base["group"] == "val: COVID"
    cxr = base["group"].str.startswith("val:")
    people = base["group"].str.startswith(hospital)
    threshold = choose_threshold(base.loc[cxr, "p_covid"].to_numpy(), covid[cxr].to_numpy(), "sensitivity", 0.95)
    ieee = cxr & (base["source"] == "ieee8023") & base["group"].isin(["val: COVID", "val: adult pneumonias"])
    result = {
        "checkpoint": str(checkpoint), "hospital left out": hospital, "images": int(len(base)),
        "val COVID AUROC": float(roc_auc_score(covid[cxr], base.loc[cxr, "p_covid"])),
        "val COVID vs pneumonia inside ieee8023 AUROC": float(roc_auc_score(covid[ieee], base.loc[ieee, "p_covid"]))
        if covid[ieee].nunique() == 2 else None,
        "val COVID vs hospital AUROC": float(roc_auc_score(covid[covid | people], base.loc[covid | people, "p_covid"])),
        "proxy threshold (val sensitivity 0.95)": float(threshold),
    }
    adult_normals = base["group"] == "val: adult normals"
    for rule, called in (("own rule", base["decided"] == "covid"), ("proxy", base["p_covid"] >= threshold)):
        result[f"{rule}: val sensitivity"] = float(called[covid].mean())
        result[f"{rule}: val adult normals called COVID"] = float(called[adult_normals].mean())
        result[f"{rule}: {hospital} called COVID"] = float(called[people].mean())
    summary = quality.summarise(rows)
    result["labels changed"] = {f"{row.group} / {row.variant}": round(row.labels_changed, 3)
                                for row in summary.itertuples() if row.variant != quality.AS_IS}
    result["called COVID"] = {f"{row.group} / {row.variant}": round(row.called_covid, 3)
                              for row in summary.itertuples()}
    result["worst labels changed (val COVID, val adult normals, hospital)"] = float(summary.loc[
        summary["variant"].isin(quality.RULE_VARIANTS)
        & ~summary["group"].str.contains("pneumonias"), "labels_changed"].max())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--hospital", required=True, help="the external hospital the run left out")
    parser.add_argument("--sample", type=int, default=None, help="at most N images a group")
    args = parser.parse_args()
    results = [judge(path, args.hospital, args.sample) for path in args.checkpoints]
    print(json.dumps(results if len(results) > 1 else results[0], indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
