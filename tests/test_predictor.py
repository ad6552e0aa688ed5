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


def test_bundled_models_load_by_name_and_describe_themselves(tmp_path, monkeypatch, manifest_frame):
    """Predictor.load and every --checkpoint take a bundled model's name; each bundled file is
    small (fp16 weights), carries its card, and predicts with its own classes."""
    import torch
    from safetensors import safe_open

    from covidxr import Predictor
    from covidxr.checkpoint import BUNDLED, DEFAULT_MODEL, WEIGHTS_DIR, checkpoint_path

    assert checkpoint_path() == checkpoint_path(DEFAULT_MODEL) == SHIPPED_CHECKPOINT
    path = real_image(manifest_frame, "covid", "ieee8023")
    for name, file_name in BUNDLED.items():
        file = checkpoint_path(name)
        assert file == WEIGHTS_DIR / file_name and file.stat().st_size < 16 * 2**20
        config = read_config(file)
        assert config["card"]["name"] == name and all(config["card"][k] for k in ("title", "summary", "shortcut"))
        assert "metrics" in config and "lung_focus" in config and not config.get("stale", {}).get("metrics")
        with safe_open(str(file), "pt") as handle:  # the network's weights in fp16 (not the OOD statistics)
            assert {handle.get_tensor(k).dtype for k in handle.keys() if not k.startswith("ood.")
                    and handle.get_tensor(k).is_floating_point()} == {torch.float16}
        predictor = Predictor.load(name)
        assert predictor.classes == config["classes"] and predictor.predict(path).label in config["classes"]
    assert Predictor.load("recipe-2020").classes == ["covid", "normal"]
    # A file of that name where one works wins: a path is a path.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lung-reader").write_bytes(b"")
    assert checkpoint_path("lung-reader") == tmp_path.joinpath("lung-reader").relative_to(tmp_path)
    assert checkpoint_path("runs/x/model.safetensors").as_posix() == "runs/x/model.safetensors"
