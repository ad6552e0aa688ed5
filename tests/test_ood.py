"""The not-a-chest-X-ray check: warnings on photos, documents and thumbnails, none on most X-rays."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import DATA_DIR
from covidxr import Predictor
from covidxr.checkpoint import load_checkpoint, read_config
from covidxr.data import colourfulness
from covidxr.not_xrays import non_xray_images
from covidxr.ood import OutOfDistribution
from covidxr.predictor import SHIPPED_CHECKPOINT, SHIPPED_SPLIT


@pytest.fixture(scope="module")
def test_xrays():
    """X-rays of the shipped model's own test patients (never seen in its training)."""
    split = pd.read_csv(SHIPPED_SPLIT)
    rows = split[split["split"] == "test"].groupby("source_dataset").head(6)
    return [DATA_DIR / name for name in rows["filename"]]


def test_fit_thresholds_at_the_validation_percentile():
    rng = np.random.default_rng(0)

    def draw(per_class):  # two classes, 8 features, means 5 apart
        return np.r_[rng.normal(0, 1, (per_class, 8)), rng.normal(5, 1, (per_class, 8))]

    targets = np.r_[np.zeros(300), np.ones(300)]
    detector = OutOfDistribution.fit(draw(300), targets, draw(1000), input_size=224, percentile=95)
    # Fresh draws that neither the fit nor the threshold saw: about 5% lie beyond the threshold
    # (the validation set's own 5% would hold by construction, whatever the threshold meant).
    held_out = draw(2000)
    assert np.mean(detector.distance(held_out) > detector.threshold) == pytest.approx(0.05, abs=0.02)
    # Near either class mean: in distribution. Between them, or far away: out.
    assert detector.distance(np.zeros((1, 8)))[0] < detector.threshold
    assert detector.distance(np.full((1, 8), 5.0))[0] < detector.threshold
    assert detector.distance(np.full((1, 8), 2.5))[0] > detector.threshold
    assert detector.distance(np.full((1, 8), -20.0))[0] > 5 * detector.threshold
    assert detector.min_side == 112


def test_shipped_checkpoint_carries_the_check(predictor):
    config = read_config(SHIPPED_CHECKPOINT)
    assert config["ood"]["threshold"] > 0 and config["ood"]["percentile"] == 99.0
    state, _ = load_checkpoint(SHIPPED_CHECKPOINT)
    assert {"ood.class_means", "ood.precision"} <= set(state)
    assert state["ood.precision"].dtype == torch.float32  # kept at full precision, unlike the weights
    assert predictor.ood is not None and predictor.ood.class_means.shape == (3, 320)


def test_real_xrays_mostly_pass(predictor, test_xrays):
    warned = [path.name for path in test_xrays if predictor.predict(path).warnings]
    assert len(warned) <= 0.1 * len(test_xrays), warned


def test_non_xrays_are_flagged_with_a_prediction_still_given(predictor):
    images = non_xray_images()
    predictions = predictor.predict_batch([image for _, image in images])
    missed = [name for (name, _), p in zip(images, predictions) if not p.warnings]
    assert len(missed) <= 0.1 * len(images), missed
    assert all(p.label in predictor.classes for p in predictions)


def test_each_check_says_what_it_found(predictor, manifest_frame):
    xray = np.asarray(Image.open(DATA_DIR / manifest_frame.iloc[0]["filename"]).convert("L"))
    tinted = np.stack([xray, (xray * 0.5).astype(np.uint8), np.zeros_like(xray)], axis=-1)
    assert any("in colour" in w for w in predictor.predict(tinted).warnings)
    thumbnail = np.asarray(Image.fromarray(xray).resize((64, 64)))
    assert any("only 64 x 64 pixels" in w for w in predictor.predict(thumbnail).warnings)
    document = dict(non_xray_images())["generated:document0"]
    assert any("unlike the frontal chest X-rays" in w for w in predictor.predict(document).warnings)
    # Each of the three is the input check's verdict that this is no chest X-ray; the X-ray is not.
    assert [predictor.predict(image).not_an_xray for image in (tinted, thumbnail, document, xray)] == \
        [True, True, True, False]


