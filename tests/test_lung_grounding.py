"""The lung-grounded pipeline: lung-box framing, the activation-mass penalty, folds, resume and
the operating point chosen on out-of-fold data."""


import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import DATA_DIR, MANIFEST
from covidxr import Predictor, framing
from covidxr.calibration import (brier_score, calibrate, choose_threshold, expected_calibration_error,
                                 fit_temperature, rescale)
from covidxr.checkpoint import load_checkpoint, read_config, update_config
from covidxr.data import assign_fold, load_grayscale, read_manifest, select, split_by_patient
from covidxr.segment import LungSegmenter
from covidxr.training import outside_share


@pytest.fixture(scope="module")
def segmenter():
    return LungSegmenter.load()


@pytest.fixture(scope="module")
def masked_rows(manifest_frame):
    return manifest_frame[manifest_frame["lung_mask"] != ""].sort_values("filename").head(6)


def test_lung_box_holds_the_hand_drawn_lungs(segmenter, masked_rows):
    """The crop is about the hand-drawn lungs' own box, and holds nearly all of them."""
    for row in masked_rows.itertuples():
        gray = load_grayscale(DATA_DIR / row.filename)
        found = framing.find(gray, framing.LUNG_CROP, segmenter)
        hand = np.asarray(Image.open(DATA_DIR / row.lung_mask).convert("L")) > 127
        top, left, bottom, right = found.box
        assert found.lungs_found and not found.warnings
        assert hand[top:bottom, left:right].sum() >= 0.95 * hand.sum(), row.filename
        rows, columns = np.flatnonzero(hand.any(1)), np.flatnonzero(hand.any(0))
        hand_box = (rows[-1] + 1 - rows[0]) * (columns[-1] + 1 - columns[0])
        assert (bottom - top) * (right - left) < 1.5 * hand_box, row.filename  # the lungs' box, not the image


def test_no_lungs_falls_back_to_the_whole_image_with_a_warning(segmenter):
    flat = np.full((300, 240), 0.5, np.float32)
    found = framing.find(flat, framing.LUNG_CROP, segmenter)
    assert found.lungs_found is False and found.box == (0, 0, 300, 240)
    assert found.warnings == [framing.NO_LUNGS_WARNING]
    tensor = framing.model_view(flat, found, framing.LUNG_CROP, 64)
    assert tensor.shape == (1, 64, 64) and tensor.dtype == torch.uint8


def test_whole_image_recipe_needs_no_lung_model():
    gray = np.random.default_rng(0).random((90, 120)).astype(np.float32)
    found = framing.find(gray, framing.WHOLE_IMAGE)
    assert found.box == (0, 0, 90, 120) and found.lungs_found is None and found.lung_mask is None


def test_maps_go_back_into_the_box_and_nowhere_else():
    found = framing.Framing(box=(20, 30, 80, 110), shape=(100, 140))
    placed = framing.to_image_frame(np.ones((16, 16), np.float32), found)
    assert placed.shape == (100, 140)
    assert placed[20:80, 30:110].min() == 1.0 and placed.sum() == 60 * 80
    shrunk = framing.to_image_frame(np.ones((16, 16), np.float32), found, (50, 70))
    assert shrunk.shape == (50, 70) and shrunk[10:40, 15:55].min() == 1.0 and shrunk.sum() == 30 * 40


def test_dimming_darkens_only_what_lies_outside_the_lungs(segmenter, masked_rows):
    gray = load_grayscale(DATA_DIR / masked_rows.iloc[0]["filename"])
    recipe = dict(framing.LUNG_CROP, outside=0.2)
    found = framing.find(gray, recipe, segmenter)
    region = framing.region_view(found, recipe, 96)[0].bool()
    plain = framing.model_view(gray, found, framing.LUNG_CROP, 96)[0].float()
    dimmed = framing.model_view(gray, found, recipe, 96)[0].float()
    assert dimmed[~region].mean() < 0.6 * plain[~region].mean()
    assert region.float().mean() > 0.3


def test_outside_share_counts_activation_mass_off_the_lungs():
    regions = torch.zeros((3, 1, 8, 8), dtype=torch.uint8)
    regions[:, :, :, :4] = 1  # left half is lung
    cams = torch.full((3, 4, 4), -30.0)
    cams[0, :, :2] = 10.0  # all on the lung half
    cams[1, :, 2:] = 10.0  # all off it
    shares = outside_share(cams, regions)
    assert shares[0].item() == pytest.approx(0.0, abs=1e-3)
    assert shares[1].item() == pytest.approx(1.0, abs=1e-3)
    # A map that is negative everywhere cannot hide from the penalty: it still counts, evenly.
    assert shares[2].item() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.slow  # trains, or reads the whole manifest
