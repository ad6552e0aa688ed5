"""The shortcut audit on a small real subset writes every table, the plot and the sanity check."""

import json

import numpy as np

from conftest import MANIFEST
from covidxr import Predictor
from covidxr.audit import GROUPS, main, randomisation_check
from covidxr.predictor import SHIPPED_SPLIT


def test_audit_command_on_a_small_subset(tmp_path):
    result = main(["--manifest", str(MANIFEST), "--split-csv", str(SHIPPED_SPLIT), "--filter",
                   "source_dataset=kermany,nih14", "--limit", "10", "--sanity-images", "3", "--out", str(tmp_path)])
    for name in ("audit.md", "audit.json", "audit.csv", "lung_focus.png", "lowest_focus.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = (tmp_path / "audit.md").read_text()
    for title in GROUPS:
        assert f"## By {title}" in report
    assert "Randomised-weights sanity check" in report
    tables = json.loads((tmp_path / "audit.json").read_text())["tables"]
    assert set(tables) == set(GROUPS) | {"all"}
    assert tables["all"][0]["images"] == 10
    focus = [row["lung focus, mean"] for row in tables["source"]]
    assert all(0 <= value <= 1 for value in focus)
    assert -1 <= result["sanity"]["spearman_mean"] <= 1


def test_randomised_weights_change_the_maps(manifest_frame):
    from conftest import real_image

    predictor = Predictor.load()
    paths = [str(real_image(manifest_frame, "covid", "ieee8023", i)) for i in range(3)]
    check = randomisation_check(predictor, paths, progress=False)
    assert check["images"] == 3
    # A map that ignored the weights would correlate near 1 with the random model's.
    assert check["spearman_mean"] < 0.8
    assert np.isfinite(check["spearman_abs_mean"])


def test_store_notice_sets_the_threshold_from_correct_test_xrays(tmp_path):
    """`--store-notice`: the 10th percentile of lung focus on the correctly classified test rows,
    written into the checkpoint's description; the weights stay as they were; the app reads it."""
    import shutil

    import pandas as pd
    import pytest
    import torch

    from covidxr.checkpoint import load_checkpoint, read_config
    from covidxr.predictor import SHIPPED_CHECKPOINT
    from covidxr.serve import notice_facts, notice_rule

    checkpoint = tmp_path / "model.safetensors"
    shutil.copy(SHIPPED_CHECKPOINT, checkpoint)
    with pytest.raises(SystemExit):  # which X-rays are the test ones is the split's to say
        main(["--checkpoint", str(checkpoint), "--manifest", str(MANIFEST), "--store-notice"])
    result = main(["--checkpoint", str(checkpoint), "--manifest", str(MANIFEST), "--split-csv", str(SHIPPED_SPLIT),
                   "--store-notice", "--limit", "12"])
    table = result["table"]
    split = pd.read_csv(SHIPPED_SPLIT)
    assert set(table["filename"]) <= set(split.loc[split["split"] == "test", "filename"]) and len(table) == 12
    correct = table.loc[table["correct"] == "yes", "lung_focus"]
    stored = read_config(checkpoint)["lung_focus_notice"]
    assert stored == result["notice"] and stored["split"] == "test" and stored["images"] == len(correct) > 0
    assert stored["threshold"] == pytest.approx(np.percentile(correct, 10))
    assert stored["fires_on_correct"] == pytest.approx((correct < stored["threshold"]).mean())
    before, _ = load_checkpoint(SHIPPED_CHECKPOINT)
    after, config = load_checkpoint(checkpoint)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert notice_rule(config) == stored
    assert f"{stored['threshold']:.1%}" in notice_facts(config) and "correctly classified test X-rays" in notice_facts(config)
