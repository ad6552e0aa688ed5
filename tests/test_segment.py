"""Lung segmentation: the shipped U-Net on real X-rays, the evidence shares, a tiny training run."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import DATA_DIR, MANIFEST, real_image
from covidxr.checkpoint import load_checkpoint, read_config
from covidxr.segment import SHIPPED_LUNGS, LungSegmenter, build_parser, dice_iou, evidence_shares, main


@pytest.fixture(scope="module")
def segmenter():
    return LungSegmenter.load()


def test_mask_shape_and_range_on_a_real_xray(segmenter, manifest_frame):
    path = real_image(manifest_frame, "normal", "nih14", 3)
    mask = segmenter.segment(path)
    width, height = Image.open(path).size
    assert mask.dtype == bool and mask.shape == (height, width)
    assert 0.15 < mask.mean() < 0.6  # lungs fill a good part of a frontal film, never all of it
    columns = np.flatnonzero(mask.any(axis=0))
    left, right = mask[:, : width // 2].sum(), mask[:, width // 2:].sum()
    assert min(left, right) > 0.3 * max(left, right)  # one lung on each side
    assert columns.min() > 0.02 * width and columns.max() < 0.98 * width


def test_outline_is_the_scipy_erosion_boundary(segmenter, manifest_frame):
    from scipy import ndimage

    from covidxr.segment import outline

    mask = segmenter.segment(real_image(manifest_frame, "pneumonia", "kermany", 2))
    for width in (1, 3):
        expected = mask & ~ndimage.binary_erosion(mask, iterations=width)
        np.testing.assert_array_equal(outline(mask, width), expected)
    assert 0 < outline(mask, 3).sum() < mask.sum()


def test_held_out_masks_are_matched(segmenter):
    """Dice on held-out patients of the shipped lung model's own split (no training images)."""
    split = pd.read_csv(SHIPPED_LUNGS.with_suffix(".split.csv"))
    test = split[split["split"] == "test"].head(8)
    assert len(test) == 8
    scores = [dice_iou(segmenter.segment(DATA_DIR / row.filename),
                       np.asarray(Image.open(DATA_DIR / row.lung_mask).convert("L")) > 127)[0]
              for row in test.itertuples()]
    assert np.mean(scores) > 0.85, scores


def test_checkpoint_describes_itself():
    config = read_config(SHIPPED_LUNGS)
    assert config["task"] == "segmentation" and config["arch"] == "lung-unet"
    assert config["metrics"]["dice_mean"] >= 0.9
    assert config["metrics"]["images"] > 0


def test_evaluating_the_lung_model_leaves_its_batch_norms_alone(manifest_frame):
    from covidxr.segment import LungUNet

    state, config = load_checkpoint(SHIPPED_LUNGS)
    model = LungUNet(tuple(config["widths"]))
    model.load_state_dict(state)
    segmenter = LungSegmenter(model, config, "cpu")  # unfolded: its batch norms are still there
    model.train()  # as a training loop leaves the model it shares with its segmenter
    before = {k: v.clone() for k, v in model.state_dict().items()}
    segmenter.segment(real_image(manifest_frame, "normal", "nih14", 1))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], msg=name)


def test_default_options_retrain_the_shipped_lung_model():
    """`covidxr segment` with no options trains what was shipped: same input size and recipe."""
    config = read_config(SHIPPED_LUNGS)
    defaults = build_parser().parse_args([])
    assert defaults.input_size == config["input_size"] == 64
    for key in ("epochs", "lr", "batch_size", "seed", "negatives"):
        assert getattr(defaults, key) == config["training"][key], key


def test_evidence_shares():
    mask = np.zeros((100, 80), bool)
    mask[30:90, 15:65] = True
    inside = evidence_shares(mask.astype(float), mask)
    assert inside["lung_focus"] == pytest.approx(1.0)
    outside = evidence_shares((~mask).astype(float), mask)
    assert outside["lung_focus"] == pytest.approx(0.0)
    top = np.zeros((100, 80))
    top[:5] = 1.0
    shares = evidence_shares(top, mask)
    assert shares["top_share"] == pytest.approx(1.0) and shares["border_share"] == pytest.approx(1.0)
    assert evidence_shares(np.zeros((10, 10)), mask[:10, :10])["lung_focus"] == 0.0


