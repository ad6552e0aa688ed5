"""Explanation stage: class activation maps from pytorch-grad-cam, at the image's own size
(or shrunk to `max_side` pixels for display).

    explanation = predictor.explain("xray.png")                  # the predicted class, Grad-CAM
    explanation = predictor.explain("xray.png", target="covid")  # why (not) covid?
    explanation.heatmap   # float32 (H, W) in [0, 1], the input's own height and width
    explanation.overlay   # RGB PIL image: the X-ray with the heatmap blended on it
    explanation.lung_focus   # share of the heatmap's mass on the lungs (segment.py), in [0, 1]
    explanation.chance_focus # the same share for a map spread evenly over what the network read
    predictor.explain("xray.png", max_side=640)  # image, heatmap, overlay at most 640 px a side

One forward pass gives both the prediction and the map: the CAM target object decides the
label from the logits of that pass. The explainer works on its own copy of the network so the
CAM hooks never fire (nor hold activations) during plain predictions, and each CAM object is
built once and reused. The lung mask, the lung focus and the overlay are computed when first
read, so a caller who wants only the map pays only for the map.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cached_property
from types import SimpleNamespace
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import (EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM,
                              XGradCAM)
from pytorch_grad_cam import score_cam
from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients
from pytorch_grad_cam.utils.image import show_cam_on_image

from .data import load_image
from .framing import Framing, to_image_frame
from .model import CAM_HEADS, gradcam_layer_name
from .ood import FeatureHook
from .report import notice_rule

if TYPE_CHECKING:  # the predictor this explains for (predictor.py imports this module lazily)
    from .predictor import Predictor

METHODS = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
    "scorecam": ScoreCAM,
}
# Lung focus, its chance level and the notice are scored with the map and the lungs drawn at this
# many pixels on the image's longer side, whatever size the image is shown at: one answer for one
# X-ray in the app (768 px), the CLI (its heatmaps up to 2,048), the API and the audit (issue 34).
SCORING_SIDE = 512
# pytorch-grad-cam's Score-CAM draws a progress bar for every map it makes (score_cam.py calls
# tqdm.tqdm, with no way to turn it off): in the app a bar per request filled the server's log, in
# `covidxr predict` one per file among its own. Its batches run without one here.
score_cam.tqdm = SimpleNamespace(tqdm=lambda iterable, *args, **kwargs: iterable)
# When a global average pool and one linear layer follow the explained layer (model.CAM_HEADS),
# the gradient of a class score is the same at every position of a channel. Grad-CAM (mean
# gradient x activation), HiResCAM (gradient x activation, position by position) and XGrad-CAM
# (gradient x activation summed, over the activation's sum) then weight every channel alike:
# one map under three names. (Grad-CAM++ and LayerCAM come close but differ.)
SAME_AS_GRADCAM = ("hirescam", "xgradcam")


def identical_methods(config: dict) -> dict[str, tuple[str, ...]]:
    """{method: methods giving the very same map} for a checkpoint's network; empty when each
    method gives a map of its own."""
    arch = config["arch"]
    if arch in CAM_HEADS and config["gradcam_layer"] == gradcam_layer_name(arch):
        return {"gradcam": SAME_AS_GRADCAM}
    return {}


@dataclass
class Explanation:
    """A class activation map with the prediction it explains.

    The map costs one forward pass and a short backward; the lung mask (a U-Net), the shares of
    evidence and the colour-mapped overlay cost more than that, so each is computed the first
    time it is read, then kept: `explain(...).heatmap` alone stays cheap."""

    heatmap: np.ndarray
    target: str
    method: str
    prediction: object  # the predictor.Prediction for the same pass (predictor.py builds it)
    image: np.ndarray  # the input as the model read it: float32 (H, W) grayscale in [0, 1] (shrunk to max_side)
    # The full-size image the prediction read (`image` may be a shrunk copy): the lungs are found
    # on it, as the input check and the audits find them (the check's lung pass answered for it).
    full_image: np.ndarray | None = field(default=None, repr=False, compare=False)
    opacity: float = 0.4
    segmenter: object | None = field(default=None, repr=False, compare=False)  # segment.LungSegmenter
    framing: Framing | None = field(default=None, repr=False, compare=False)  # where the model looked
    # The checkpoint's lungs-outside rule (report.notice_rule) and the methods that draw the same
    # map on its network (identical_methods): what the verdict needs to say.
    notice_rule: dict | None = field(default=None, repr=False, compare=False)
    same_methods: dict | None = field(default=None, repr=False, compare=False)
    network_map: np.ndarray | None = field(default=None, repr=False, compare=False)  # at the network's input size

    @cached_property
    def lung_mask(self) -> np.ndarray | None:
        """Boolean (H, W) lung mask; None without a lung model. A lung-reading model already
        segmented the image to frame it: that mask is reused."""
        if self.framing is not None and self.framing.lung_mask is not None:
            mask = self.framing.lung_mask
            if mask.shape != self.image.shape:
                mask = cv2.resize(mask.astype(np.uint8), self.image.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
            return mask
        if self.segmenter is None:
            return None
        return self.segmenter.segment(self.image if self.full_image is None else self.full_image, self.image.shape)

    @cached_property
    def scoring_shape(self) -> tuple[int, int]:
        """Where the evidence is scored: the image at SCORING_SIDE pixels on its longer side,
        whatever size it is shown at (the app, the CLI, the API and the audit alike)."""
        height, width = self.full_image.shape if self.full_image is not None else self.image.shape
        scale = SCORING_SIDE / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    @cached_property
    def scored_map(self) -> np.ndarray:
        """The map at the scoring size: the network's own map put back on the image there."""
        if self.network_map is None or self.framing is None:  # built by hand: the map as given
            return cv2.resize(self.heatmap.astype(np.float32), self.scoring_shape[::-1], interpolation=cv2.INTER_LINEAR)
        return to_image_frame(self.network_map, self.framing, self.scoring_shape)

    @cached_property
    def scored_lungs(self) -> np.ndarray | None:
        """The lung mask at the scoring size (None without a lung model)."""
        if self.framing is not None and self.framing.lung_mask is not None:
            return cv2.resize(self.framing.lung_mask.astype(np.uint8), self.scoring_shape[::-1],
                              interpolation=cv2.INTER_NEAREST) > 0
        if self.segmenter is None:
            return None
        return self.segmenter.segment(self.image if self.full_image is None else self.full_image, self.scoring_shape)

    def focus_on(self, mask: np.ndarray) -> float:
        """The share of this map's mass on `mask` (any size: drawn at the scoring size), as lung
        focus is scored: against a hand-drawn lung mask, say (audit.py)."""
        from .segment import evidence_shares

        mask = cv2.resize(np.asarray(mask, np.uint8), self.scoring_shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
        return evidence_shares(self.scored_map, mask)["lung_focus"]

    @cached_property
    def _shares(self) -> dict[str, float]:
        from .segment import evidence_shares

        lungs = self.scored_lungs
        if lungs is None:
            return {}
        # What the network read: the whole image, or the lungs' box it was cropped to.
        cropped = self.framing is not None and self.framing.box != (0, 0, *self.framing.shape)
        read = to_image_frame(np.ones((2, 2), np.float32), self.framing, lungs.shape) > 0 if cropped else slice(None)
        return evidence_shares(self.scored_map, lungs) | {"chance_focus": float(lungs[read].mean()), "cropped": cropped}

    # Where the evidence lies (None without a lung model): shares of the heatmap's mass on the
    # lungs, on the image border and on the top strip (segment.evidence_shares).
    @property
    def lung_focus(self) -> float | None:
        return self._shares.get("lung_focus")

    @property
    def chance_focus(self) -> float | None:
        """The lung focus of a map spread evenly over what the network read (the image, or the
        lungs' box of a lung-reading model): a map no better than this says nothing of the lungs."""
        return self._shares.get("chance_focus")

    @property
    def border_share(self) -> float | None:
        return self._shares.get("border_share")

    @property
    def top_share(self) -> float | None:
        return self._shares.get("top_share")

    @cached_property
    def verdict(self):
        """What is shown of this analysis (report.py): the prediction's verdict with the heatmap's
        class, method and evidence, and the lungs-outside notice when it fires."""
        from .report import verdict

        prediction = self.prediction
        # Where the evidence lies is computed only where it is shown (Verdict.evidence_shown).
        shares = self._shares if prediction.verdict.evidence_shown else None
        return verdict(prediction.decided, prediction.probabilities, warnings=prediction.warnings[len(prediction.reasons):],
                       reasons=prediction.reasons, decision=prediction.decision, target=self.target,
                       method=self.method, shares=shares, notice=self.notice_rule, same_methods=self.same_methods)

    @cached_property
    def overlay(self) -> Image.Image:
        """RGB: the X-ray in gray, the heatmap blended on at `opacity`, the lungs outlined in white."""
        return overlay(self.image, self.heatmap, self.opacity, self.lung_mask)


class _DecidingTarget:
    """A pytorch-grad-cam target that explains `target`, or, when that is None, the label the
    checkpoint's decision rule gives for the logits it first sees: the same probabilities the
    label is decided from (logits / temperature, then the rule with its threshold), so the map
    explains the class the page shows."""

    def __init__(self, predictor: Predictor, target: str | None):
        self.predictor = predictor
        self.target = target

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.target is None:
            probabilities = torch.softmax(logits.detach().float() / self.predictor.temperature, dim=-1).cpu().numpy()
            self.target = self.predictor.classes[int(self.predictor.decide(probabilities[None])[0])]
        return logits[self.predictor.classes.index(self.target)]


class Explainer:
    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.model = copy.deepcopy(predictor.model).eval()
        self.layer = self.model.get_submodule(predictor.config["gradcam_layer"])
        # CAMs need gradients at the CAM layer only, never for the weights. Freeze the weights and
        # make the layer's output the leaf of the graph: backward then runs through the head alone
        # instead of through the whole network and every weight (same maps, less work).
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.layer.register_forward_hook(_start_graph_here, prepend=True)
        # One set of hooks on the copy, shared by every CAM method.
        self.hooks = ActivationsAndGradients(self.model, [self.layer], None)
        self.features = FeatureHook(self.model)
        self.cams = {}

    def cam(self, method: str):
        if method not in METHODS:
            raise ValueError(f"unknown CAM method {method!r}; choose from {sorted(METHODS)}")
        if method not in self.cams:
            cam = METHODS[method](model=self.model, target_layers=[self.layer])
            cam.activations_and_grads.release()  # its own hooks: replaced by the shared ones
            cam.activations_and_grads = self.hooks
            self.cams[method] = cam
        return self.cams[method]

    def explain(self, image, method: str = "gradcam", target: str | None = None,
                opacity: float = 0.4, max_side: int | None = None) -> Explanation:
        """`max_side`: shrink what is returned (image, heatmap, lung mask, overlay) to at most
        this many pixels a side. The prediction always comes from the full-size image; a 2,000-px
        X-ray shown in a 500-px box costs its colour mapping, encoding and transfer for nothing."""
        gray, colour = load_image(image)
        small, framed, deciding, probabilities, features, _ = self.network_map(gray, method, target)
        shown = shrink(gray, max_side)
        return Explanation(
            # The map covers what the network read (the lungs' box): put it back on the image.
            heatmap=to_image_frame(small, framed, shown.shape),
            target=deciding.target,
            method=method,
            prediction=self.predictor.prediction(probabilities, features, gray, colour, framed),
            image=shown,
            full_image=gray,
            opacity=opacity,
            segmenter=self.predictor.segmenter,
            framing=framed,
            notice_rule=notice_rule(self.predictor.config),
            same_methods=identical_methods(self.predictor.config),
            network_map=small,
        )

    def network_map(self, gray: np.ndarray, method: str = "gradcam", target: str | None = None):
        """(the map at the network's input size, where the input was cut from, the explained
        target, the probabilities (C,), the penultimate features, the network's input tensor)
        for a loaded grayscale image."""
        if target is not None and target not in self.predictor.classes:
            raise ValueError(f"unknown class {target!r}; choose from {self.predictor.classes}")
        cam = self.cam(method)
        tensor, framed = self.predictor.view(gray)
        inputs = self.predictor.model_input(tensor[None])
        deciding = _DecidingTarget(self.predictor, target)
        features = None
        if not cam.uses_gradients:
            # Gradient-free methods (Score-CAM) run many forward passes on masked copies of the
            # input: the prediction and the not-an-X-ray features come from a clean pass first.
            with torch.inference_mode():
                logits = self.model(inputs)[0]
                features = self.features.features[0].cpu().numpy()
                if target is None:
                    deciding(logits)
        with torch.enable_grad():
            small = cam(input_tensor=inputs, targets=[deciding])[0]
        if features is None:  # gradient methods: the one pass that made the map
            features = self.features.features[0].cpu().numpy()
        # The prediction comes from the same (clean) forward pass that produced the map.
        logits = cam.outputs[0].detach().float() / self.predictor.temperature
        probabilities = torch.softmax(logits, dim=-1).cpu().numpy()
        cam.outputs = None
        self.hooks.clear()
        return small, framed, deciding, probabilities, features, inputs


def _start_graph_here(module, inputs, output):
    if not torch.is_grad_enabled() or output.requires_grad:
        return output
    # A clone of the leaf, so that in-place layers after the CAM layer (densenet's ReLU) are allowed.
    return output.detach().requires_grad_(True).clone()


def shrink(gray: np.ndarray, max_side: int | None) -> np.ndarray:
    """The image scaled down (area-averaged) so its longer side is at most `max_side`."""
    height, width = gray.shape
    if max_side is None or max(height, width) <= max_side:
        return gray
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(gray, mode="F").resize(size, Image.Resampling.BOX), dtype=np.float32)


def overlay(gray: np.ndarray, heatmap: np.ndarray, opacity: float = 0.4,
            lung_mask: np.ndarray | None = None) -> Image.Image:
    """The X-ray in gray with the heatmap in the jet colour map blended on at `opacity`, and the
    outline of the lungs in white when a mask is given."""
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    blended = show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=1.0 - float(opacity))
    if lung_mask is not None:
        from .segment import outline

        blended[outline(lung_mask, max(1, min(gray.shape) // 200))] = 255
    return Image.fromarray(blended)