def test_folds_partition_the_pool_by_patient(manifest_frame):
    frame = select(read_manifest(MANIFEST), {}, {c: c for c in ("covid", "normal", "pneumonia")})
    frame = split_by_patient(frame, seed=0)
    folds = [assign_fold(frame, 3, k, seed=0) for k in range(3)]
    held = [set(f.loc[f["split"] == "val", "filename"]) for f in folds]
    pool = set(frame.loc[frame["split"].isin(["train", "val"]), "filename"])
    assert set().union(*held) == pool and sum(map(len, held)) == len(pool)
    for f in folds:
        assert (f["split"] == "test").equals(frame["split"] == "test")
        assert f[f["split"].isin(["train", "val"])].groupby("patient_id")["split"].nunique().max() == 1


def test_temperature_is_recovered_from_overconfident_probabilities():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.0, (4000, 3))
    true_probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    targets = np.array([rng.choice(3, p=p) for p in true_probabilities])
    overconfident = rescale(true_probabilities, 1 / 2.5)  # logits multiplied by 2.5
    temperature = fit_temperature(overconfident, targets)
    assert 2.2 < temperature < 2.8
    calibrated = rescale(overconfident, temperature)
    assert expected_calibration_error(calibrated, targets) < expected_calibration_error(overconfident, targets) / 2
    assert brier_score(calibrated, targets) < brier_score(overconfident, targets)


def test_threshold_is_the_highest_that_reaches_the_sensitivity():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.6, 0.2])
    positive = np.array([True] * 10 + [False] * 2)
    threshold = choose_threshold(scores, positive, "sensitivity", 0.8)
    assert threshold == 0.2
    assert (scores[positive] >= threshold).mean() >= 0.8
    assert (scores[positive] >= threshold + 1e-6).mean() < 0.8


def test_youden_threshold_maximises_sensitivity_plus_specificity_lowest_among_ties():
    scores = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.6, 0.35, 0.2, 0.1])
    positive = np.array([True] * 5 + [False] * 4)
    threshold = choose_threshold(scores, positive, "youden")
    # Every candidate threshold, J worked out here by hand-counting.
    def j(t):
        return (scores[positive] >= t).mean() + (scores[~positive] < t).mean() - 1
    best = max(j(t) for t in scores)
    assert j(threshold) == pytest.approx(best)
    assert threshold == min(t for t in scores if j(t) == pytest.approx(best))
    with pytest.raises(ValueError, match="unknown threshold rule"):
        choose_threshold(scores, positive, "median")


def test_calibration_error_uses_sklearns_bins():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(3)
    probabilities = rng.dirichlet([2, 1, 1], 500)
    targets = rng.integers(0, 3, 500)
    accuracy, confidence = calibration_curve(probabilities.argmax(1) == targets, probabilities.max(1), n_bins=10)
    edges = np.linspace(0, 1, 11)
    sizes = np.array([((probabilities.max(1) > lo) & (probabilities.max(1) <= hi)).sum()
                      for lo, hi in zip(edges[:-1], edges[1:])])
    sizes = sizes[sizes > 0]
    assert expected_calibration_error(probabilities, targets) == pytest.approx(
        (np.abs(accuracy - confidence) * sizes).sum() / 500)


@pytest.mark.slow  # trains, or reads the whole manifest
def test_calibration_is_stamped_into_the_checkpoint_and_used(tmp_path, tiny_run):
    rng = np.random.default_rng(1)
    classes = ["covid", "normal", "pneumonia"]
    targets = rng.integers(0, 3, 300)
    probabilities = rng.dirichlet([1, 1, 1], 300)
    probabilities[np.arange(300), targets] += 1.5
    probabilities /= probabilities.sum(1, keepdims=True)
    table = pd.DataFrame({"target": [classes[t] for t in targets], "fold": np.arange(300) % 3})
    result = calibrate(table, probabilities, classes, 0.95)
    assert result["at_threshold"]["sensitivity"] >= 0.95
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes((tiny_run / "model.safetensors").read_bytes())
    from covidxr.calibration import stamp

    stamp(checkpoint, result, tmp_path)
    before, _ = load_checkpoint(tiny_run / "model.safetensors")
    after, config = load_checkpoint(checkpoint)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert config["decision"] == read_config(checkpoint)["decision"]
    assert config["decision"]["threshold"] == result["threshold"]
    # The test metrics were measured under the old rule: kept as history, marked stale.
    assert "metrics" in config["stale"] and "covidxr calibrate" in config["stale"]["metrics"]
    predictor = Predictor.load(checkpoint)
    assert predictor.temperature == result["temperature"]
    plain = Predictor.load(tiny_run / "model.safetensors")
    image = np.random.default_rng(2).random((80, 80)).astype(np.float32)
    scaled = predictor.predict(image).probabilities
    unscaled = plain.predict(image).probabilities
    expected = rescale(np.array([list(unscaled.values())]), result["temperature"])[0]
    np.testing.assert_allclose(list(scaled.values()), expected, atol=2e-3)


