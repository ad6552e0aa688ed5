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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import load_grayscale
from .framing import dilate, uses_lungs

# The lungs are dilated by this share of the image's longer side before blanking, so the lung
# edges (where Grad-CAM spills) count as lung.
OCCLUSION_DILATION = 0.04
AS_IS, OUTSIDE_LEFT, LUNGS_LEFT = "as is", "only the outside left", "only the lungs left"
OCCLUSIONS = (AS_IS, OUTSIDE_LEFT, LUNGS_LEFT)
PAINTED_OVER = "painted over"
# What the page and the API call the two blanked views.
BLANKED = {"lungs": OUTSIDE_LEFT, "outside": LUNGS_LEFT}


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


def occlusion_test(predictor, image) -> OcclusionTest:
    """Predict `image` as it is and with each side of its dilated lungs blanked. For
    whole-image checkpoints only: a lung-reading one finds its crop from the lungs, which a
    blanked image no longer shows."""
    if uses_lungs(predictor.framing_recipe):
        raise ValueError("the occlusion test is for whole-image checkpoints: this one reads only the lungs' box")
    gray = load_grayscale(image)
    return _tested(predictor, image, occluded_views(gray, predictor.segment_lungs(gray)))


def painted_test(predictor, image, painted: np.ndarray) -> OcclusionTest:
    """Predict `image` as it is and with what a person painted over blanked. `painted` is a
    boolean mask of any size (the page's is at display size): it is scaled to the image."""
    import cv2

    gray = load_grayscale(image)
    if not painted.any():
        raise ValueError("nothing is painted over: paint over what to blank first")
    mask = cv2.resize(painted.astype(np.uint8), gray.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    return _tested(predictor, image, {AS_IS: gray, PAINTED_OVER: blanked(gray, mask)})


def _tested(predictor, image, views: dict[str, np.ndarray]) -> OcclusionTest:
    # The image as it is is predicted from the file itself, so that the not-a-chest-X-ray check
    # sees its colour too. That check may refuse a view with its lungs blanked; what the network
    # says for it is what the test is about, so the decided class is read, not the label.
    predictions = {name: predictor.predict(image if name == AS_IS else view) for name, view in views.items()}
    return OcclusionTest(views, {name: dict(p.probabilities) for name, p in predictions.items()},
                         {name: p.decided for name, p in predictions.items()}, predictions[AS_IS].not_an_xray)
