"""The heatmap's colour scale, for the app (an HTML legend under the overlay) and for the
command line's heatmap PNGs (a caption strip below the image: what the map shows, and the
scale).

The overlay colours the map with OpenCV's jet colour map (pytorch-grad-cam's
`show_cam_on_image`); the legend is drawn from that very map, so the two cannot drift apart.
"""

from __future__ import annotations

import textwrap

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont


def jet(values: np.ndarray) -> np.ndarray:
    """RGB uint8 (N, 3) for values in [0, 1], as the overlay colours them."""
    levels = np.clip(np.round(np.asarray(values, np.float64) * 255), 0, 255).astype(np.uint8)
    return cv2.applyColorMap(levels[:, None], cv2.COLORMAP_JET)[:, 0, ::-1]


def _css_gradient(stops: int = 9) -> str:
    colours = jet(np.linspace(0, 1, stops))
    return ", ".join(f"rgb({r}, {g}, {b}) {100 * k / (stops - 1):.0f}%" for k, (r, g, b) in enumerate(colours))


LEGEND_HTML = (
    '<div class="heatmap-legend" role="img" aria-label="Colour scale: blue is the weakest evidence, red the '
    'strongest" style="font-size: var(--text-sm); color: var(--body-text-color-subdued);">'
    f'<div style="height: 12px; border-radius: 3px; background: linear-gradient(to right, {_css_gradient()});"></div>'
    '<div style="display: flex; justify-content: space-between;"><span>weakest evidence</span>'
    '<span>strongest</span></div>'
    '<div>Each map is scaled to its own strongest point: red is where this image\'s evidence for the class '
    'is strongest, not a fixed level.</div></div>')


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one size only
        return ImageFont.load_default()


def captioned(image: Image.Image, text: str) -> Image.Image:
    """`image` with a strip below it: `text` (wrapped) and the colour scale from weakest to
    strongest evidence. The image itself is unchanged, pixel for pixel, at the top."""
    width, height = image.size
    size = max(12, min(28, width // 45))
    font = _font(size)
    chars = max(20, int(width / (0.6 * size)))
    lines = textwrap.wrap(text, chars) or [""]
    line_height = round(size * 1.3)
    bar = max(8, size // 2)
    pad = max(4, size // 3)
    strip = pad + line_height * len(lines) + pad + bar + pad + line_height + pad
    out = Image.new("RGB", (width, height + strip), (255, 255, 255))
    out.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    y = height + pad
    for line in lines:
        draw.text((pad, y), line, fill=(0, 0, 0), font=font)
        y += line_height
    y += pad
    left, right = pad, width - pad
    colours = jet(np.linspace(0, 1, max(2, right - left)))
    scale = np.repeat(colours[None], bar, axis=0)
    out.paste(Image.fromarray(scale), (left, y))
    y += bar + pad // 2
    draw.text((left, y), "weakest evidence", fill=(60, 60, 60), font=font)
    strongest = "strongest"
    draw.text((right - draw.textlength(strongest, font=font), y), strongest, fill=(60, 60, 60), font=font)
    return out
