"""Evaluation: the metrics are right on known answers, and a real run produces all of them."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import MANIFEST

from covidxr.evaluate import (auroc, clustered_proportion, evaluate_predictions, main, proportion, rows_to_score,
                              split_file_for, unseen_rows, wilson_interval)
from covidxr.predictor import SHIPPED_CHECKPOINT, SHIPPED_SPLIT
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


def test_wilson_interval_is_scipys_on_whole_counts():
    from scipy.stats import binomtest

    for k, n in ((0, 7), (3, 10), (52, 55), (20, 20)):
        expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k / n, n) == pytest.approx((expected.low, expected.high), abs=1e-6)


def test_films_of_one_patient_count_as_less_than_independent_films():
    # 10 patients with 6 films each, every film of a patient called alike (7 of 10 right): the
    # rate is 0.7 either way, but there are 10 observations' worth of evidence, not 60.
    hits = np.repeat([1, 1, 1, 1, 1, 1, 1, 0, 0, 0], 6).astype(bool)
    patients = np.repeat(np.arange(10), 6)
    by_patient = clustered_proportion(hits, patients)
    assert by_patient["value"] == pytest.approx(0.7) and by_patient["n"] == 60 and by_patient["patients"] == 10
    assert by_patient["ci95"] == pytest.approx(list(wilson_interval(0.7, 10)), abs=1e-9)
    as_images = clustered_proportion(hits, np.arange(60))
    assert as_images["ci95"] == pytest.approx(list(wilson_interval(0.7, 60)), abs=1e-9)
    assert by_patient["ci95"][0] < as_images["ci95"][0] - 0.1
    # All right: the interval is the one for 10 patients, not 60 films.
    assert clustered_proportion(np.ones(60, bool), patients)["ci95"][0] == pytest.approx(wilson_interval(1.0, 10)[0])


def test_auroc_bootstrap_resamples_patients():
    rng = np.random.default_rng(1)
    # 30 patients, 8 films each; each patient's films share one score (their films look alike).
    patients = np.repeat(np.arange(30), 8)
    positive = np.repeat(np.arange(30) % 2 == 0, 8)
    scores = np.repeat(rng.normal(size=30), 8) + positive * 0.8
    by_patient = auroc(positive, scores, patients, bootstrap=200)
    by_image = auroc(positive, scores, None, bootstrap=200)
    assert by_patient["value"] == by_image["value"]
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    assert width(by_patient) > 2 * width(by_image)


def test_evaluation_leaves_out_the_checkpoints_training_patients_by_default(manifest_frame, capsys):
    assert split_file_for(SHIPPED_CHECKPOINT) == SHIPPED_SPLIT
    scored, used = rows_to_score(manifest_frame, SHIPPED_CHECKPOINT, None, all_patients=False)
    split = pd.read_csv(SHIPPED_SPLIT, dtype=str, keep_default_na=False)
    trained = set(split.loc[split["split"].isin(["train", "val"]), "patient_id"])
    assert used == SHIPPED_SPLIT and len(scored) < len(manifest_frame)
    assert not set(scored["patient_id"]) & trained
    assert set(split.loc[split["split"] == "test", "filename"]) <= set(scored["filename"])
    everything, _ = rows_to_score(manifest_frame, SHIPPED_CHECKPOINT, None, all_patients=True)
    assert len(everything) == len(manifest_frame)
    assert "overstate" in capsys.readouterr().err


def test_a_checkpoint_without_a_split_file_is_refused_unless_asked(tmp_path):
    import shutil

    checkpoint = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(SHIPPED_CHECKPOINT, checkpoint)
    with pytest.raises(SystemExit, match="--all-patients"):
        main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "eval"), "--limit", "2"])


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
    # --all-patients: this checks the report's parts on every label and source of the small
    # manifest, some of whose patients the tiny run trained on.
    report = main(["--checkpoint", str(tiny_run / "model.safetensors"), "--manifest", str(small_manifest),
                   "--out", str(out), "--all-patients"])
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


@pytest.mark.slow  # every bundled model over its unseen images
@pytest.mark.parametrize("name", ["whole-image", "lung-reader", "recipe-2020"])
def test_stored_metrics_are_what_the_shipped_file_gives(name):
    """A bundled checkpoint's stored test metrics name the set they describe, and are what the
    shipped file gives there through Predictor (within 0.001): nothing measured on an older file,
    lung model or rule."""
    from covidxr import Predictor
    from covidxr.checkpoint import checkpoint_path, read_config
    from covidxr.data import read_manifest, select
    from covidxr.evaluate import evaluate_checkpoint, rows_to_score, summarise

    path = checkpoint_path(name)
    stored = read_config(path)["metrics"]
    predictor = Predictor.load(path)
    frame = select(read_manifest(MANIFEST), {}, predictor.config.get("label_map") or {c: c for c in predictor.classes})
    frame, split = rows_to_score(frame, path, None, False)
    measured = summarise(evaluate_checkpoint(predictor, frame, progress=False)[0])
    assert stored["measured_on"]["images"] == stored["n"] == measured["n"]
    assert stored["measured_on"]["split_file"] == split.name
    assert stored["accuracy"] == pytest.approx(measured["accuracy"], abs=1e-3)
    for label in predictor.classes:
        for key in ("sensitivity", "specificity", "auroc"):
            assert stored[label][key] == pytest.approx(measured[label][key], abs=1e-3), (label, key)
