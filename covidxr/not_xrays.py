"""Pictures that are not chest X-rays, to measure the not-a-chest-X-ray check (ood.py) and to
test it: scikit-image's sample pictures, face photos, and generated documents, screenshots,
charts, noise and patterns. Nothing here is downloaded; scikit-image ships its samples.
"""

from __future__ import annotations

import numpy as np


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
