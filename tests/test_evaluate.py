"""Evaluation: the metrics are right on known answers, and a real run produces all of them."""

import json

import numpy as np
import pandas as pd
import pytest

from covidxr.evaluate import evaluate_predictions, main, proportion, unseen_rows
from covidxr.predictor import decide

CLASSES = ["covid", "normal", "pneumonia"]


def frame_of(targets, labels=None, ages=None, sources=None):
    n = len(targets)
    return pd.DataFrame({
        "filename": [f"f{k}.png" for k in range(n)], "target": targets, "label": labels or targets,
        "age_group": ages or ["adult"] * n, "source_dataset": sources or ["s"] * n, "view": ["PA"] * n,
    })


def one_hot(indices, sharp=0.9):
    probabilities = np.full((len(indices), 3), (1 - sharp) / 2)
    probabilities[np.arange(len(indices)), indices] = sharp
    return probabilities


def test_metrics_on_known_answers(monkeypatch):
    # 50 bootstrap resamples instead of 500: the intervals are not checked here, and sklearn's
    # roc_auc_score costs milliseconds a call (500 x 12 calls would dominate the fast layer).
    from functools import partial

    from covidxr import evaluate

    monkeypatch.setattr(evaluate, "auroc", partial(evaluate.auroc, bootstrap=50))
    targets = ["covid"] * 4 + ["normal"] * 4 + ["pneumonia"] * 2 + ["", ""]
    labels = targets[:10] + ["sars", "sars"]
    ages = ["adult"] * 6 + ["pediatric"] * 2 + ["adult"] * 4
    predicted = np.array([0, 0, 0, 1,   1, 1, 0, 1,   2, 0,   0, 2])
    report = evaluate_predictions(frame_of(targets, labels, ages), one_hot(predicted), predicted, CLASSES)
    covid = report["overall"]["per_class"]["covid"]
    assert covid["sensitivity"]["value"] == pytest.approx(3 / 4)   # 3 of 4 covid found
    assert covid["specificity"]["value"] == pytest.approx(4 / 6)   # 2 of 6 others called covid
    assert covid["ppv"]["value"] == pytest.approx(3 / 5)
    assert covid["npv"]["value"] == pytest.approx(4 / 5)
    assert report["overall"]["accuracy"]["value"] == pytest.approx(7 / 10)
    assert report["overall"]["confusion_matrix"] == [[3, 1, 0], [1, 3, 0], [1, 0, 1]]
    assert [fn["filename"] for fn in report["covid_false_negatives"]] == ["f3.png"]
    assert report["out_of_class"]["sars"] == {"n": 2, "called": {"covid": 1, "normal": 0, "pneumonia": 1}}
    assert report["comparison_2020"]["sars_called_covid"]["k"] == 1
    assert report["comparison_2020"]["pneumonia_called_covid"]["k"] == 1
    # Adult normals are f4, f5 (f6, f7 are pediatric): neither called covid.
    assert report["adult_normals_called_covid"]["k"] == 0 and report["adult_normals_called_covid"]["n"] == 2
    assert report["by_age_group"]["pediatric"]["n"] == 2


def test_wilson_interval_brackets_the_rate():
    rate = proportion(52, 55)
    low, high = rate["ci95"]
    assert low < 52 / 55 < high and 0.8 < low and high < 1
    assert proportion(0, 0)["value"] is None
    assert proportion(5, 5)["ci95"][1] == pytest.approx(1.0)


def test_threshold_decision_rule():
    probabilities = np.array([[0.3, 0.6, 0.1], [0.2, 0.3, 0.5], [0.05, 0.9, 0.05]])
    rule = {"rule": "threshold", "class": "covid", "threshold": 0.25}
    assert list(decide(probabilities, CLASSES, rule)) == [0, 2, 1]
    assert list(decide(probabilities, CLASSES, {"rule": "argmax"})) == [1, 2, 1]


def test_unseen_rows_drop_training_patients(tmp_path):
    frame = pd.DataFrame({"patient_id": ["a", "b", "c", "d"], "sha256": ["1", "2", "3", "4"]})
    split = pd.DataFrame({"patient_id": ["a", "b", "x"], "sha256": ["1", "2", "3"],
                          "split": ["train", "test", "val"]})
    split.to_csv(tmp_path / "split.csv", index=False)
    kept = unseen_rows(frame, tmp_path / "split.csv")
    # a: trained on; c: its image (sha 3) was in validation under another patient id.
    assert list(kept["patient_id"]) == ["b", "d"]


@pytest.mark.slow
def test_evaluate_command_on_real_images(tiny_run, small_manifest, tmp_path):
    out = tmp_path / "eval"
    report = main(["--checkpoint", str(tiny_run / "model.safetensors"), "--manifest", str(small_manifest),
                   "--out", str(out)])
    overall = report["overall"]
    assert overall["n"] > 20 and 0 <= overall["accuracy"]["value"] <= 1
    for name in CLASSES:
        metrics = overall["per_class"][name]
        for key in ("sensitivity", "specificity", "ppv", "npv", "auroc"):
            if metrics[key]["value"] is not None:
                low, high = metrics[key]["ci95"]
                assert 0 <= low <= metrics[key]["value"] <= high <= 1, (name, key)
        assert metrics["sensitivity"]["value"] is not None and metrics["auroc"]["value"] is not None
    assert set(report["by_age_group"]) == {"adult", "pediatric"}
    assert set(report["by_source"]) == {"actualmed", "figure1", "ieee8023", "kermany", "nih14"}
    assert report["out_of_class"]["sars"]["n"] == 4
    assert isinstance(report["covid_false_negatives"], list)
    assert set(report["comparison_2020"]) == {"test_accuracy", "covid_false_negatives",
                                              "pneumonia_called_covid", "sars_called_covid"}
    for name in ("metrics.json", "report.md", "confusion_matrix.png", "roc.png", "predictions.csv",
                 "covid_gallery.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "metrics.json").read_text())["classes"] == CLASSES
    markdown = (out / "report.md").read_text()
    assert "## By age group" in markdown and "## Against the 2020 tool" in markdown
