"""Test a map's meaning on one image: predict again with the lungs blanked, and with all but the
lungs blanked.

A heatmap says where the evidence lies; blanking says whether the model needs it there. The
lungs (from the lung U-Net, dilated so that Grad-CAM's spill over their edges counts as lung)
are filled with the image's median gray, or everything outside them is: the same views
`covidxr audit --occlusion` scores over a whole split. A model whose COVID probability holds
with the lungs blanked reads something else: a border, a text marker, the look of a source.

    test = occlusion_test(predictor, "xray.png")
    test.probabilities["only the outside left"]["covid"]  # the lungs blanked, against ...["as is"]
    test.views["only the outside left"]            # the image the model read, float32 in [0, 1]
    test.not_an_xray                               # the image as it is refused: nothing to test
    painted_test(predictor, "xray.png", mask)      # the same for what a person painted over

The page's eraser blanks what a person paints (a side marker, a text label, a tube) with the
same fill.

The deletion curve asks the map itself: remove its hottest pixels first and watch the explained
class's probability fall, against removing as many pixels at random (`deletion_curve`:
pytorch-grad-cam's ROAD metric).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .data import load_grayscale, load_image
from .framing import dilate, uses_lungs

if TYPE_CHECKING:  # the predictor these tests run (predictor.py imports this module lazily)
    from .predictor import Predictor

# The lungs are dilated by this share of the image's longer side before blanking, so the lung
# edges (where Grad-CAM spills) count as lung.
OCCLUSION_DILATION = 0.04
AS_IS, OUTSIDE_LEFT, LUNGS_LEFT = "as is", "only the outside left", "only the lungs left"
OCCLUSIONS = (AS_IS, OUTSIDE_LEFT, LUNGS_LEFT)
PAINTED_OVER = "painted over"
# What the page and the API call the two blanked views.
BLANKED = {"lungs": OUTSIDE_LEFT, "outside": LUNGS_LEFT}
# Shares of the network's input removed for the deletion curve, hottest pixels first.
DELETED = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


def blanked(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`gray` with `mask` filled with the image's median gray (flat: no edges, no texture)."""
    return np.where(mask, np.float32(np.median(gray)), gray)


def occluded_views(gray: np.ndarray, lungs: np.ndarray) -> dict[str, np.ndarray]:
    """The image as it is, with the dilated lungs blanked, and with all but them blanked."""
    dilated = dilate(lungs, OCCLUSION_DILATION)
    return dict(zip(OCCLUSIONS, (gray, blanked(gray, dilated), blanked(gray, ~dilated))))


@dataclass
class OcclusionTest:
    """Each view's probabilities and the class the checkpoint's rule decides for it."""

    views: dict[str, np.ndarray]
    probabilities: dict[str, dict[str, float]]
    decided: dict[str, str]
    not_an_xray: bool  # the image as it is is refused by the not-a-chest-X-ray check

    def change(self, view: str, name: str) -> float:
        """How much class `name`'s probability moved from the image as it is to `view`."""
        return self.probabilities[view][name] - self.probabilities[AS_IS][name]


def occlusion_test(predictor: Predictor, image) -> OcclusionTest:
    """Predict `image` as it is and with each side of its dilated lungs blanked. For
    whole-image checkpoints only: a lung-reading one finds its crop from the lungs, which a
    blanked image no longer shows."""
    if uses_lungs(predictor.framing_recipe):
        raise ValueError("the occlusion test is for whole-image checkpoints: this one reads only the lungs' box")
    gray = load_grayscale(image)
    return _tested(predictor, image, occluded_views(gray, predictor.segment_lungs(gray)))


