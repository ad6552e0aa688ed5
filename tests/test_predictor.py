"""The shipped model through the public API, on real X-rays."""

import numpy as np
import pytest
from PIL import Image

from conftest import MANIFEST, real_image
from covidxr.checkpoint import read_config
from covidxr.data import data_hash, parse_filters, read_manifest, select, split_by_patient
from covidxr.predictor import SHIPPED_CHECKPOINT


def test_shipped_file_is_small_and_self_describing():
    assert SHIPPED_CHECKPOINT.stat().st_size < 25 * 2**20
    config = read_config(SHIPPED_CHECKPOINT)
    for key in ("arch", "classes", "input_size", "normalisation", "gradcam_layer", "decision",
                "data", "metrics", "code_version", "created", "label_map"):
        assert key in config, key
    assert config["classes"] == ["covid", "normal", "pneumonia"]
    assert 0.5 < config["metrics"]["accuracy"] <= 1


@pytest.mark.slow  # splits the whole manifest
def test_shipped_model_training_data_is_reproducible():
    """The fingerprint in the checkpoint matches the split its recorded settings produce."""
    config = read_config(SHIPPED_CHECKPOINT)
    frame = select(read_manifest(MANIFEST), parse_filters(config["data"]["filters"]), config["label_map"])
    split = split_by_patient(frame, config["data"]["split_seed"], config["training"]["val_fraction"],
                             config["training"]["test_fraction"])
    assert data_hash(split[split["split"] == "train"]) == config["data"]["train_data_sha256"]


@pytest.mark.parametrize("label, source", [("covid", "ieee8023"), ("normal", "nih14"),
                                           ("normal", "kermany"), ("pneumonia", "kermany"),
                                           ("pneumonia", "nih14"), ("sars", "ieee8023")])
def test_shipped_model_predicts_real_images(predictor, manifest_frame, label, source):
    prediction = predictor.predict(real_image(manifest_frame, label, source))
    assert prediction.label in predictor.classes
    assert set(prediction.probabilities) == set(predictor.classes)
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(0 <= p <= 1 for p in prediction.probabilities.values())
    assert prediction.warnings == []


def test_path_pil_and_array_inputs_agree(predictor, manifest_frame):
    path = real_image(manifest_frame, "covid", "figure1")
    from_path = predictor.predict(path).probabilities
    from_pil = predictor.predict(Image.open(path)).probabilities
    from_array = predictor.predict(np.asarray(Image.open(path))).probabilities
    for name in predictor.classes:
        assert from_pil[name] == pytest.approx(from_path[name], abs=1e-6)
        assert from_array[name] == pytest.approx(from_path[name], abs=1e-3)


def test_batch_matches_single(predictor, manifest_frame):
    paths = [real_image(manifest_frame, "covid", "actualmed", k) for k in range(3)]
    paths += [real_image(manifest_frame, "pneumonia", "ieee8023", k) for k in range(2)]
    batch = predictor.predict_batch(paths, batch_size=2)
    assert len(batch) == 5
    for path, result in zip(paths, batch):
        single = predictor.predict(path)
        assert result.label == single.label
        for name in predictor.classes:
            assert result.probabilities[name] == pytest.approx(single.probabilities[name], abs=1e-4)


def test_label_follows_the_decision_rule(predictor, manifest_frame):
    rule = predictor.config["decision"]
    for k in range(5):
        prediction = predictor.predict(real_image(manifest_frame, "normal", "nih14", k))
        p = prediction.probabilities
        if rule["rule"] == "threshold" and p[rule["class"]] >= rule["threshold"]:
            assert prediction.label == rule["class"]
        elif rule["rule"] == "threshold":
            others = {c: v for c, v in p.items() if c != rule["class"]}
            assert prediction.label == max(others, key=others.get)
        else:
            assert prediction.label == max(p, key=p.get)
