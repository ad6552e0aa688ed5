"""Simulated changes of hospital: what another scanner, another film or another export does to
a chest X-ray, to measure that the not-a-chest-X-ray check (xray_check.py) still reads real
X-rays as X-rays after it.

Each shift takes a grayscale X-ray, float32 (H, W) in [0, 1] as `data.load_grayscale` gives it,
and a seeded generator, and returns the changed X-ray as uint8 (H', W'), as a file would hold it.
None of them makes the image less of a chest X-ray: gamma and contrast (another processing
curve), film grain (a noisier detector), burned-in text and markers (side markers, stickers, a
date), a border (collimation, a scanned film's frame), a rotation (a patient not square on the
plate), crop and pad (a tighter or looser field), low resolution (a small export, a thumbnail
made larger) and inversion (a MONOCHROME1 film written out without its inversion).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _u8(gray: np.ndarray) -> np.ndarray:
    return (np.clip(gray, 0, 1) * 255).round().astype(np.uint8)


def gamma(gray, rng):
    return _u8(gray ** rng.choice([0.5, 0.65, 1.5, 2.0]))


def contrast(gray, rng):
    """The range squeezed (a flat, washed-out film) or the middle stretched and clipped."""
    if rng.random() < 0.5:
        low = rng.uniform(0.1, 0.4)
        return _u8(low + gray * rng.uniform(0.3, 0.5))
    return _u8((gray - 0.5) * rng.uniform(1.4, 1.8) + 0.5)


def grain(gray, rng):
    noisy = gray + rng.normal(0, rng.uniform(0.03, 0.08), gray.shape)
    return _u8(cv2.GaussianBlur(noisy.astype(np.float32), (0, 0), 0.6))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one size only
        return ImageFont.load_default()


def markers(gray, rng):
    """A side marker, a white sticker with black text and a line of white text, burned in."""
    image = Image.fromarray(_u8(gray))
    draw = ImageDraw.Draw(image)
    height, width = gray.shape
    size = max(10, height // 14)
    x, y = int(rng.uniform(0.03, 0.2) * width), int(rng.uniform(0.03, 0.15) * height)
    draw.text((x, y), rng.choice(["L", "R"]), fill=255, font=_font(size * 2))
    sx, sy = int(rng.uniform(0.55, 0.7) * width), int(rng.uniform(0.03, 0.12) * height)
    draw.rectangle((sx, sy, sx + width // 4, sy + size * 2), fill=235)
    draw.text((sx + 4, sy + 2), "PA ERECT", fill=10, font=_font(size))
    draw.text((int(0.05 * width), int(0.9 * height)), "2020-04-01 ST.MARY 12:31", fill=250, font=_font(size))
    return np.asarray(image)


def border(gray, rng):
    """A black or white frame 4-12% wide (collimation, a scanned film's edge)."""
    out = _u8(gray)
    height, width = gray.shape
    value = 0 if rng.random() < 0.5 else 255
    for side in range(4):
        share = rng.uniform(0.04, 0.12)
        if side == 0:
            out[:round(share * height)] = value
        elif side == 1:
            out[-round(share * height):] = value
        elif side == 2:
            out[:, :round(share * width)] = value
        else:
            out[:, -round(share * width):] = value
    return out


def rotation(gray, rng):
    angle = rng.choice([-1, 1]) * rng.uniform(6, 15)
    height, width = gray.shape
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
    return cv2.warpAffine(_u8(gray), matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=0)


def crop(gray, rng):
    """A tighter field: 75-90% of each side kept, off centre."""
    height, width = gray.shape
    keep_y, keep_x = rng.uniform(0.75, 0.9), rng.uniform(0.75, 0.9)
    top = int(rng.uniform(0, 1 - keep_y) * height)
    left = int(rng.uniform(0, 1 - keep_x) * width)
    return _u8(gray[top:top + round(keep_y * height), left:left + round(keep_x * width)])


def pad(gray, rng):
    """A looser field: 10-25% black (or white) added around, unevenly."""
    height, width = gray.shape
    value = 0 if rng.random() < 0.7 else 255
    sides = [int(rng.uniform(0.05, 0.2) * n) for n in (height, height, width, width)]
    return cv2.copyMakeBorder(_u8(gray), *sides, cv2.BORDER_CONSTANT, value=value)


def low_resolution(gray, rng):
    """A small export (160-256 px on the longer side), or one made large again from 128 px."""
    height, width = gray.shape
    side = int(rng.choice([128, 160, 200, 256]))
    scale = side / max(height, width)
    small = cv2.resize(_u8(gray), (max(1, round(width * scale)), max(1, round(height * scale))),
                       interpolation=cv2.INTER_AREA)
    if side == 128:
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    return small


def inverted(gray, rng):
    return _u8(1.0 - gray)


def jpeg(gray, rng):
    """A heavily compressed JPEG export."""
    ok, coded = cv2.imencode(".jpg", _u8(gray), [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(15, 40))])
    return cv2.imdecode(coded, cv2.IMREAD_GRAYSCALE)


SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "gamma": gamma, "contrast": contrast, "grain": grain, "markers": markers, "border": border,
    "rotation": rotation, "crop": crop, "pad": pad, "low_resolution": low_resolution,
    "inverted": inverted, "jpeg": jpeg,
}


def shifted(gray: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """`gray` changed by the shift `name` (SHIFTS), reproducibly for a seed."""
    return SHIFTS[name](np.asarray(gray, np.float32), np.random.default_rng(seed))
