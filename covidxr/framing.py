"""Framing stage: which part of an X-ray the classifier sees, and how a map on that part is put
back on the X-ray.

A whole radiograph holds much that is not lung: collimation borders, text markers, shoulders,
the abdomen. Each source frames and labels its films in its own way, so a network trained on
whole images learns the source instead of the disease, and its heatmaps land on borders and
markers. A lung-grounded checkpoint therefore reads only the lungs' bounding box (from the lung
U-Net, segment.py) plus a margin, optionally with what lies outside the dilated lung mask
dimmed. The recipe is stored in the checkpoint under "framing":

    {"method": "lung_crop", "margin": 0.08, "dilation": 0.04, "outside": 1.0, "min_lung_area": 0.03}

- margin: added on each side, as a fraction of the box's own height (top, bottom) or width;
- dilation: radius of the dilation of the lung mask, as a fraction of the box's longer side;
  it bounds where the training penalty lets evidence lie (training.py) and what `outside` dims;
- outside: brightness kept outside the dilated mask (1.0: nothing dimmed);
- min_lung_area: below this share of the image the lungs count as not found, the whole image is
  used, and the prediction says so;
- floor (optional, either method): {"side": S, "jpeg": Q}: what the network reads is first
  brought down to S x S pixels and, with Q, re-encoded as a JPEG (`quality_floor`): one common
  file quality, so the file's own can no longer tell the sources apart.

A checkpoint without "framing" (older ones) reads the whole image, as it was trained.
Training, evaluation, `Predictor`, the command line and the app all frame through `frame`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from .data import load_grayscale, prepare

WHOLE_IMAGE = {"method": "whole"}
LUNG_CROP = {"method": "lung_crop", "margin": 0.08, "dilation": 0.04, "outside": 1.0, "min_lung_area": 0.03}
NO_LUNGS_WARNING = ("No lungs were found in this image, so the model read the whole image; "
                    "treat the result and the heatmap with extra caution.")


@dataclass
class Framing:
    """Where the model looked: the crop box in the image's own pixels and the lung mask."""

    box: tuple[int, int, int, int]  # top, left, bottom, right (exclusive)
    shape: tuple[int, int]  # the image's (height, width)
    lung_mask: np.ndarray | None = None  # bool (H, W); None when the recipe needs none
    lungs_found: bool | None = None  # None: the recipe did not look for lungs

    @property
    def warnings(self) -> list[str]:
        return [NO_LUNGS_WARNING] if self.lungs_found is False else []


def uses_lungs(recipe: dict | None) -> bool:
    return bool(recipe) and recipe.get("method") == "lung_crop"


def find(gray: np.ndarray, recipe: dict | None, segmenter=None) -> Framing:
    """The crop box (and lung mask) for a grayscale image under `recipe`."""
    height, width = gray.shape
    whole = (0, 0, height, width)
    if not uses_lungs(recipe):
        return Framing(whole, (height, width))
    if segmenter is None:
        raise ValueError("this checkpoint reads the lungs only and needs the lung model (segment.py)")
    mask = segmenter.segment(gray)
    if mask.mean() < recipe["min_lung_area"]:
        return Framing(whole, (height, width), mask, lungs_found=False)
    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    top, bottom, left, right = rows[0], rows[-1] + 1, columns[0], columns[-1] + 1
    margin_y = round(recipe["margin"] * (bottom - top))
    margin_x = round(recipe["margin"] * (right - left))
    box = (max(0, top - margin_y), max(0, left - margin_x),
           min(height, bottom + margin_y), min(width, right + margin_x))
    return Framing(box, (height, width), mask, lungs_found=True)


def allowed_region(framing: Framing, recipe: dict | None) -> np.ndarray | None:
    """The dilated lung mask inside the crop box (bool), or None when lungs were not used."""
    if not framing.lungs_found:
        return None
    top, left, bottom, right = framing.box
    return dilate(framing.lung_mask[top:bottom, left:right], recipe["dilation"])


def dilate(mask: np.ndarray, fraction: float) -> np.ndarray:
    """A boolean mask dilated by a disk whose radius is `fraction` of the mask's longer side."""
    radius = max(1, round(fraction * max(mask.shape)))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask.astype(np.uint8), disk).astype(bool)


def model_view(gray: np.ndarray, framing: Framing, recipe: dict | None, size: int,
               equalize: bool = False) -> torch.Tensor:
    """The classifier's input: the crop, dimmed outside the lungs if the recipe says so,
    stretched to its own value range and resized to (1, size, size) uint8."""
    top, left, bottom, right = framing.box
    crop = gray[top:bottom, left:right]
    outside = (recipe or {}).get("outside", 1.0)
    if outside < 1.0 and framing.lungs_found:
        crop = np.where(allowed_region(framing, recipe), crop, crop * outside)
    floor = (recipe or {}).get("floor")
    if floor:
        crop = quality_floor(crop, floor["side"], floor.get("jpeg"))
    # `prepare` stretches the crop to its own range: a bright shoulder or a black border cut away
    # no longer sets the contrast.
    return prepare(np.ascontiguousarray(crop), size, equalize)


