"""DICOM radiographs (pydicom) to the grayscale array the rest of covidxr reads.

Stored values go through the modality LUT (RescaleSlope/RescaleIntercept), then the VOI LUT or
the window (WindowCenter/WindowWidth) when the file has one, and MONOCHROME1 images (where
higher values are darker) are inverted, so bone is bright whatever the scanner wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


def is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: 'DICM' after the 128-byte preamble, whatever its extension."""
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def read_dicom(path: Path, error: type[Exception] = ValueError, max_pixels: int | None = None) -> np.ndarray:
    """The radiograph as float32 (H, W), brighter = denser. Raises `error` with the reason."""
    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise error(f"{path.name}: not a readable DICOM file ({exc})") from exc
    if "PixelData" not in dataset:
        kind = dataset.get("Modality", "") or dataset.get("SOPClassUID", "unknown")
        raise error(f"{path.name}: DICOM object without pixel data ({kind}): not an image")
    photometric = str(dataset.get("PhotometricInterpretation", ""))
    if photometric not in GRAYSCALE:
        raise error(f"{path.name}: DICOM colour image ({photometric or 'no PhotometricInterpretation'}); "
                    "only grayscale radiographs (MONOCHROME1/2) are supported")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise error(f"{path.name}: multi-frame DICOM ({frames} frames); a single radiograph is expected")
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    if max_pixels and rows * columns > max_pixels:
        raise error(f"{path.name}: DICOM image is {columns} x {rows} pixels, more than the "
                    f"{max_pixels // 1_000_000} megapixels accepted")
    try:
        stored = dataset.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for undecodable data
        syntax = dataset.file_meta.get("TransferSyntaxUID", "unknown")
        name = getattr(syntax, "name", syntax)
        raise error(f"{path.name}: cannot decode DICOM pixel data ({name}): {exc}") from exc
    values = apply_modality_lut(stored, dataset)
    values = apply_voi_lut(values, dataset)
    values = np.asarray(values, dtype=np.float32)
    if photometric == "MONOCHROME1":
        values = values.max() - values
    return values
