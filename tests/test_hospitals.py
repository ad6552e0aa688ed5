"""Hospitals in no training source: reading them, training with one, judging the others."""

import argparse

import numpy as np
import pandas as pd
import pytest

from conftest import DATA_DIR, MANIFEST
from covidxr.data import read_manifest, select
from covidxr.hospitals import available, hospitals_dir, judge, read_hospital, table
from covidxr.segment import SHIPPED_LUNGS
from covidxr.training import source_balanced_weights, split_frames

HOSPITALS = hospitals_dir(None, DATA_DIR)
CLASSES = ["covid", "normal", "pneumonia"]
SHIPPED_SPLIT = SHIPPED_LUNGS.parent / "covidxr-cxrnet.split.csv"


def test_both_hospitals_are_found_and_nothing_in_them_is_covid():
    assert {"shenzhen", "montgomery"} <= set(available(HOSPITALS))
    for name in ("shenzhen", "montgomery"):
        frame = read_hospital(HOSPITALS, name, CLASSES)
        assert set(frame["label"]) == {"normal", "other"}
        assert set(frame["target"]) == {"normal", "pneumonia"}  # tuberculosis: not-COVID pneumonia
        assert (frame["target"] == "normal").sum() == (frame["label"] == "normal").sum()
    binary = read_hospital(HOSPITALS, "montgomery", ["covid", "normal"])
    assert set(binary["target"]) == {"normal", ""}  # no class to feed TB to: evaluation only


def test_unknown_hospital_says_which_exist():
    with pytest.raises(FileNotFoundError, match="montgomery"):
        read_hospital(HOSPITALS, "nowhere", CLASSES)


def test_source_balancing_gives_each_class_and_each_source_in_it_an_equal_share():
    rows = pd.DataFrame({"target": ["covid"] * 6 + ["normal"] * 13 + ["pneumonia"] * 2,
                         "source_dataset": ["a"] * 5 + ["b"] + ["nih"] * 10 + ["sz"] * 3 + ["nih"] * 2})
    weights = pd.Series(source_balanced_weights(rows).numpy())
    by_class = weights.groupby(rows["target"]).sum()
    np.testing.assert_allclose(by_class.to_numpy(), by_class.iloc[0])
    by_group = weights.groupby([rows["target"], rows["source_dataset"]]).sum()
    np.testing.assert_allclose(by_group["covid"].to_numpy(), by_group["covid"].iloc[0])
    np.testing.assert_allclose(by_group["normal"].to_numpy(), by_group["normal"].iloc[0])


def test_split_from_keeps_the_earlier_split_and_splits_a_new_hospital_by_patient():
    label_map = {name: name for name in CLASSES}
    cxr = select(read_manifest(MANIFEST), {}, label_map)
    hospital = read_hospital(HOSPITALS, "montgomery", CLASSES)
    args = argparse.Namespace(split_from=str(SHIPPED_SPLIT), seed=0, val_fraction=0.15, test_fraction=0.15)
    frame = split_frames([cxr, hospital], args)
    earlier = pd.read_csv(SHIPPED_SPLIT, dtype=str, keep_default_na=False).set_index("sha256")["split"]
    ours = frame[frame["source_dataset"] != "montgomery"].set_index("sha256")["split"]
    pd.testing.assert_series_equal(ours.sort_index(), earlier.loc[ours.index].sort_index(), check_names=False)
    new = frame[frame["source_dataset"] == "montgomery"]
    assert set(new["split"]) == {"train", "val", "test"}
    assert new.groupby("patient_id")["split"].nunique().max() == 1  # follow-ups stay with their patient
    partial = argparse.Namespace(**vars(args) | {"split_from": None})
    assert len(split_frames([cxr.head(50)], partial)) == 50


def test_judge_counts_covid_calls_under_the_decision_rule(predictor):
    frame = read_hospital(HOSPITALS, "montgomery", CLASSES)
    frame = pd.concat([frame[frame["label"] == "normal"].head(3), frame[frame["label"] == "other"].head(2)])
    result = judge(predictor, frame.reset_index(drop=True), cache_dir=None)
    assert result["n"] == 5 and result["by_label"]["normal"]["n"] == 3 and result["by_label"]["other"]["n"] == 2
    called = [predictor.predict(path).label == "covid" for path in frame["path"]]
    assert result["called_covid"] == pytest.approx(np.mean(called))


def test_a_checkpoint_trained_on_every_hospital_is_told_so_not_shown_an_empty_table():
    said = table({}, ["shenzhen", "montgomery"])
    assert "no hospital left to judge" in said and "shenzhen, montgomery" in said and "|" not in said
    assert table({}, []).startswith("no hospital sets found")
    one = {"n": 2, "called_covid": 0.5, "called_covid_argmax": 0.0, "median_p_covid": 0.3,
           "by_label": {"normal": {"n": 2, "called_covid": 0.5, "called_covid_argmax": 0.0}}}
    assert "| montgomery | 2 | 50.0% | 50.0% | nan% | 0.0% |" in table({"montgomery": one}, ["shenzhen"])
