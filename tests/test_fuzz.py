"""Malformed and unusual inputs: each gets a clear ImageLoadError or a valid prediction, through
`Predictor` and through the launched app, and the app keeps answering."""

import io
import random
import struct
import zlib

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from benchmarks.common import shared_ssl_context
from conftest import real_image
from covidxr.data import ImageLoadError
from covidxr.report import NOT_AN_XRAY


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` with almost no data behind it."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def make_inputs(folder, real_png: bytes, real_jpeg: bytes) -> list:
    rng = random.Random(0)
    gray = Image.fromarray(np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint8))
    cases = {
        "empty.png": b"",
        "text.png": b"hello, not an image\n" * 10,
        "pdf.jpg": b"%PDF-1.7\n" + bytes(rng.randrange(256) for _ in range(500)),
        "html.png": b"<html><body>404</body></html>",
        "random-small.jpg": bytes(rng.randrange(256) for _ in range(16)),
        "random-large.png": bytes(rng.randrange(256) for _ in range(200_000)),
        "png-magic-only.png": b"\x89PNG\r\n\x1a\n",
        "jpeg-magic-only.jpg": b"\xff\xd8\xff\xe0",
        "dicom-preamble-garbage.dcm": b"\x00" * 128 + b"DICM" + bytes(rng.randrange(256) for _ in range(300)),
        "bomb-header.png": png_header_only(100_000, 100_000),
        "zero-width-header.png": png_header_only(0, 10),
        "animated.gif": encoded(gray, "GIF", save_all=True, append_images=[gray.rotate(90)], duration=100, loop=0),
        "multipage.tif": encoded(gray, "TIFF", save_all=True, append_images=[gray.rotate(90)]),
        "cmyk.jpg": encoded(gray.convert("CMYK"), "JPEG"),
        "sixteen-bit.png": encoded(Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)), "PNG"),
        "rgba-transparent.png": encoded(Image.new("RGBA", (32, 32), (255, 0, 0, 0)), "PNG"),
        "one-pixel.png": encoded(Image.new("L", (1, 1), 7), "PNG"),
        "one-pixel.jpg": encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "JPEG"),
        "bilevel.bmp": encoded(gray.convert("1"), "BMP"),
        "lab.tif": encoded(gray.convert("RGB").convert("LAB"), "TIFF"),
        "webp-as-png.png": encoded(gray, "WEBP"),
        "constant-black.png": encoded(Image.new("L", (50, 50), 0), "PNG"),
        "tall-strip.png": encoded(Image.new("L", (3, 3000), 128), "PNG"),
        "float.tif": encoded(Image.fromarray(np.random.default_rng(0).random((40, 40)).astype(np.float32)), "TIFF"),
    }
    for cut in (0.1, 0.5, 0.9):
        cases[f"png-truncated-{cut}.png"] = real_png[: int(len(real_png) * cut)]
        cases[f"jpeg-truncated-{cut}.jpg"] = real_jpeg[: int(len(real_jpeg) * cut)]
    for k in range(4):
        flipped = bytearray(real_png)
        for _ in range(20):
            flipped[rng.randrange(64, len(flipped))] ^= 0xFF
        cases[f"png-bitflips-{k}.png"] = bytes(flipped)
    paths = []
    for name, content in cases.items():
        path = folder / name
        path.write_bytes(content)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def malformed(tmp_path_factory, manifest_frame):
    folder = tmp_path_factory.mktemp("fuzz")
    real_png = real_image(manifest_frame, "normal", "nih14").read_bytes()
    real_jpeg = real_image(manifest_frame, "normal", "kermany").read_bytes()
    paths = make_inputs(folder, real_png, real_jpeg)
    assert len(paths) == 34  # the count README.md gives
    return paths


# A refusal gives one of these specific reasons (not a generic "cannot read image").
REASONS = ("the file is empty", "not an image we can read", "the image is damaged", "far more than its",
           "megapixels",
           "too large to decode safely", "DICOM object without pixel data", "cannot convert a")


def test_predictor_gives_error_or_valid_result(malformed, predictor):
    outcomes = {}
    for path in malformed:
        try:
            prediction = predictor.predict(path)
        except ImageLoadError as error:
            message = str(error)
            assert any(reason in message for reason in REASONS), message
            # Named by its file, except a mode conversion, which fails on pixels already read
            # (the app adds the name: "lab.tif: cannot convert ...").
            assert message.startswith((f"{path.name}: ", "cannot convert a")), message
            outcomes[path.name] = "error"
            continue
        assert abs(sum(prediction.probabilities.values()) - 1) < 1e-5, path.name
        outcomes[path.name] = prediction.label
    # The clearly broken ones are refused; the odd-but-valid ones are read.
    for name in ("empty.png", "text.png", "bomb-header.png", "png-magic-only.png", "dicom-preamble-garbage.dcm"):
        assert outcomes[name] == "error", name
    for name in ("animated.gif", "multipage.tif", "cmyk.jpg", "sixteen-bit.png", "one-pixel.png", "webp-as-png.png"):
        assert outcomes[name] != "error", name


@pytest.mark.app
def test_launched_app_survives_every_malformed_input(served_app, malformed, examples_dir):
    client = Client(served_app, verbose=False, ssl_verify=shared_ssl_context())
    for path in malformed:
        try:
            label, *_ = client.predict(handle_file(str(path)), api_name="/predict")
        except Exception as error:  # noqa: BLE001 - the client wraps the app's gr.Error
            # Our own specific message, naming the file, not Gradio's generic "the app raised an exception".
            assert str(error).startswith(path.name), (path.name, str(error))
            continue
        if label["label"] == NOT_AN_XRAY:  # read, and refused as no chest X-ray (a 1-pixel image, ...)
            continue
        assert abs(sum(c["confidence"] for c in label["confidences"]) - 1) < 1e-4, path.name
    example = next(p for p in sorted(examples_dir.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    label, *_ = client.predict(handle_file(str(example)), api_name="/predict")
    assert label["label"] in ("covid", "normal", "pneumonia")
