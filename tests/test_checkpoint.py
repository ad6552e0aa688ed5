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
