"""Feature-distance warning: is an X-ray unlike the images this classifier learned from?

Whether an input is a frontal chest X-ray at all is decided elsewhere (xray_check.py), on
evidence that does not depend on the classifier. This test only warns: an X-ray from another
hospital, scanner or patient group can lie far from the training images and still be an X-ray,
so it keeps its prediction, with the warning beside it.

- Features: the Mahalanobis distance of the network's penultimate features (the input of its
  last linear layer) to the nearest class mean under one shared covariance (Lee et al., NeurIPS
  2018), fitted with Ledoit-Wolf shrinkage on the training images. The threshold is a high
  percentile of the distances of the validation images, which the fit never saw, so about
  (100 - percentile)% of real X-rays raise a false alarm.

All the test needs travels in the checkpoint: tensors `ood.class_means` and `ood.precision`,
and config["ood"] with the threshold (`colour_threshold` and `min_side` there are read by older
versions only: colour and size are xray_check.py's now). Training fits it (`fit_for`);
`covidxr ood` (ood_measure.py) refits it for a trained run and measures it.
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

    def warnings(self, distance: float) -> list[str]:
        """The warning for a feature distance beyond the threshold; empty within it."""
        if distance > self.threshold:
            return [f"This X-ray is unlike the ones the model was trained on (feature distance {distance:.1f} > "
                    f"{self.threshold:.1f}): another hospital, scanner or patient group may read differently, "
                    "so give the prediction less weight."]
        return []

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