@pytest.mark.slow  # trains, or reads the whole manifest
def test_update_config_refuses_to_drop_required_keys(tmp_path, tiny_run):
    from covidxr.checkpoint import CheckpointError

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes((tiny_run / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError):
        update_config(checkpoint, {"task": "unknown"})
    assert read_config(checkpoint)["arch"] == "cxrnet"


def _tiny_args(out, cache, *extra):
    return ["--manifest", str(MANIFEST), "--limit", "6", "--input-size", "64", "--batch-size", "8",
            "--out", str(out), "--cache-dir", str(cache), "--no-gallery", "--no-hospitals", *extra]


@pytest.mark.slow  # trains, or reads the whole manifest
def test_lung_crop_fold_run_with_penalty_writes_out_of_fold_rows(tmp_path):
    from covidxr.training import main

    out = main(_tiny_args(tmp_path / "fold1", tmp_path / "cache", "--epochs", "1", "--framing", "lung_crop",
                          "--cam-penalty", "1", "--keep", "last", "--folds", "3", "--fold", "1"))
    oof = pd.read_csv(out / "oof.csv", dtype=str, keep_default_na=False)
    split = pd.read_csv(out / "split.csv", dtype=str, keep_default_na=False)
    assert set(oof["filename"]) == set(split.loc[split["split"] == "val", "filename"])
    assert (oof["fold"] == "1").all() and not any(c.endswith("path") for c in oof.columns)
    history = pd.read_csv(out / "history.csv")
    assert 0 <= history["train_outside_share"].iloc[0] <= 1
    config = read_config(out / "model.safetensors")
    assert config["framing"]["method"] == "lung_crop" and config["framing"]["lungs"] == "covidxr-lungs.safetensors"
    predictor = Predictor.load(out / "model.safetensors")
    peaks = []
    for target in predictor.classes:
        explanation = predictor.explain(DATA_DIR / oof["filename"].iloc[0], target=target)
        top, left, bottom, right = explanation.framing.box
        outside = np.ones(explanation.heatmap.shape, bool)
        outside[top:bottom, left:right] = False
        assert explanation.heatmap[outside].max() == 0  # nothing outside what the network read
        peaks.append(explanation.heatmap.max())
    assert max(peaks) > 0


@pytest.mark.slow  # trains, or reads the whole manifest
def test_resume_continues_after_the_last_finished_epoch(tmp_path, monkeypatch):
    """A crash in epoch 2 of 3 loses only epoch 2: --resume starts there, with epoch 1's state."""
    from covidxr import training

    real = training.train_one_epoch
    calls = []

    def crash_in_epoch_two(setup, norm, device, args, description, size, progress=True):
        calls.append(description)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(setup, norm, device, args, description, size, progress)

    args = _tiny_args(tmp_path / "run", tmp_path / "cache", "--epochs", "3", "--keep", "last")
    monkeypatch.setattr(training, "train_one_epoch", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        training.main(args)
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["progress"]["epoch"] == 1
    monkeypatch.setattr(training, "train_one_epoch", real)
    calls.clear()
    monkeypatch.setattr(training, "train_one_epoch", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    out = training.main(args + ["--resume"])
    assert [c.split(" (")[0] for c in calls] == ["epoch 2", "epoch 3"]
    assert list(pd.read_csv(out / "history.csv")["epoch"]) == [1, 2, 3]
    with pytest.raises(ValueError, match="other options"):
        training.main(_tiny_args(tmp_path / "run", tmp_path / "cache", "--epochs", "4", "--keep", "last",
                                 "--resume"))


def test_calibration_refuses_folds_that_chose_their_epoch_on_their_own_held_out_fold(tmp_path):
    """Honest folds: a fold run that kept its best epoch chose it on the images it then scores out
    of fold; its probabilities would make the threshold and temperature optimistic."""
    import json

    from covidxr.calibration import read_out_of_fold

    for fold, keep in enumerate(("last", "best")):
        folder = tmp_path / f"fold{fold}"
        folder.mkdir()
        pd.DataFrame({"filename": [f"{fold}-a.png", f"{fold}-b.png"], "target": ["covid", "normal"],
                      "p_covid": [0.8, 0.3], "p_normal": [0.2, 0.7]}).to_csv(folder / "oof.csv", index=False)
        (folder / "args.json").write_text(json.dumps({"keep": keep, "folds": 2, "fold": fold}))
    with pytest.raises(ValueError, match="--keep last"):
        read_out_of_fold(tmp_path)
    (tmp_path / "fold1" / "args.json").write_text(json.dumps({"keep": "last", "folds": 2, "fold": 1}))
    table, probabilities, classes = read_out_of_fold(tmp_path)
    assert len(table) == 4 and classes == ["covid", "normal"] and probabilities.shape == (4, 2)