def test_predictor_segments_and_explanations_carry_lung_focus(manifest_frame, predictor):
    path = real_image(manifest_frame, "covid", "ieee8023", 4)
    assert predictor.segment_lungs(path).shape == np.asarray(Image.open(path).convert("L")).shape
    explanation = predictor.explain(path)
    assert 0.0 <= explanation.lung_focus <= 1.0
    assert 0.0 <= explanation.border_share <= 1.0 and 0.0 <= explanation.top_share <= 1.0
    # Scored at one size (explain.SCORING_SIDE), with the map and the lungs drawn there.
    assert max(explanation.scoring_shape) == 512 and explanation.scored_map.shape == explanation.scoring_shape
    expected = evidence_shares(explanation.scored_map, explanation.scored_lungs)["lung_focus"]
    assert explanation.lung_focus == pytest.approx(expected)


@pytest.mark.slow
def test_tiny_training_run_and_contact_sheet(tmp_path, monkeypatch):
    out = tmp_path / "lungs"
    monkeypatch.chdir(tmp_path)
    main(["--data", str(DATA_DIR), "--out", str(out), "--input-size", "64", "--epochs", "1",
          "--limit", "12", "--batch-size", "4"])
    trained = LungSegmenter.load(out / "lungs.safetensors")
    assert trained.config["input_size"] == 64
    scores = pd.read_csv(out / "test_scores.csv")
    assert trained.config["metrics"]["dice_mean"] == pytest.approx(scores["dice"].mean())
    # What the checkpoint records of its data is relative: it names no folder of this machine.
    manifest = trained.config["data"]["manifest"]
    assert not manifest.startswith("/") and (tmp_path / manifest).resolve() == MANIFEST.resolve()
    split = pd.read_csv(out / "split.csv")
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    # Batch norms saw the training batches only: validation and test ran in eval mode.
    state, _ = load_checkpoint(out / "lungs.safetensors")
    steps = int(np.ceil((split["split"] == "train").sum() / 4)) * trained.config["training"]["kept_epoch"]
    assert {int(v) for k, v in state.items() if k.endswith("num_batches_tracked")} == {steps}
    sheet = main(["--sheet", "--manifest", str(MANIFEST), "--out", str(tmp_path / "sheet")])
    assert Image.open(sheet).size[0] > 500


def test_kept_answers_are_the_models_and_are_reused(manifest_frame, monkeypatch):
    """probabilities(..., keep=True): the same answer as a fresh pass; the same input asked again
    (the check, then the outline, of one image) runs no pass; at most KEPT_ANSWERS are kept."""
    from covidxr.data import load_grayscale, prepare
    from covidxr.segment import KEPT_ANSWERS

    segmenter = LungSegmenter.load()
    images = [prepare(load_grayscale(real_image(manifest_frame, "normal", "nih14", i)), 64) for i in range(3)]
    batch = torch.stack(images[:2])
    fresh = segmenter.probabilities(batch)
    assert torch.equal(segmenter.probabilities(batch, keep=True), fresh)
    passes = []
    run = segmenter._probabilities
    monkeypatch.setattr(segmenter, "_probabilities", lambda inputs: (passes.append(len(inputs)), run(inputs))[1])
    assert torch.equal(segmenter.probabilities(batch[1:], keep=True), fresh[1:]) and passes == []
    segmenter.probabilities(torch.stack(images[1:]), keep=True)
    assert passes == [1]  # only the new image ran
    for shift in range(KEPT_ANSWERS + 2):
        segmenter.probabilities(torch.roll(images[2], shift + 1, dims=-1)[None], keep=True)
    assert len(segmenter._kept) == KEPT_ANSWERS


