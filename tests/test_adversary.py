"""The source adversary (covidxr train --adversary): reversal, schedule, and a real run with it."""

import pandas as pd
import pytest
import torch

from conftest import MANIFEST
from covidxr.adversary import GradientReversal, SourceAdversary, source_codes, strength


def test_gradient_reversal_is_identity_forward_and_flips_the_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    y = GradientReversal.apply(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.arange(3.0)).sum().backward()
    assert torch.allclose(x.grad, -0.5 * torch.arange(3.0).expand(4, 3))


def test_the_reversal_grows_from_zero_to_the_weight():
    values = [strength(2.0, p / 10) for p in range(11)]
    assert values[0] == 0.0
    assert all(a < b for a, b in zip(values, values[1:]))
    assert 1.99 < values[-1] <= 2.0
    assert strength(2.0, 1.5) == values[-1]  # progress past the end is the end


def test_the_adversary_reads_features_and_label_and_pushes_the_features_away():
    torch.manual_seed(0)
    adversary = SourceAdversary(channels=8, num_classes=3, num_sources=4)
    feature_map = torch.randn(5, 8, 2, 2, requires_grad=True)
    targets, sources = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0, 1, 2, 3, 0])
    logits = adversary(feature_map, targets, 1.0)
    assert logits.shape == (5, 4)
    torch.nn.functional.cross_entropy(logits, sources).backward()
    reversed_grad = feature_map.grad.clone()
    feature_map.grad = None
    torch.nn.functional.cross_entropy(adversary(feature_map, targets, -1.0), sources).backward()
    # strength -1 is plain backprop: the reversed run sends exactly the opposite gradient
    assert torch.allclose(reversed_grad, -feature_map.grad)
    assert reversed_grad.abs().sum() > 0


def test_source_codes_are_sorted_names_and_indices():
    names, codes = source_codes(["nih14", "ieee8023", "nih14", "shenzhen"])
    assert names == ["ieee8023", "nih14", "shenzhen"]
    assert codes.tolist() == [1, 0, 1, 2]


@pytest.mark.slow
def test_a_run_with_the_adversary_logs_it_and_saves_the_classifier_alone(tmp_path):
    from covidxr.checkpoint import load_checkpoint
    from covidxr.training import main

    out = main(["--manifest", str(MANIFEST), "--limit", "6", "--epochs", "2", "--input-size", "64",
                "--batch-size", "4", "--adversary", "1.0", "--cam-penalty", "0.5", "--no-gallery", "--no-hospitals",
                "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
    history = pd.read_csv(out / "history.csv")
    assert history["train_source_accuracy"].between(0, 1).all()
    assert 0 < history["adversary_strength"].iloc[0] < history["adversary_strength"].iloc[1] <= 1.0
    assert history["train_outside_share"].between(0, 1).all()
    state, config = load_checkpoint(out / "model.safetensors")
    assert config["training"]["adversary"] == 1.0
    assert not any(key.startswith("net.") for key in state)  # the adversary's head is not shipped
    # --resume restores the adversary with the rest: a finished run resumed runs no epoch and still loads
    resumed = main(["--manifest", str(MANIFEST), "--limit", "6", "--epochs", "2", "--input-size", "64",
                    "--batch-size", "4", "--adversary", "1.0", "--cam-penalty", "0.5", "--no-gallery", "--no-hospitals",
                    "--resume",
                    "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
    assert len(pd.read_csv(resumed / "history.csv")) == 2
