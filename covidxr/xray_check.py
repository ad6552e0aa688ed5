"""Is this a frontal chest X-ray? The check behind every refusal, independent of the classifier.

A classifier answers for anything, a cat included; the app, the command line and the API refuse
what is no frontal chest X-ray (photos, documents, screenshots, charts, colour images, CT
slices, lateral views) instead of naming a class for it. An X-ray that is merely unlike the
training data (another hospital, scanner, film or patient group) is read, with a warning: the
feature-distance test of ood.py warns, and never refuses.

The evidence here survives a change of hospital because it is anatomy and physics, not the
look of one source:

- **Size**: a side under `min_side` pixels is a thumbnail or an icon, nothing one could read.
- **Blank**: an image with (almost) no variation in its gray levels shows nothing.
- **Colour**: X-rays are gray. A Hasler-Suesstrunk colourfulness above `colour` is a photo, a
  chart or a screenshot (a few coloured arrows from a journal figure stay below it).
- **Lungs**: the lung U-Net (segment.py), which learned from chest X-rays only, must find two
  lungs, or one pair merged into a block at its 64-px view, whose outline, cropped to its own
  box, overlaps the average outline of the training X-rays' lungs (`template`) by at least
  `min_template_iou`; crisp (its mean probability inside the mask at least `min_confidence`,
  and few undecided pixels, `max_undecided`) and large enough (`min_area` of the image). A
  photo, a document or a face gives no lungs, scattered specks, or blobs of the wrong shape.
  The test is run on the image and on its inverse: a MONOCHROME1 film written out without its
  inversion is an X-ray, and gets a warning that it looks inverted (when its inverse matches the
  template better by `inverted_margin`, or only its inverse has lungs). The inverse must match the
  template more closely (`min_template_iou_inverse`): the inverse of a photo or a page yields
  lung-like blobs more often than the picture itself.

Every number is in `covidxr/weights/covidxr-xraycheck.json` (`XrayCheck.load`): the template
and the thresholds. The thresholds were set on the training X-rays and on simulated hospital
changes of them (shifts.py), not on the pictures that are not X-rays; `covidxr ood` measures
false refusals (test X-rays, their simulated shifts, X-rays from other hospitals) and missed
refusals (not_xrays.py) and MODEL_CARD.md reports them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

SHIPPED_RULES = Path(__file__).parent / "weights" / "covidxr-xraycheck.json"
TEMPLATE_SIDE = 32
LUNG_SIDE = 64  # the lung model's input, and the resolution its mask is judged at


@dataclass
class Finding:
    """What the check found: `reasons` to refuse (empty for an X-ray), `warnings` for an X-ray
    that is read all the same, and the `evidence` measured (for `covidxr ood`)."""

    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    evidence: dict = field(default_factory=dict)

    @property
    def refused(self) -> bool:
        return bool(self.reasons)


def lung_shape(probability: np.ndarray, template: np.ndarray | None) -> dict:
    """Evidence of lungs in a lung-probability map (S, S): area share, confidence, the share of
    undecided pixels, the lungs' box, and the overlap of the outline with `template`."""
    found = probability > 0.5
    area = float(found.mean())
    evidence = {"area": area, "confidence": float(probability[found].mean()) if found.any() else 0.0,
                "undecided": float(((probability > 0.2) & (probability < 0.8)).mean() / max(area, 1e-3)),
                "template_iou": 0.0}
    mask = lungs_found(probability)
    if mask is None or template is None:
        return evidence
    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    outline = box_outline(mask)
    expected = np.asarray(template) > 0.5
    evidence["template_iou"] = float((outline & expected).sum() / max((outline | expected).sum(), 1))
    evidence["notch"] = notch(outline)
    size = probability.shape[0]
    evidence["box"] = [int(rows[0]) / size, int(columns[0]) / size, (int(rows[-1]) + 1) / size,
                       (int(columns[-1]) + 1) / size]
    return evidence


def lungs_found(probability: np.ndarray) -> np.ndarray | None:
    """The lung mask in a lung-probability map: its two largest regions, holes filled; None when
    under 8 pixels are left (no shape to judge)."""
    from .segment import clean_mask

    found = probability > 0.5
    mask = clean_mask(found) if found.any() else found
    return mask if mask.sum() >= 8 else None


def lung_view(gray: np.ndarray) -> torch.Tensor:
    """The lung model's input for the check: the image with its uniform margins trimmed, at
    LUNG_SIDE x LUNG_SIDE (uint8, (1, S, S))."""
    from .data import prepare

    return prepare(trimmed(gray), LUNG_SIDE)


def box_outline(mask: np.ndarray) -> np.ndarray:
    """The lungs' outline cropped to its own box, at TEMPLATE_SIDE x TEMPLATE_SIDE (bool): the
    shape, whatever the lungs' size and place in the image."""
    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    crop = mask[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1].astype(np.float32)
    return cv2.resize(crop, (TEMPLATE_SIDE, TEMPLATE_SIDE), interpolation=cv2.INTER_AREA) > 0.5


def notch(outline: np.ndarray) -> float:
    """How full the middle of the outline is against its left and right thirds' middles: two
    lungs leave the mediastinum between them (about 0.1 on X-rays; under 0.9 for 99% of them,
    merged pairs included), where a disc, an ellipse, a page or a face fills the middle (1 or more)."""
    outline = outline.astype(np.float32)
    middle = outline[:, 14:18].mean()
    sides = (outline[:, 5:10].mean() + outline[:, 22:27].mean()) / 2
    return float(middle / max(sides, 1e-3))