def painted_test(predictor: Predictor, image, painted: np.ndarray) -> OcclusionTest:
    """Predict `image` as it is and with what a person painted over blanked. `painted` is a
    boolean mask of any size (the page's is at display size): it is scaled to the image."""
    import cv2

    gray = load_grayscale(image)
    if not painted.any():
        raise ValueError("nothing is painted over: paint over what to blank first")
    mask = cv2.resize(painted.astype(np.uint8), gray.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    return _tested(predictor, image, {AS_IS: gray, PAINTED_OVER: blanked(gray, mask)})


def _tested(predictor: Predictor, image, views: dict[str, np.ndarray]) -> OcclusionTest:
    # The image as it is is predicted from the file itself, so that the not-a-chest-X-ray check
    # sees its colour too. That check may refuse a view with its lungs blanked; what the network
    # says for it is what the test is about, so the decided class is read, not the label.
    predictions = {name: predictor.predict(image if name == AS_IS else view) for name, view in views.items()}
    return OcclusionTest(views, {name: dict(p.probabilities) for name, p in predictions.items()},
                         {name: p.decided for name, p in predictions.items()}, predictions[AS_IS].not_an_xray)


@dataclass
class DeletionCurve:
    """The explained class's probability as a share of the network's input is removed: the
    map's hottest pixels first (`by_map`), or as many pixels chosen at random (`at_random`)."""

    target: str
    method: str
    removed: tuple[float, ...]
    as_is: float
    by_map: list[float]
    at_random: list[float]
    reasons: list[str]  # why the not-a-chest-X-ray check refuses the image; empty for an X-ray

    @property
    def not_an_xray(self) -> bool:
        """The image is refused: its map, and so its curve, means nothing."""
        return bool(self.reasons)

    @property
    def gap(self) -> float:
        """How much lower the probability stays, on average over the shares removed, when the map
        chooses what goes than when chance does: about 0 for a map that points at nothing the
        model uses."""
        return float(np.mean(self.at_random) - np.mean(self.by_map))


def deletion_curve(predictor: Predictor, image, method: str = "gradcam", target: str | None = None,
                   removed: tuple[float, ...] = DELETED, seed: int = 0) -> DeletionCurve:
    """Remove the map's hottest pixels of the network's input, then as many random ones, and
    predict again each time: pytorch-grad-cam's ROAD (ROADMostRelevantFirst: remove and debias,
    Rong et al. 2022). Removed pixels are filled by noisy linear interpolation from their
    neighbours, so the hole's shape leaves the network nothing to read. Ties in the map (the
    flat zero of a ReLU'd Grad-CAM) are broken at random, so each share removes that share."""
    from pytorch_grad_cam.metrics.road import ROADMostRelevantFirst
    import torch

    gray, colour = load_image(image)
    with predictor.lock:
        explainer = predictor.explainer
        small, _, deciding, probabilities, features, inputs = explainer.network_map(gray, method, target)
        reasons, _ = predictor.input_check(gray, colour, features)
        index = predictor.classes.index(deciding.target)
        rng = np.random.default_rng(seed)
        maps = {"map": small + rng.random(small.shape, dtype=np.float32) * 1e-6,
                "random": rng.random(small.shape, dtype=np.float32)}

        def probability(logits):
            return torch.softmax(logits.float() / predictor.temperature, dim=-1)[index]

        curves = {name: [] for name in maps}
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)  # the imputer's noise
            for share in removed:
                metric = ROADMostRelevantFirst(percentile=100 * (1 - share))
                for name, cam in maps.items():
                    after = metric(inputs, cam[None], [probability], explainer.model, return_diff=False)
                    curves[name].append(float(np.asarray(after).reshape(-1)[0]))
        explainer.hooks.clear()
    return DeletionCurve(deciding.target, method, tuple(removed), float(probabilities[index]), curves["map"],
                         curves["random"], reasons)


def plot_deletion(curves: dict[str, DeletionCurve]):
    """The deletion curves as a PIL image: one colour per model, solid when the map picks what is
    removed, dashed when chance does. (matplotlib's Figure, not pyplot: no global state shared
    between the app's threads.)"""
    import io

    from matplotlib.figure import Figure
    from PIL import Image

    # Sized for where it is shown (a page column, a phone's width): 440 px wide, text at 11-12 pt,
    # so the legend reads at about 11 px even shrunk to a phone's 300 px.
    figure = Figure(figsize=(4.4, 3.2 + 0.45 * len(curves)), dpi=100, layout="constrained")
    axes = figure.subplots()
    colours = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")
    for (name, curve), colour in zip(curves.items(), colours):
        shares = (0.0, *curve.removed)
        label = f"{name}: " if len(curves) > 1 else ""
        axes.plot(shares, (curve.as_is, *curve.by_map), "-o", color=colour, markersize=4, linewidth=2,
                  label=f"{label}{curve.target}, hottest first")
        axes.plot(shares, (curve.as_is, *curve.at_random), "--", color=colour, alpha=0.7, linewidth=2,
                  label=f"{label}{curve.target}, at random")
    axes.set(xlim=(0, 1), ylim=(0, 1.02))
    axes.set_xlabel("share of the input removed", fontsize=12)
    axes.set_ylabel("probability", fontsize=12)
    axes.tick_params(labelsize=11)
    axes.xaxis.set_major_formatter("{x:.0%}")
    axes.yaxis.set_major_formatter("{x:.0%}")
    axes.grid(alpha=0.3)
    figure.legend(fontsize=11, loc="outside lower center", frameon=False)  # below the plot: no curve hidden
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
