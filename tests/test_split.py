"""Patient-disjoint splits: no patient and no image on two sides, or training refuses."""

import pandas as pd
import pytest

from conftest import MANIFEST
from covidxr.data import (SplitLeakError, check_split, parse_label_map, patient_groups, read_manifest, select,
                          split_by_patient)

CLASSES = ["covid", "normal", "pneumonia"]


@pytest.fixture(scope="module")
def split_frame():
    frame = select(read_manifest(MANIFEST), {}, parse_label_map([], CLASSES))
    return split_by_patient(frame, seed=0)


def test_no_patient_or_image_in_two_splits(split_frame):
    used = split_frame[split_frame["split"] != "eval_only"]
    sides = {name: used[used["split"] == name] for name in ("train", "val", "test")}
    for a in sides:
        for b in sides:
            if a < b:
                assert not set(sides[a]["patient_id"]) & set(sides[b]["patient_id"]), (a, b)
                assert not set(sides[a]["sha256"]) & set(sides[b]["sha256"]), (a, b)


def test_split_sizes_and_strata(split_frame):
    used = split_frame[split_frame["split"] != "eval_only"]
    shares = used["split"].value_counts(normalize=True)
    assert 0.6 < shares["train"] < 0.8
    assert 0.1 < shares["val"] < 0.2 and 0.1 < shares["test"] < 0.2
    # Every class and every source reaches the test split.
    test = used[used["split"] == "test"]
    assert set(test["target"]) == set(CLASSES)
    assert set(test["source_dataset"]) == set(used["source_dataset"])


def test_unmapped_labels_are_evaluation_only(split_frame):
    eval_only = split_frame[split_frame["split"] == "eval_only"]
    assert set(eval_only["label"]) == {"sars", "other"}
    assert (split_frame.loc[split_frame["label"] == "sars", "split"] == "eval_only").all()


@pytest.mark.slow  # three splits of the whole manifest
def test_same_seed_same_split_other_seed_other_split():
    frame = select(read_manifest(MANIFEST), {}, parse_label_map([], CLASSES))
    first = split_by_patient(frame, seed=3)["split"]
    again = split_by_patient(frame, seed=3)["split"]
    other = split_by_patient(frame, seed=4)["split"]
    assert first.equals(again)
    assert not first.equals(other)


def test_leaks_are_refused():
    frame = pd.DataFrame({
        "patient_id": ["a", "a", "b", "c"],
        "sha256": ["1", "2", "3", "4"],
        "split": ["train", "test", "val", "test"],
    })
    with pytest.raises(SplitLeakError, match="patient_id"):
        check_split(frame)
    frame["patient_id"] = ["a", "d", "b", "c"]
    check_split(frame)  # clean now
    frame.loc[3, "sha256"] = "1"  # the same picture under two patients
    with pytest.raises(SplitLeakError, match="sha256"):
        check_split(frame)


def test_duplicate_image_across_patients_stays_on_one_side():
    rows = []
    for k in range(40):
        rows.append({"patient_id": f"p{k}", "sha256": f"s{k}", "target": ["covid", "normal"][k % 2],
                     "source_dataset": "x", "label": ["covid", "normal"][k % 2]})
    rows.append({"patient_id": "p99", "sha256": "s0", "target": "covid", "source_dataset": "x", "label": "covid"})
    for seed in range(5):
        split = split_by_patient(pd.DataFrame(rows), seed=seed)
        assert split.loc[split["sha256"] == "s0", "split"].nunique() == 1


def test_duplicate_grouping_is_transitive():
    # C shares sha2 with B, B shares sha1 with A: all three patients hold one group, though C and
    # A share no image directly (a first-owner rule put C apart from A and B).
    frame = pd.DataFrame({"patient_id": ["C", "A", "B", "B", "D"],
                          "sha256": ["sha2", "sha1", "sha1", "sha2", "sha3"]})
    groups = patient_groups(frame)
    assert groups.iloc[:4].nunique() == 1
    assert groups.iloc[4] != groups.iloc[0]  # an unrelated patient stays its own group


def test_transitive_duplicates_split_without_leak():
    rows = [{"patient_id": f"p{k}", "sha256": f"s{k}", "target": ["covid", "normal"][k % 2],
             "source_dataset": "x", "label": ["covid", "normal"][k % 2]} for k in range(40)]
    rows += [{"patient_id": "C", "sha256": "s2", "target": "covid", "source_dataset": "x", "label": "covid"},
             {"patient_id": "p1", "sha256": "s2", "target": "covid", "source_dataset": "x", "label": "covid"}]
    for seed in range(5):
        split = split_by_patient(pd.DataFrame(rows), seed=seed)  # raised SplitLeakError before
        assert split.loc[split["patient_id"].isin(["C", "p1", "p2"]), "split"].nunique() == 1
