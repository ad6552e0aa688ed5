"""The quality audit and the recipes that answer it: every model's answer should survive a JPEG,
a smaller copy or a blur (covidxr/quality.py, framing.quality_floor, data.MatchedQuality and
training's consistency loss)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA_DIR, MANIFEST, real_image
from covidxr import quality
from covidxr.data import MatchedQuality, load_grayscale
from covidxr.framing import frame


def test_each_variant_changes_the_file_not_the_anatomy(manifest_frame):
    gray = load_grayscale(real_image(manifest_frame, "normal", "nih14"))
    for name in quality.VARIANTS:
        made = np.asarray(quality.variant(gray, name), np.float32) / 255
        assert made.ndim == 2 and 0 < made.std(), name
        if name.startswith("longer side"):
            assert max(made.shape) == int(name.split()[2]), name
        else:
            assert made.shape == gray.shape, name
            assert np.corrcoef(made.ravel(), gray.ravel())[0, 1] > 0.95, name  # the same X-ray
            assert np.abs(made - gray).mean() > 1e-3, name  # but another file
    # The blur is scaled to the image: the same anatomy blurred alike whatever the file's size.
    small, large = quality.blur(gray[:256, :256]), quality.blur(np.kron(gray[:256, :256], np.ones((2, 2))))
    assert np.abs(large[::2, ::2] - small).mean() < 0.01


def test_the_quality_floor_reads_a_png_and_its_jpeg_alike(manifest_frame):
    """A lossless NIH PNG and its JPEG at quality 30, a 300-px box of each read at 224 px (as the
    lung reader reads the lungs' box), with and without a floor at 96 px: the floor takes most of
    the fine difference (the JPEG's blocks and ringing) away before the network sees it."""
    import cv2

    gray = load_grayscale(real_image(manifest_frame, "normal", "nih14"))
    box = (slice(100, 400), slice(150, 450))
    png, compressed = gray[box], quality.jpeg(gray, 30)[box]

    def fine(view):  # what a 2-px blur takes away: the detail a file's encoding changes
        view = view[0].numpy().astype(np.float32)
        return view - cv2.GaussianBlur(view, (0, 0), 2)

    difference = {}
    for name, recipe in (("plain", {"method": "whole"}), ("floored", {"method": "whole", "floor": {"side": 96}})):
        difference[name] = np.abs(fine(frame(png, recipe, 224)[0]) - fine(frame(compressed, recipe, 224)[0])).mean()
    assert difference["floored"] < 0.5 * difference["plain"], difference


def test_matched_quality_degrades_nearly_every_image_whatever_its_label():
    torch.manual_seed(0)
    image = (torch.rand(1, 64, 64) * 255).to(torch.uint8)
    changed = sum(not torch.equal(MatchedQuality(0.8)(image), image) for _ in range(200))
    assert 0.72 <= changed / 200 <= 0.88
    assert torch.equal(MatchedQuality(0.0)(image), image)


class ReadsJpegBlocks:
    """A stand-in model that calls COVID when it sees 8-px JPEG block edges: the shortcut the
    audit is there to catch."""

    classes = ["covid", "normal", "pneumonia"]

    def predict_batch(self, images, batch_size=32):
        results = []
        for image in images:
            gray = load_grayscale(image)
            rows = np.abs(np.diff(gray, axis=0)).mean(1)
            blockiness = rows[7::8].mean() / max(rows.mean(), 1e-6)
            p = 0.9 if blockiness > 1.15 else 0.1
            results.append(SimpleNamespace(decided="covid" if p > 0.5 else "normal",
                                           probabilities={"covid": p, "normal": 1 - p, "pneumonia": 0.0}))
        return results


def test_a_model_that_reads_jpeg_artifacts_is_flagged(manifest_frame):
    rows = manifest_frame[(manifest_frame["label"] == "normal") & (manifest_frame["source_dataset"] == "nih14")]
    paths = [str(DATA_DIR / name) for name in rows["filename"][:6]]
    measured = quality.audit_rows(ReadsJpegBlocks(), paths, ["adult normals"] * len(paths),
                                  ["JPEG quality 30", "gamma 1.4"], progress=False)
    summary = quality.summarise(measured).set_index("variant")
    assert summary.loc[quality.AS_IS, "labels_changed"] == 0
    assert summary.loc["JPEG quality 30", "called_covid"] > summary.loc[quality.AS_IS, "called_covid"]
    assert summary.loc["gamma 1.4", "labels_changed"] == 0
    flags = quality.flagged(quality.summarise(measured))
    assert [(group, variant) for group, variant, _ in flags] == [("adult normals", "JPEG quality 30")]


@pytest.mark.slow
def test_the_audit_on_real_xrays(tmp_path):
    """`covidxr quality` over a sample of the bundled whole-image model's test split and the
    hospitals: a table, a CSV and a plot; as it is, no label changes."""
    result = quality.main(["--checkpoint", "whole-image", "--sample", "3", "--variant", "JPEG quality 30",
                           "--variant", "longer side 256 px", "--out", str(tmp_path)])
    rows = result["covidxr-cxrnet"] if "covidxr-cxrnet" in result else next(iter(result.values()))
    groups = {row["group"] for row in rows}
    assert {"test: COVID", "test: adult normals", "shenzhen: adults, no COVID"} <= groups
    assert all(row["labels_changed"] == 0 for row in rows if row["variant"] == quality.AS_IS)
    assert all(0 <= row["called_covid"] <= 1 for row in rows)
    assert (tmp_path / "quality.png").stat().st_size > 10_000 and len(list(tmp_path.glob("*.md"))) == 1


@pytest.mark.slow
def test_the_quality_recipes_loss_falls_in_a_tiny_real_run():
    """Real X-rays through the floor, matched quality and the consistency loss, as training runs
    them: 60 steps on one small batch bring the loss (cross-entropy + consistency) down."""
    from covidxr.data import normalise, read_manifest, training_augmentation
    from covidxr.model import build_model
    from covidxr.training import DEGRADE, js_divergence

    torch.manual_seed(0)
    frame_rows = read_manifest(MANIFEST)
    rows = frame_rows[frame_rows["label"].isin(["covid", "normal"]) & (frame_rows["age_group"] == "adult")]
    rows = rows.groupby("label").head(8)
    recipe = {"method": "whole", "floor": {"side": 48, "jpeg": 75}}
    images = torch.stack([frame(load_grayscale(path), recipe, 64)[0] for path in rows["path"]])
    targets = torch.tensor([0 if label == "covid" else 1 for label in rows["label"]])
    model = build_model("cxrnet", 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    augment = training_augmentation(matched_quality=0.9)
    losses = []
    for _ in range(60):
        batch = torch.stack([augment(image) for image in images])
        both = normalise(torch.cat([batch, torch.stack([DEGRADE(image) for image in batch])]), 0.5, 0.25)
        logits = model(both)
        loss = torch.nn.functional.cross_entropy(logits[:len(batch)], targets) + js_divergence(
            logits[:len(batch)], logits[len(batch):])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert js_divergence(logits, logits).item() == pytest.approx(0, abs=1e-6)


def test_what_a_checkpoint_keeps_of_its_audit_and_its_card_says():
    import pandas as pd

    from covidxr.app.model_card import short_card

    summary = pd.DataFrame([
        {"group": "test: COVID", "variant": quality.AS_IS, "images": 55, "called_covid": 0.9, "labels_changed": 0.0},
        {"group": "test: COVID", "variant": "JPEG quality 30", "images": 55, "called_covid": 0.8, "labels_changed": 0.12},
        {"group": "test: adult pneumonias", "variant": "blur (sigma 1.5 px at 512 px)", "images": 30,
         "called_covid": 0.5, "labels_changed": 0.5},  # not a group of the rule
        {"group": "shenzhen: adults, no COVID", "variant": quality.AS_IS, "images": 450, "called_covid": 0.02,
         "labels_changed": 0.0},
        {"group": "shenzhen: adults, no COVID", "variant": "gamma 0.7", "images": 450, "called_covid": 0.3,
         "labels_changed": 0.3},  # not a variant of the rule
    ])
    kept = quality.stored(summary)
    assert (kept["worst_labels_changed"], kept["worst_variant"], kept["worst_group"]) == (0.12, "JPEG quality 30",
                                                                                          "test: COVID")
    assert kept["images"] == 505 and kept["called_covid_as_is"]["shenzhen: adults, no COVID"] == 0.02
    card = short_card({"arch": "x", "card": {"title": "A model"}, "quality": kept})
    assert "its answer does not hold: at worst **12%** of labels change (JPEG quality 30, test: COVID" in card
