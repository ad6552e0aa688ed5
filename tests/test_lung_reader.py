"""A threshold-rule checkpoint of the lung-reading architecture (timm EfficientNet-Lite0 reading
the lungs' box, issue 24) through every surface: `Predictor`, `covidxr predict` and the app.
The weights are random: what is tested is the plumbing (framing, temperature, the threshold
rule, the CAM layer, the notice's chance level), not accuracy."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import real_image

from covidxr import Predictor
from covidxr.checkpoint import save_checkpoint, update_config
from covidxr.cli import main
from covidxr.model import build_model
from covidxr.app import analysis
from covidxr.app.state import XrayApp

CLASSES = ["covid", "normal", "pneumonia"]
TEMPERATURE = 2.0


@pytest.fixture(scope="module")
def xray(manifest_frame):
    return real_image(manifest_frame, "normal", "nih14")


@pytest.fixture(scope="module")
def lung_reader(tmp_path_factory, xray):
    """(checkpoint path, the class its threshold decides on `xray`): the least probable class,
    so that only the threshold rule can pick it."""
    torch.manual_seed(0)
    config = {"arch": "efficientnet_lite0", "classes": CLASSES, "input_size": 96,
              "normalisation": {"method": "minmax", "mean": 0.5, "std": 0.5},
              "framing": {"method": "lung_crop", "margin": 0.08, "dilation": 0.04, "outside": 1.0,
                          "min_lung_area": 0.03, "lungs": "covidxr-lungs.safetensors"},
              "gradcam_layer": "bn2", "calibration": {"temperature": TEMPERATURE}}
    path = save_checkpoint(tmp_path_factory.mktemp("lung_reader") / "model.safetensors",
                           build_model("efficientnet_lite0", len(CLASSES)), config)
    probabilities = Predictor.load(path).predict(xray).probabilities
    least = min(probabilities, key=probabilities.get)
    update_config(path, {"decision": {"rule": "threshold", "class": least,
                                      "threshold": round(0.9 * probabilities[least], 6)}})
    return path, least


def test_predictor_decides_by_the_threshold_at_the_temperature(lung_reader, xray):
    path, least = lung_reader
    predictor = Predictor.load(path)
    prediction = predictor.predict(xray)
    assert prediction.label == prediction.decided == least
    assert max(prediction.probabilities, key=prediction.probabilities.get) != least
    # The probabilities are the logits / temperature through softmax.
    cold = Predictor.load(path)
    cold.config = {**cold.config, "calibration": {"temperature": 1.0}}
    logits = np.log([cold.predict(xray).probabilities[c] for c in CLASSES])
    expected = np.exp(logits / TEMPERATURE) / np.exp(logits / TEMPERATURE).sum()
    assert [prediction.probabilities[c] for c in CLASSES] == pytest.approx(expected, abs=1e-4)


def test_the_map_explains_the_decided_class_inside_the_lungs_box(lung_reader, xray):
    path, least = lung_reader
    explanation = Predictor.load(path).explain(xray)
    assert explanation.target == least and explanation.verdict.label == least
    top, left, bottom, right = explanation.framing.box
    height, width = explanation.heatmap.shape
    assert (bottom - top, right - left) != (height, width)  # a crop, not the whole image
    outside = np.ones((height, width), bool)
    outside[top:bottom, left:right] = False
    assert explanation.heatmap[outside].max() == 0  # the map covers what the network read
    # Chance is the lungs' share of the box the network read, not of the whole image (at the
    # scoring size).
    from covidxr.framing import to_image_frame

    read = to_image_frame(np.ones((2, 2), np.float32), explanation.framing, explanation.scoring_shape) > 0
    assert explanation.chance_focus == pytest.approx(explanation.scored_lungs[read].mean())
    assert explanation.chance_focus > explanation.scored_lungs.mean()


def test_the_cli_writes_the_decided_class(lung_reader, xray, tmp_path):
    path, least = lung_reader
    assert main(["predict", str(xray), "--checkpoint", str(path), "--csv", str(tmp_path / "out.csv")]) == 0
    row = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False).iloc[0]
    assert row["label"] == least and 0 < float(row["chance_focus"]) < 1


def test_the_app_shows_the_decided_class_and_why(lung_reader, xray, tmp_path):
    path, least = lung_reader
    app = XrayApp(Predictor.load(path), tmp_path)
    label, original, overlay, summary = analysis.predict_api(app, str(xray))
    assert label.label == least
    assert f"Prediction: {least}" in summary and "operating threshold" in summary
    assert overlay.size == original.size
