"""The eraser: the image as the model read it, opened for painting (from what this page session
keeps: no model), and the model (each, in the compare view) asked again with what the person
painted (a side marker, a text label, a tube) blanked with the map test's fill.
"""

from __future__ import annotations

import gradio as gr
import numpy as np
from PIL import Image

from ..occlusion import PAINTED_OVER
from .map_test import TEST_FAILED, map_test, shown_on_page, tested_models
from .state import XrayApp

NOTHING_PAINTED = "Paint over something on the image first (the brush), then press the button."
NOTHING_ANALYSED = "Analyse an X-ray first (upload one or click an example); then paint over it here."


def opened(app: XrayApp, kept):
    """The eraser, opened: the image as the model read it, from this session's kept analysis."""
    shown = app.kept.get(kept["keys"][0]) if isinstance(kept, dict) and kept.get("keys") else None
    if shown is None:
        gr.Info(NOTHING_ANALYSED)
        return None
    return Image.fromarray(shown.image)


def erase(app: XrayApp, file, edited, view=None):
    """(text, image, image box): the model again with what was painted on the eraser blanked; why
    not, in the test's own area, when nothing is painted."""
    painted = painted_mask(edited)
    if file and (painted is None or not painted.any()):
        return f"{TEST_FAILED}\n{NOTHING_PAINTED}", None, gr.update(visible=False)
    return shown_on_page(lambda: map_test(app, file, tested_models(app, view), PAINTED_OVER, "painted", painted))


def painted_mask(edited) -> np.ndarray | None:
    """What was painted on the eraser (an ImageEditor value): every pixel a brush layer covers
    (its alpha; a layer without alpha counts where it is not black)."""
    if not isinstance(edited, dict):
        return None
    masks = []
    for layer in edited.get("layers") or []:
        layer = np.asarray(layer) if layer is not None else None
        if layer is None or layer.ndim < 2:
            continue
        masks.append(layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[2] == 4
                     else layer.reshape(*layer.shape[:2], -1).any(-1))
    return np.logical_or.reduce(masks) if masks else None
