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
and config["ood"] with the thresholds. `python -m covidxr ood` fits it for a trained run and
measures it (false alarms on the test X-rays, detection on images that are not X-rays).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

PREFIX = "ood."
# Hasler and Suesstrunk call 15 "slightly colourful"; see `python -m covidxr ood` for how the
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


# -- images that are not chest X-rays, to measure detection ----------------------------------------

def non_xray_images(seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """(name, image) pairs that are not chest X-rays: scikit-image's sample pictures (photos,
    microscopy, astronomy, text, a CT phantom), face photos, and generated documents, screenshots,
    charts, noise and patterns."""
    from PIL import Image, ImageDraw
    from skimage import data as samples

    images = []
    for name in ["astronaut", "brick", "camera", "cell", "chelsea", "checkerboard", "clock", "coffee",
                 "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field",
                 "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina", "rocket",
                 "shepp_logan_phantom", "text"]:
        image = getattr(samples, name)()
        images.append((f"skimage:{name}", (image * 255).astype(np.uint8) if image.dtype == bool else image))
    # Face photos, back to the 250 x 250 pixels of Labeled Faces in the Wild (the subset is
    # stored at 25 x 25), so the size check does not catch them and the features must.
    faces = samples.lfw_subset()
    rng = np.random.default_rng(seed)
    for index in rng.choice(len(faces), 10, replace=False):
        face = Image.fromarray((faces[index] * 255).astype(np.uint8)).resize((250, 250), Image.Resampling.BICUBIC)
        images.append((f"skimage:face{index}", np.asarray(face)))

    def canvas(size=(640, 480), colour=(255, 255, 255)):
        image = Image.new("RGB", size, colour)
        return image, ImageDraw.Draw(image)

    for k in range(4):  # documents: lines of text on white, optionally gray
        image, draw = canvas((600, 800))
        for line in range(40):
            words = rng.integers(3, 12)
            draw.text((40, 30 + 18 * line), " ".join("lorem" * int(rng.integers(1, 3)) for _ in range(words)),
                      fill=(0, 0, 0))
        images.append((f"generated:document{k}", np.asarray(image.convert("L") if k % 2 else image)))
    for k in range(4):  # screenshots: title bar, buttons, panels, text
        image, draw = canvas((1024, 640), (240, 240, 240))
        draw.rectangle((0, 0, 1024, 40), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        for _ in range(12):
            x, y = int(rng.integers(0, 900)), int(rng.integers(50, 560))
            draw.rectangle((x, y, x + int(rng.integers(40, 200)), y + int(rng.integers(20, 80))),
                           fill=tuple(int(v) for v in rng.integers(0, 255, 3)), outline=(0, 0, 0))
            draw.text((x + 5, y + 5), "Button", fill=(0, 0, 0))
        images.append((f"generated:screenshot{k}", np.asarray(image.convert("L") if k % 2 else image)))
    for k in range(2):  # bar charts
        image, draw = canvas()
        for bar in range(8):
            height = int(rng.integers(50, 400))
            draw.rectangle((60 + 70 * bar, 440 - height, 110 + 70 * bar, 440), fill=(40, 40, 40) if k else (31, 119, 180))
        draw.line((50, 440, 620, 440), fill=(0, 0, 0), width=2)
        images.append((f"generated:chart{k}", np.asarray(image)))
    images.append(("generated:noise", rng.integers(0, 256, (512, 512), dtype=np.uint8)))
    images.append(("generated:colour_noise", rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)))
    images.append(("generated:gradient", np.tile(np.linspace(0, 255, 512, dtype=np.float32), (512, 1))))
    images.append(("generated:blank_white", np.full((400, 400), 255, np.uint8)))
    images.append(("generated:stripes", (np.indices((512, 512))[1] // 16 % 2 * 255).astype(np.uint8)))
    return images


# -- command line: fit for a run, measure, store in the checkpoint ---------------------------------

def fit_for(predictor, images: torch.Tensor, targets: np.ndarray, split: np.ndarray) -> OutOfDistribution:
    """Fit on the 'train' rows of prepared `images`, threshold on the 'val' rows."""
    features = predictor.probabilities_and_features(images[np.flatnonzero(split == "train")])[1]
    val_features = predictor.probabilities_and_features(images[np.flatnonzero(split == "val")])[1]
    return OutOfDistribution.fit(features, targets[split == "train"], val_features, predictor.config["input_size"])


def measure(predictor, detector: OutOfDistribution, test_paths: list[str], out_dir: Path | None = None) -> dict:
    """False alarms on real test X-rays, detection on non-X-ray images, per image in a CSV."""
    import pandas as pd
    from tqdm.auto import tqdm

    rows = []
    for kind, items in (("xray", [(path, path) for path in test_paths]), ("not_xray", non_xray_images())):
        for name, image in tqdm(items, desc=f"ood check: {kind}", unit="img"):
            distance, colour, shape = predictor.ood_scores(image)
            warnings = detector.warnings(distance, colour, shape)
            rows.append({"kind": kind, "name": str(name), "distance": distance, "colourfulness": colour,
                         "small_warning": min(shape) < detector.min_side,
                         "colour_warning": colour > detector.colour_threshold,
                         "feature_warning": distance > detector.threshold, "warned": bool(warnings)})
    table = pd.DataFrame(rows)
    xrays, others = table[table.kind == "xray"], table[table.kind == "not_xray"]
    result = {"threshold": detector.threshold, "percentile": detector.percentile,
              "colour_threshold": detector.colour_threshold,
              "test_xrays": int(len(xrays)), "false_alarms": int(xrays.warned.sum()),
              "false_alarm_rate": float(xrays.warned.mean()),
              "non_xrays": int(len(others)), "detected": int(others.warned.sum()),
              "detection_rate": float(others.warned.mean()),
              "detected_by_features": int(others.feature_warning.sum()),
              "detected_by_colour": int(others.colour_warning.sum()),
              "detected_by_size": int(others.small_warning.sum()),
              "xray_alarms_by_kind": {kind: int(xrays[f"{kind}_warning"].sum()) for kind in ("feature", "colour", "small")},
              "missed": others.loc[~others.warned, "name"].tolist()}
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(out_dir) / "ood_scores.csv", index=False)
        (Path(out_dir) / "ood.json").write_text(json.dumps(result, indent=2))
        _plot(table, detector, Path(out_dir) / "ood_distances.png")
    return result


def _plot(table, detector: OutOfDistribution, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    top = float(np.percentile(table.distance, 99)) * 1.1
    bins = np.linspace(0, top, 50)
    for kind, label in (("xray", "test chest X-rays"), ("not_xray", "not X-rays")):
        axis.hist(table.loc[table.kind == kind, "distance"].clip(upper=top), bins=bins, alpha=0.6, label=label)
    axis.axvline(detector.threshold, color="k", linestyle="--", label=f"threshold ({detector.percentile}th pct of val)")
    axis.set_xlabel("Mahalanobis distance of penultimate features")
    axis.set_ylabel("images")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m covidxr ood", description=(
        "Fit the not-a-chest-X-ray check for a trained run (train split: class means and covariance; "
        "val split: threshold), measure it, and store it in the checkpoint."))
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split-csv", required=True, help="the run's split.csv")
    parser.add_argument("--data-root", default=None, help="folder of the manifest (default: ../shared/data/cxr)")
    parser.add_argument("--out", default=None, help="run folder for ood.json, ood_scores.csv and the plot")
    parser.add_argument("--write", action="store_true", help="store the fitted check in the checkpoint")
    args = parser.parse_args(argv)

    import pandas as pd

    from .checkpoint import load_checkpoint, save_checkpoint
    from .data import DATA_DIR, prepare_all
    from .model import build_model
    from .predictor import Predictor

    predictor = Predictor.load(args.checkpoint)
    root = Path(args.data_root) if args.data_root else DATA_DIR
    frame = pd.read_csv(args.split_csv)
    frame = frame[frame["split"].isin(["train", "val", "test"])].reset_index(drop=True)
    paths = [str(root / name) for name in frame["filename"]]
    images = prepare_all(paths, predictor.config["input_size"], cache_dir=".cache")
    targets = np.array([predictor.classes.index(t) for t in frame["target"]])
    detector = fit_for(predictor, images, targets, frame["split"].to_numpy())
    predictor.ood = detector
    out = Path(args.out or Path(args.checkpoint).parent)
    result = measure(predictor, detector, [p for p, s in zip(paths, frame["split"]) if s == "test"], out)
    print(json.dumps({k: v for k, v in result.items()}, indent=2))
    if args.write:
        state, config = load_checkpoint(args.checkpoint)
        OutOfDistribution.from_checkpoint(state, config)  # drop any earlier fit
        config["ood"] = detector.describe() | {key: result[key] for key in (
            "test_xrays", "false_alarm_rate", "non_xrays", "detection_rate")}
        # The weights as stored, not the predictor's copy (its batch norms are folded for inference).
        model = build_model(config["arch"], len(config["classes"]))
        model.load_state_dict(state)
        save_checkpoint(args.checkpoint, model, {k: v for k, v in config.items() if k != "format"},
                        extra_tensors=detector.tensors())
        print(f"stored in {args.checkpoint}")
    return result