def trimmed(gray: np.ndarray, spread: float = 0.05) -> np.ndarray:
    """`gray` without its uniform margins: edge rows and columns whose gray levels span less than
    `spread` (padding, a black or white frame, a scanner's edge), so the lung model sees the film
    at its 64-px view, not the frame. An image that is (almost) all margin is left as it is.
    Repeated until nothing changes: a white pad around a film with its own dark edge comes off
    first, the dark edge next."""
    for _ in range(4):
        rows = np.flatnonzero(np.ptp(gray, axis=1) >= spread)
        columns = np.flatnonzero(np.ptp(gray, axis=0) >= spread)
        if len(rows) < gray.shape[0] // 4 or len(columns) < gray.shape[1] // 4:
            return gray
        inner = gray[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
        if inner.shape == gray.shape:
            break
        gray = inner
    return gray


def fit_template(grays, segmenter) -> list[list[float]]:
    """The template: the mean outline (box_outline) of the lungs `segmenter` finds on the
    X-rays `grays` (the training X-rays), rounded to 3 decimals for the rules file. It belongs
    to the lung model it was made with: a retrained lung model needs a new one."""
    outlines = []
    for gray in grays:
        mask = lungs_found(segmenter.probabilities(lung_view(gray)[None]).numpy()[0])
        if mask is not None:
            outlines.append(box_outline(mask))
    return np.round(np.mean(outlines, axis=0), 3).tolist()


class XrayCheck:
    def __init__(self, rules: dict):
        self.rules = rules
        self.template = np.asarray(rules["lungs"]["template"], np.float32) if rules.get("lungs") else None

    @classmethod
    def load(cls, path: str | Path | None = None) -> "XrayCheck":
        """The check's rules from their file. Fails closed: without its rules no input could be
        refused, so a missing or damaged file raises `CheckpointError` naming it."""
        from .checkpoint import CheckpointError

        path = Path(path or SHIPPED_RULES)
        try:
            rules = json.loads(path.read_text())
            rules["lungs"]["template"], rules["min_side"]  # the parts every check reads
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{path}: the not-a-chest-X-ray check's rules cannot be read "
                                  f"({type(error).__name__}: {error})") from error
        return cls(rules)

    def lungs_plausible(self, evidence: dict, inverse: bool = False) -> bool:
        rule = self.rules["lungs"]
        overlap = rule["min_template_iou_inverse" if inverse else "min_template_iou"]
        return (evidence["area"] >= rule["min_area"] and evidence["confidence"] >= rule["min_confidence"]
                and evidence["undecided"] <= rule["max_undecided"] and evidence["template_iou"] >= overlap
                and evidence.get("notch", 0.0) <= rule.get("max_notch", np.inf))

    def lung_evidence(self, gray: np.ndarray, segmenter) -> tuple[dict, dict]:
        """(lung evidence of the image, of its inverse), from one batch through the lung model;
        uniform margins trimmed first (`trimmed`)."""
        from .data import prepare

        film = trimmed(gray)
        upright = prepare(film, LUNG_SIDE)  # lung_view, keeping the film to know if it was trimmed
        batch = [upright, 255 - upright]  # the inverse, without a second full-size copy
        # The lung outline asks for the whole image (segmenter.segment). When margins were trimmed
        # that is another input: asked in this same pass, its answer is kept for the outline (a
        # batch of three costs little more than two; a separate pass cost 10 ms on 2 cores).
        if film is not gray or segmenter.config["input_size"] != LUNG_SIDE:
            batch.append(segmenter.view(gray))
        probabilities = segmenter.probabilities(torch.stack(batch), keep=True).numpy()
        return lung_shape(probabilities[0], self.template), lung_shape(probabilities[1], self.template)

    def examine(self, gray: np.ndarray, colourfulness: float, segmenter=None) -> Finding:
        """The finding for a grayscale image as `data.load_image` gives it (float32 (H, W) in
        [0, 1]) and its colourfulness. Without a lung model only size, blankness and colour
        are tested."""
        rules = self.rules
        height, width = gray.shape
        step = max(1, max(height, width) // 512)
        spread = float(np.asarray(gray[::step, ::step], np.float32).std())
        finding = Finding(evidence={"height": height, "width": width, "colourfulness": float(colourfulness),
                                    "spread": spread})
        if min(height, width) < rules["min_side"]:
            finding.reasons.append(f"This image is only {width} x {height} pixels: too small to be a readable "
                                   "chest X-ray.")
        if spread < rules["min_spread"]:
            finding.reasons.append("This image is blank, or nearly: it shows nothing to read.")
        if colourfulness > rules["colour"]:
            finding.reasons.append(f"This image is in colour (colourfulness {colourfulness:.0f}; X-rays are "
                                   "gray).")
        if segmenter is None or not rules.get("lungs") or finding.reasons:
            return finding
        upright, inverse = self.lung_evidence(gray, segmenter)
        finding.evidence |= {"lungs": upright, "inverse_lungs": inverse}
        upright_ok, inverse_ok = self.lungs_plausible(upright), self.lungs_plausible(inverse, inverse=True)
        looks_inverted = inverse_ok and (not upright_ok or inverse["template_iou"] >= upright["template_iou"]
                                         + self.rules["lungs"]["inverted_margin"])
        if looks_inverted:
            finding.warnings.append("This X-ray looks inverted (bones dark, lungs bright), as a MONOCHROME1 film "
                                    "written out without its inversion would: the model reads it as it is, so "
                                    "give the prediction less weight, or invert the image and try again.")
        if upright_ok or inverse_ok:
            return finding
        finding.reasons.append("No pair of lungs was found in it (the lung model finds them on chest X-rays "
                               "from other hospitals too): it does not look like a frontal chest X-ray.")
        return finding
