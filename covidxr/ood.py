"""Out-of-distribution check: does an input look like the frontal chest X-rays the model learned?

A classifier answers for anything, a cat included. Two cheap tests warn when an input is unlike
the training images; the prediction is still shown, with the warning beside it.

- Colour: X-rays are gray. A colourfulness (data.colourfulness) above `colour_threshold` warns.
- Size: a side shorter than `min_side` (half the model's input) is a thumbnail, not an X-ray
  one could read; the training images are at least 224 pixels on each side.
- Features: the Mahalanobis distance of the network's penultimate features (the input of its
  last linear layer) to the nearest class mean under one shared covariance (Lee et al., NeurIPS
  2018), fitted with Ledoit-Wolf shrinkage on the training images. The threshold is a high
  percentile of the distances of the validation images, which the fit never saw, so about
  (100 - percentile)% of real X-rays raise a false alarm.

All the check needs travels in the checkpoint: tensors `ood.class_means` and `ood.precision`,
and config["ood"] with the thresholds. Training fits it (`fit_for`); `covidxr ood`
(ood_measure.py) refits it for a trained run and measures it (false alarms on the test X-rays,
detection on the pictures of not_xrays.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

PREFIX = "ood."
# Hasler and Suesstrunk call 15 "slightly colourful"; see `covidxr ood` for how the
# training X-rays (some with coloured arrows from journal figures) sit against it.
COLOUR_THRESHOLD = 15.0
# The 99th, not the 95th: about 200 validation images pin a percentile only roughly, and a false
# alarm on a real X-ray costs the user's trust in every later warning.
PERCENTILE = 99.0


def feature_layer(model: nn.Module) -> nn.Linear:
    """The last linear layer: its input is the penultimate feature vector."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear layer to take features from")
    return linears[-1]


class FeatureHook:
    """Keeps the latest input of the model's last linear layer (the penultimate features)."""

    def __init__(self, model: nn.Module):
        self.features = None
        self.handle = feature_layer(model).register_forward_pre_hook(self._keep)

    def _keep(self, module, inputs):
        self.features = inputs[0].detach().float()

    def remove(self):
        self.handle.remove()


@dataclass
class OutOfDistribution:
    class_means: np.ndarray   # (C, D)
    precision: np.ndarray     # (D, D), inverse of the shared covariance
    threshold: float          # distance above which an input is called unlike the training data
    colour_threshold: float = COLOUR_THRESHOLD
    percentile: float = PERCENTILE
    min_side: int = 112

    @classmethod
    def fit(cls, train_features: np.ndarray, train_targets: np.ndarray, val_features: np.ndarray,
            input_size: int, percentile: float = PERCENTILE,
            colour_threshold: float = COLOUR_THRESHOLD) -> "OutOfDistribution":
        from sklearn.covariance import LedoitWolf

        train_features = np.asarray(train_features, np.float64)
        train_targets = np.asarray(train_targets)
        classes = np.unique(train_targets)
        means = np.stack([train_features[train_targets == c].mean(0) for c in classes])
        centred = train_features - means[np.searchsorted(classes, train_targets)]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        detector = cls(means.astype(np.float32), precision.astype(np.float32), np.inf, colour_threshold,
                       percentile, input_size // 2)
        detector.threshold = float(np.percentile(detector.distance(val_features), percentile))
        return detector

    def distance(self, features) -> np.ndarray:
        """(N,) Mahalanobis distance of each feature row to its nearest class mean."""
        features = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        means = torch.as_tensor(self.class_means, dtype=torch.float64)
        precision = torch.as_tensor(self.precision, dtype=torch.float64)
        diff = features[:, None, :] - means[None]                       # (N, C, D)
        squared = torch.einsum("ncd,de,nce->nc", diff, precision, diff)  # (N, C)
        return squared.clamp_min(0).min(1).values.sqrt().numpy()

    def warnings(self, distance: float, colour: float, shape: tuple[int, int]) -> list[str]:
        found = []
        if min(shape) < self.min_side:
            found.append(f"This image is only {shape[1]} x {shape[0]} pixels: too small to be a readable "
                         "chest X-ray.")
        if colour > self.colour_threshold:
            found.append(f"This image is in colour (colourfulness {colour:.0f}, X-rays are gray): "
                         "it may not be an X-ray.")
        if distance > self.threshold:
            found.append(f"This image is unlike the frontal chest X-rays the model was trained on "
                         f"(feature distance {distance:.1f} > {self.threshold:.1f}): treat the prediction "
                         "as meaningless unless it is a frontal chest X-ray.")
        return found

    # -- checkpoint ---------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}class_means": torch.from_numpy(self.class_means),
                f"{PREFIX}precision": torch.from_numpy(self.precision)}

    def describe(self) -> dict:
        return {"method": "mahalanobis, tied covariance (Ledoit-Wolf), nearest class mean",
                "features": "input of the last linear layer",
                "threshold": self.threshold, "percentile": self.percentile,
                "colour_threshold": self.colour_threshold, "min_side": self.min_side}

    @classmethod
    def from_checkpoint(cls, state: dict[str, torch.Tensor], config: dict) -> "OutOfDistribution | None":
        """Pops the ood.* tensors out of `state` (they are not network weights)."""
        tensors = {name[len(PREFIX):]: state.pop(name) for name in list(state) if name.startswith(PREFIX)}
        settings = config.get("ood")
        if not settings or set(tensors) != {"class_means", "precision"}:
            return None
        return cls(tensors["class_means"].float().numpy(), tensors["precision"].float().numpy(),
                   float(settings["threshold"]), float(settings["colour_threshold"]),
                   float(settings["percentile"]), int(settings["min_side"]))


def fit_for(predictor, images: torch.Tensor, targets: np.ndarray, split: np.ndarray) -> OutOfDistribution:
    """Fit on the 'train' rows of prepared `images`, threshold on the 'val' rows."""
    features = predictor.probabilities_and_features(images[np.flatnonzero(split == "train")])[1]
    val_features = predictor.probabilities_and_features(images[np.flatnonzero(split == "val")])[1]
    return OutOfDistribution.fit(features, targets[split == "train"], val_features, predictor.config["input_size"])
