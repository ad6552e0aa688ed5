"""Distillation (covidxr train --teacher CKPT --distill W): the loss, the teachers' average, and a
real run that learns from a teacher trained on real X-rays."""

import json

import pandas as pd
import pytest
import torch

from conftest import MANIFEST
from covidxr.distill import distillation_loss, load_teachers, teacher_probabilities


def test_the_loss_is_zero_at_the_teachers_probabilities_and_pulls_towards_them():
    torch.manual_seed(0)
    targets = torch.softmax(torch.randn(4, 3), dim=1)
    at_targets = torch.log(targets) * 2.0  # logits whose softmax at T = 2 is the targets
    assert distillation_loss(at_targets, targets, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.zeros(4, 3, requires_grad=True)
    loss = distillation_loss(logits, targets, 2.0)
    assert loss.item() > 0
    loss.backward()
    # gradient descent raises the logit of whichever class the teachers favour most
    favoured = targets.argmax(1)
    assert torch.all(-logits.grad[torch.arange(4), favoured] > 0)


def test_the_teachers_probabilities_are_their_average_at_the_temperature():
    first, second = torch.nn.Linear(2, 3), torch.nn.Linear(2, 3)
    batch = torch.randn(5, 2)
    expected = (torch.softmax(first(batch) / 3.0, 1) + torch.softmax(second(batch) / 3.0, 1)) / 2
    average = teacher_probabilities([first, second], batch, 3.0)
    assert torch.allclose(average, expected)
    assert torch.allclose(average.sum(1), torch.ones(5))


def test_a_teacher_that_reads_another_picture_is_refused():
    from covidxr.checkpoint import BUNDLED, checkpoint_path, read_config

    path = checkpoint_path("lung-reader")
    config = read_config(path)
    expected = {key: config[key] for key in ("classes", "input_size", "normalisation", "framing")}
    assert len(load_teachers([path], expected, torch.device("cpu"))) == 1
    with pytest.raises(ValueError, match="framing"):
        load_teachers([path], expected | {"framing": {"method": "whole"}}, torch.device("cpu"))
    assert "lung-reader" in BUNDLED


@pytest.mark.slow
def test_a_student_learns_from_a_teacher_and_records_it_without_its_path(tmp_path):
    from covidxr.checkpoint import load_checkpoint
    from covidxr.training import main

    common = ["--manifest", str(MANIFEST), "--limit", "6", "--input-size", "64", "--batch-size", "4",
              "--no-gallery", "--no-hospitals", "--cache-dir", str(tmp_path / "cache")]
    teacher = main(common + ["--epochs", "1", "--out", str(tmp_path / "teacher")]) / "model.safetensors"
    student = main(common + ["--epochs", "2", "--teacher", str(teacher), "--teacher", str(teacher),
                             "--distill", "0.7", "--out", str(tmp_path / "student")])
    history = pd.read_csv(student / "history.csv")
    assert len(history) == 2 and history["train_loss"].notna().all()
    _, config = load_checkpoint(student / "model.safetensors")
    teachers = config["training"]["teachers"]
    assert len(teachers) == 2 and teachers[0]["arch"] == "cxrnet" and teachers[0]["train_data_sha256"]
    assert config["training"]["distill"] == 0.7
    assert str(tmp_path) not in json.dumps(config)  # no path of this machine in the checkpoint
    # a teacher at another input size describes another picture: refused before any epoch
    with pytest.raises(ValueError, match="input_size"):
        main(common[:5] + ["80"] + common[6:] + ["--epochs", "1", "--teacher", str(teacher),
                                                 "--out", str(tmp_path / "refused")])
