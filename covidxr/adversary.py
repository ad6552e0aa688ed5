"""A label-conditional source adversary for training (`covidxr train --adversary W`).

In `cxr/` the source and the label go together: adult normals are almost all NIH, adult COVID
almost all journal figures and a few hospitals. A network can then call "not NIH-looking" COVID,
and does, at hospitals it never saw (MODEL_CARD.md). The adversary is a small head that reads the
pooled features of the Grad-CAM layer, plus the true label, and guesses which source the image came
from. A gradient reversal layer (Ganin & Lempitsky 2015, DANN) between the two trains the network to
make that guess fail: the features keep what the label needs and lose what tells NIH from Shenzhen
*within* a class. The label goes into the head so the features are not asked to hide the label itself
(with a source that holds only COVID, hiding the source would mean hiding COVID).

The head is used only while training; the checkpoint holds the classifier alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -strength."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return features.view_as(features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.strength * grad, None


class SourceAdversary(nn.Module):
    """Guesses the source (index) of an image from its pooled features and its label."""

    def __init__(self, channels: int, num_classes: int, num_sources: int, hidden: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(nn.Linear(channels + num_classes, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, num_sources))

    def forward(self, feature_map: torch.Tensor, targets: torch.Tensor, strength: float) -> torch.Tensor:
        """Source logits for feature maps (N, C, h, w); the gradient into the maps is reversed."""
        pooled = GradientReversal.apply(feature_map.mean((2, 3)), strength)
        label = nn.functional.one_hot(targets, self.num_classes).to(pooled.dtype)
        return self.net(torch.cat([pooled, label], dim=1))


def strength(weight: float, progress: float) -> float:
    """DANN's schedule: the reversal grows from 0 to `weight` over training (progress 0..1), so the
    network first learns the labels and the adversary first learns the sources."""
    return weight * (2.0 / (1.0 + math.exp(-10.0 * min(max(progress, 0.0), 1.0))) - 1.0)


def source_codes(sources: list[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct sources (sorted) and each image's index among them."""
    names = sorted(set(sources))
    return names, torch.tensor([names.index(s) for s in sources], dtype=torch.long)