def test_no_lungs_found_is_an_unusual_xray_not_a_refusal(predictor, manifest_frame):
    """The framing's "no lungs" warning keeps the prediction: only the input check refuses."""
    from covidxr.data import load_grayscale
    from covidxr.framing import NO_LUNGS_WARNING, Framing

    xray = DATA_DIR / manifest_frame.iloc[0]["filename"]
    tensor, _ = predictor.view(load_grayscale(xray))
    probabilities, features = predictor.probabilities_and_features(tensor[None])
    shape = Image.open(xray).size[::-1]
    no_lungs = Framing((0, 0, *shape), shape, np.zeros(shape, bool), lungs_found=False)
    prediction = predictor.prediction(probabilities[0], features[0], 0.0, shape, no_lungs)
    assert prediction.warnings == [NO_LUNGS_WARNING] and prediction.not_an_xray is False
    page = dict(non_xray_images())["generated:document0"]
    tensor, _ = predictor.view(load_grayscale(page))
    probabilities, features = predictor.probabilities_and_features(tensor[None])
    both = predictor.prediction(probabilities[0], features[0], 0.0, page.shape[:2], no_lungs)
    document = predictor.predict(page)
    assert both.not_an_xray and both.warnings == document.warnings + [NO_LUNGS_WARNING]


def test_gray_rgb_has_no_colour_and_explanations_carry_warnings(predictor):
    gray = np.random.default_rng(1).integers(0, 255, (50, 60), dtype=np.uint8)
    assert colourfulness(np.stack([gray] * 3, axis=-1)) == 0.0
    assert colourfulness(np.asarray(dict(non_xray_images())["skimage:astronaut"])) > 30
    explanation = predictor.explain(dict(non_xray_images())["skimage:coffee"])
    assert explanation.prediction.warnings == predictor.predict(dict(non_xray_images())["skimage:coffee"]).warnings
    assert len(explanation.prediction.warnings) == 2


def test_checkpoint_without_the_check_gives_no_warnings(tmp_path, predictor):
    from covidxr.checkpoint import load_checkpoint, save_checkpoint
    from covidxr.model import build_model
    from covidxr.predictor import SHIPPED_CHECKPOINT

    state, _ = load_checkpoint(SHIPPED_CHECKPOINT)
    model = build_model(predictor.config["arch"], len(predictor.classes))
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("ood.")})
    config = {k: v for k, v in predictor.config.items() if k not in ("format", "ood")}
    path = save_checkpoint(tmp_path / "plain.safetensors", model, config)
    plain = Predictor.load(path)
    assert plain.ood is None
    assert plain.predict(dict(non_xray_images())["skimage:astronaut"]).warnings == []


@pytest.mark.slow
def test_training_fits_the_check(tiny_run):
    predictor = Predictor.load(tiny_run / "model.safetensors")
    assert predictor.ood is not None and np.isfinite(predictor.ood.threshold)
    assert predictor.ood.min_side == 32  # half the run's 64-pixel input


@pytest.mark.slow
def test_refit_command_stores_the_check_in_a_loadable_checkpoint(tiny_run, tmp_path):
    """`python -m covidxr ood --write` rewrites the checkpoint with the stored (unfolded) weights."""
    import shutil

    from covidxr.ood_measure import main as ood_main

    checkpoint = tmp_path / "model.safetensors"
    shutil.copy(tiny_run / "model.safetensors", checkpoint)
    before = Predictor.load(checkpoint).predict(np.full((80, 80), 128, np.uint8)).probabilities
    result = ood_main(["--checkpoint", str(checkpoint), "--split-csv", str(tiny_run / "split.csv"),
                       "--out", str(tmp_path), "--write"])
    split = pd.read_csv(tiny_run / "split.csv")
    assert result["test_xrays"] == (split["split"] == "test").sum() and result["non_xrays"] == len(non_xray_images())
    assert result["false_alarm_rate"] == pytest.approx(result["false_alarms"] / result["test_xrays"])
    scores = pd.read_csv(tmp_path / "ood_scores.csv")
    assert scores.loc[scores.kind == "not_xray", "warned"].sum() == result["detected"]
    assert (tmp_path / "ood.json").stat().st_size > 0 and (tmp_path / "ood_distances.png").stat().st_size > 0
    reloaded = Predictor.load(checkpoint)
    assert reloaded.ood is not None and reloaded.config["ood"]["false_alarm_rate"] == result["false_alarm_rate"]
    after = reloaded.predict(np.full((80, 80), 128, np.uint8)).probabilities
    assert after == pytest.approx(before, abs=1e-3)  # fp16 storage, same weights