def quality_floor(crop: np.ndarray, side: int, jpeg_quality: int | None = None) -> np.ndarray:
    """The crop brought down to one common quality: `side` x `side` pixels (area averaging), then,
    with `jpeg_quality`, saved as a JPEG and read back. Whatever finer detail or cleaner encoding
    a file had above this floor (a lossless PNG, a 1,024-px original) is gone before the network
    sees it, in training and in serving alike, so it cannot tell one source's files from another's
    (issue 35). What lies below the floor (a copy smaller than `side` across the lungs) still differs."""
    small = cv2.resize(np.asarray(crop, np.float32), (side, side), interpolation=cv2.INTER_AREA)
    if jpeg_quality:
        from PIL import Image
        import io

        low, high = float(small.min()), float(small.max())
        scaled = (small - low) / (high - low) if high > low else np.zeros_like(small)
        buffer = io.BytesIO()
        Image.fromarray((scaled * 255).round().astype(np.uint8)).save(buffer, format="JPEG", quality=jpeg_quality)
        buffer.seek(0)
        small = np.asarray(Image.open(buffer), np.float32) / 255
    return small


def region_view(framing: Framing, recipe: dict | None, size: int) -> torch.Tensor:
    """The dilated lung mask at the model's input size, (1, size, size) uint8 0/1; all ones when
    lungs were not used (nothing to penalise)."""
    region = allowed_region(framing, recipe)
    if region is None:
        return torch.ones((1, size, size), dtype=torch.uint8)
    resized = cv2.resize(region.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    return torch.from_numpy(resized)[None]


def to_image_frame(heatmap: np.ndarray, framing: Framing, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A map over the model's input put back on the image: resized into the crop box, zero
    outside it. `shape` (default: the image's own) may be a shrunken copy of the image."""
    height, width = shape or framing.shape
    scale_y, scale_x = height / framing.shape[0], width / framing.shape[1]
    top, left, bottom, right = framing.box
    top, bottom = round(top * scale_y), max(round(top * scale_y) + 1, round(bottom * scale_y))
    left, right = round(left * scale_x), max(round(left * scale_x) + 1, round(right * scale_x))
    bottom, right = min(bottom, height), min(right, width)
    placed = np.zeros((height, width), np.float32)
    placed[top:bottom, left:right] = cv2.resize(heatmap.astype(np.float32), (right - left, bottom - top),
                                                interpolation=cv2.INTER_LINEAR)
    return np.clip(placed, 0.0, 1.0)


def frame(gray: np.ndarray, recipe: dict | None, size: int, equalize: bool = False, segmenter=None
          ) -> tuple[torch.Tensor, Framing]:
    """(model input (1, size, size) uint8, framing) for a grayscale image as `load_grayscale`
    returns it: the one way an image becomes the classifier's input."""
    framing = find(gray, recipe, segmenter)
    return model_view(gray, framing, recipe, size, equalize), framing


def frame_all(paths: list[str], recipe: dict | None, size: int, equalize: bool = False, segmenter=None,
              cache_dir: str | Path | None = None, description: str = "framing") -> tuple[torch.Tensor, torch.Tensor]:
    """Frame every image once: (images (N, 1, S, S) uint8, allowed regions (N, 1, S, S) uint8).

    Cached on disk under a key made of the files' contents, the recipe, the size and the lung
    model, so an edited image or a new lung model is never served stale."""
    cache_file = None
    if cache_dir:
        digest = hashlib.sha256(repr((sorted((recipe or {}).items()), size, equalize,
                                      getattr(segmenter, "fingerprint", None))).encode())
        for path in paths:
            digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
        cache_file = Path(cache_dir) / f"framed-{digest.hexdigest()[:20]}.npz"
        if cache_file.exists():
            stored = np.load(cache_file)
            return torch.from_numpy(stored["images"]), torch.from_numpy(stored["regions"])
    images, regions = [], []
    for path in tqdm(paths, desc=description, unit="img"):
        image, framing = frame(load_grayscale(path), recipe, size, equalize, segmenter)
        images.append(image)
        regions.append(region_view(framing, recipe, size))
    images, regions = torch.stack(images), torch.stack(regions)
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache_file, images=images.numpy(), regions=regions.numpy())
    return images, regions