def test_check_and_outline_of_a_margined_xray_share_one_lung_pass(manifest_frame, monkeypatch):
    """An X-ray with a uniform frame: the check reads it trimmed, the outline whole. Both are
    asked in the check's one pass (with the inverse), and the outline that follows runs none; its
    mask is the one a fresh segmenter draws."""
    from covidxr.data import load_grayscale
    from covidxr.xray_check import XrayCheck, trimmed

    film = trimmed(load_grayscale(real_image(manifest_frame, "normal", "nih14", 0)))
    assert trimmed(film).shape == film.shape
    framed = np.pad(film, 24, constant_values=1.0)  # a white frame
    assert trimmed(framed).shape == film.shape
    segmenter = LungSegmenter.load()
    passes = []
    run = segmenter._probabilities
    monkeypatch.setattr(segmenter, "_probabilities", lambda inputs: (passes.append(len(inputs)), run(inputs))[1])
    finding = XrayCheck.load().examine(framed, 0.0, segmenter)
    assert not finding.reasons and passes == [3]
    mask = segmenter.segment(framed)
    assert passes == [3]
    assert np.array_equal(mask, LungSegmenter.load().segment(framed))
    # Without a frame the check's view is the outline's: two inputs, as before.
    segmenter.forget()
    XrayCheck.load().examine(film, 0.0, segmenter)
    assert passes == [3, 2]


def test_a_shrunk_display_copy_gets_the_full_images_lungs_from_the_checks_pass(manifest_frame, monkeypatch):
    """explain(..., max_side) shows a shrunk copy; its lung outline is the full image's mask drawn
    at the copy's size, answered by the input check's one lung pass (no second pass)."""
    from covidxr.data import load_grayscale
    from covidxr.predictor import Predictor

    path = real_image(manifest_frame, "covid", "ieee8023", 0)
    gray = load_grayscale(path)
    predictor = Predictor.load()
    segmenter = predictor.segmenter
    segmenter.forget()
    passes = []
    run = segmenter._probabilities
    monkeypatch.setattr(segmenter, "_probabilities", lambda inputs: (passes.append(len(inputs)), run(inputs))[1])
    explanation = predictor.explain(path, max_side=256)
    shown = explanation.image.shape
    assert max(shown) == 256 and explanation.lung_focus is not None
    assert len(passes) == 1
    assert np.array_equal(explanation.lung_mask, LungSegmenter.load().segment(gray, shown))


def test_no_classifier_test_patient_trains_or_validates_the_lung_model():
    """The shipped lung model's split, joined with every bundled classifier's: a classifier's test
    patient with a mask is in the lung model's test split, never its training or validation."""
    import pandas as pd

    from covidxr.segment import bundled_splits, classifier_test_patients

    splits = bundled_splits()
    assert len(splits) == 3
    held_out = classifier_test_patients(splits)
    lungs = pd.read_csv(SHIPPED_LUNGS.with_suffix(".split.csv"), dtype=str)
    learned = lungs[lungs["split"].isin(["train", "val"])]
    assert held_out and not set(learned["patient_id"]) & held_out
    assert set(lungs.loc[lungs["split"] == "test", "patient_id"]) & held_out  # the test split is theirs
    config = read_config(SHIPPED_LUNGS)
    assert sorted(config["data"]["held_out"]["splits"]) == sorted(split.name for split in splits)


def test_the_split_around_held_out_patients_keeps_shared_images_together():
    import pandas as pd

    from covidxr.segment import split_around

    frame = pd.DataFrame({"patient_id": [f"p{i // 2}" for i in range(40)],
                          "sha256": [f"h{i}" for i in range(40)]})
    frame.loc[10, "sha256"] = frame.loc[0, "sha256"]  # p5 shares an image with p0, a held-out patient
    split = split_around(frame, {"p0", "p1"}, seed=0, val_fraction=0.2)
    assert set(split.loc[split["split"] == "test", "patient_id"]) == {"p0", "p1", "p5"}
    assert 0 < (split["split"] == "val").sum() < (split["split"] == "train").sum()


def test_the_lung_model_finds_no_lungs_in_nothing(segmenter):
    """A blank field has no lungs: trained with blank fields beside the masks, the lung model draws
    none there (one retrain without them drew a fifth of a blank image)."""
    for level in (0.0, 0.5, 1.0):
        assert segmenter.segment(np.full((300, 240), level, np.float32)).mean() < 0.01
