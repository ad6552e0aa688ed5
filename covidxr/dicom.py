"""DICOM radiographs (pydicom) to the grayscale array the rest of covidxr reads.

Stored values go through the modality LUT (RescaleSlope/RescaleIntercept), then the VOI LUT or
the window (WindowCenter/WindowWidth) when the file has one, and MONOCHROME1 images (where
higher values are darker) are inverted, so bone is bright whatever the scanner wrote.

Nothing is decoded before it is checked: the attributes the decoder relies on (frames, size,
samples, bit depths, rescale, window), and, for compressed transfer syntaxes, each frame's own
header (codestreams.py), which must give the same size as Rows and Columns. A JPEG or JPEG 2000
frame must also end with its end marker (a frame cut short is decoded with padding, without an
error), and a Huffman-coded JPEG frame must hold enough data for the pixels its header claims
(a 640-px frame whose header says 8000 x 8000 would be padded to 64 megapixels). Any failure after
the file is recognised as DICOM is raised as `error` (data.py passes ImageLoadError) with the
reason in plain words.
"""

from __future__ import annotations

import math
import re
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid
from pydicom.encaps import generate_frames
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from .codestreams import (CodestreamError, ends_complete, j2k_header, jpeg_header, most_pixels, rle_decoded_length,
                          rle_segments)

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
JPEG_SYNTAXES = {*uid.JPEGTransferSyntaxes, *uid.JPEGLSTransferSyntaxes}
# When no pixel cap is given, a deflated data set may still not inflate past this.
DEFAULT_MAX_PIXELS = 64_000_000
# An RLE segment may carry a pad byte per row (non-conformant, but written by some encoders).
RLE_SLACK_PER_ROW = 1


class _Refused(ValueError):
    """A reason to refuse the file, turned into the caller's `error` class at the boundary."""


def is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: 'DICM' after the 128-byte preamble, whatever its extension."""
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def read_dicom(path: Path, error: type[Exception] = ValueError, max_pixels: int | None = None) -> np.ndarray:
    """The radiograph as float32 (H, W), brighter = denser. Raises `error` with the reason."""
    name = Path(path).name
    try:
        _check_inflated_size(path, 4 * (max_pixels or DEFAULT_MAX_PIXELS) + (16 << 20))
        dataset = pydicom.dcmread(path)
    except _Refused as reason:
        raise error(f"{name}: {reason}") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a damaged file
        raise error(f"{name}: not a readable DICOM file ({_brief(exc)})") from exc
    try:
        return _radiograph(dataset, max_pixels)
    except _Refused as reason:
        raise error(f"{name}: {reason}") from None
    except Exception as exc:  # noqa: BLE001 - every failure inside the file becomes the caller's error
        raise error(f"{name}: the DICOM image could not be read ({_brief(exc)})") from exc


def _radiograph(dataset: pydicom.Dataset, max_pixels: int | None) -> np.ndarray:
    if "PixelData" not in dataset:
        kind = dataset.get("Modality", "") or dataset.get("SOPClassUID", "unknown")
        raise _Refused(f"DICOM object without pixel data ({_shown(kind)}): not an image")
    photometric = str(dataset.get("PhotometricInterpretation", ""))
    if photometric not in GRAYSCALE:
        raise _Refused(f"DICOM colour image ({_shown(photometric) or 'no PhotometricInterpretation'}); "
                       "only grayscale radiographs (MONOCHROME1/2) are supported")
    frames = _whole_number(dataset, "NumberOfFrames", default=1)
    if frames > 1:
        raise _Refused(f"multi-frame DICOM ({frames} frames); a single radiograph is expected")
    if frames < 1:
        raise _Refused(f"NumberOfFrames is {frames}; a single radiograph is expected")
    rows, columns = _whole_number(dataset, "Rows"), _whole_number(dataset, "Columns")
    if rows < 1 or columns < 1:
        raise _Refused(f"DICOM image size {columns} x {rows} is empty")
    if max_pixels and rows * columns > max_pixels:
        raise _Refused(f"DICOM image is {columns} x {rows} pixels, more than the "
                       f"{max_pixels // 1_000_000} megapixels accepted")
    samples = _whole_number(dataset, "SamplesPerPixel", default=1)
    if samples != 1:
        raise _Refused(f"SamplesPerPixel is {samples}; a grayscale image has 1")
    bits_allocated, bits_stored = _whole_number(dataset, "BitsAllocated"), _whole_number(dataset, "BitsStored")
    if bits_allocated not in (1, 8, 16, 32) or not 1 <= bits_stored <= bits_allocated:
        raise _Refused(f"BitsAllocated {bits_allocated} with BitsStored {bits_stored} is not a "
                       "grayscale bit depth (1, 8, 16 or 32 bits allocated, no more stored)")
    if _whole_number(dataset, "PixelRepresentation", default=0) not in (0, 1):
        raise _Refused("PixelRepresentation must be 0 (unsigned) or 1 (signed)")
    _check_pixel_data(dataset, rows, columns, bits_allocated)
    slope = _real(dataset, "RescaleSlope", 1.0)
    _real(dataset, "RescaleIntercept", 0.0)  # only checked here: it must be a finite number
    if slope == 0:
        raise _Refused("RescaleSlope is 0, which makes every pixel the same value")
    _check_window(dataset)

    try:
        stored = dataset.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom and its plugins raise many types
        raise _Refused(f"cannot decode DICOM pixel data ({_syntax_name(dataset)}): {_brief(exc)}") from exc
    try:
        values = apply_modality_lut(stored, dataset)
    except Exception as exc:  # noqa: BLE001
        raise _Refused(f"its modality LUT or rescale cannot be applied ({_brief(exc)})") from exc
    try:
        values = apply_voi_lut(values, dataset)
    except Exception as exc:  # noqa: BLE001
        raise _Refused(f"its VOI LUT or window cannot be applied ({_brief(exc)})") from exc
    values = np.asarray(values, dtype=np.float32)
    if values.shape != (rows, columns):
        raise _Refused(f"decoded to {values.shape}, not the {rows} x {columns} its header gives")
    if photometric == "MONOCHROME1":
        values = values.max() - values
    return values


# --------------------------------------------------------------------------------------------
# What the pixel data holds, checked before decoding
# --------------------------------------------------------------------------------------------

def _check_pixel_data(dataset: pydicom.Dataset, rows: int, columns: int, bits_allocated: int) -> None:
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_encapsulated:  # native: as many bytes as the header says
        expected = math.ceil(rows * columns * bits_allocated / 8)
        if len(dataset.PixelData) < expected:
            raise _Refused(f"its DICOM pixel data holds {len(dataset.PixelData)} bytes, fewer than the {expected} "
                           f"a {columns} x {rows} image of {bits_allocated} bits needs")
        return
    if syntax not in JPEG_SYNTAXES | {*uid.JPEG2000TransferSyntaxes, *uid.RLETransferSyntaxes}:
        raise _Refused(f"compressed with {_syntax_name(dataset)}, which covidxr does not decode")
    extended = None
    if "ExtendedOffsetTable" in dataset and "ExtendedOffsetTableLengths" in dataset:
        extended = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths)
    frames = list(generate_frames(dataset.PixelData, number_of_frames=1, extended_offsets=extended))
    if len(frames) != 1:
        raise _Refused(f"its pixel data holds {len(frames)} frames; a single radiograph is expected")
    try:
        if syntax in uid.RLETransferSyntaxes:
            _check_rle_frame(frames[0], rows, columns, bits_allocated)
            return
        header = jpeg_header(frames[0]) if syntax in JPEG_SYNTAXES else j2k_header(frames[0])
    except CodestreamError as reason:
        raise _Refused(f"its {_syntax_name(dataset)} frame cannot be checked: {reason}") from None
    if (header.width, header.height) != (columns, rows):
        raise _Refused(f"its {_syntax_name(dataset)} frame says {header.width} x {header.height} pixels, "
                       f"but the DICOM header says {columns} x {rows}")
    if header.components != 1:
        raise _Refused(f"its {_syntax_name(dataset)} frame has {header.components} colour components; "
                       "a grayscale radiograph has 1")
    frame = frames[0]
    if not ends_complete(frame):
        raise _Refused(f"its {_syntax_name(dataset)} frame is cut short (it has no end marker): "
                       "the file is truncated or damaged")
    capacity = most_pixels(header, len(frame) - header.scan_start) if syntax in JPEG_SYNTAXES else None
    if capacity is not None and capacity < rows * columns:
        raise _Refused(f"its {_syntax_name(dataset)} frame says {columns} x {rows} pixels, far more than its "
                       f"{len(frame) - header.scan_start} bytes of image data can hold (the file is truncated "
                       "or damaged)")


def _check_rle_frame(frame: bytes, rows: int, columns: int, bits_allocated: int) -> None:
    segments = rle_segments(frame)
    expected = max(1, bits_allocated // 8)  # one segment per byte of a sample
    if len(segments) != expected:
        raise _Refused(f"its RLE frame has {len(segments)} segments; {bits_allocated}-bit grayscale needs {expected}")
    needed, limit = rows * columns, rows * columns + rows * RLE_SLACK_PER_ROW
    for segment in segments:
        decoded = rle_decoded_length(segment, limit)
        if decoded > limit:
            raise _Refused(f"an RLE segment decodes to more than the {needed} bytes a {columns} x {rows} image needs")
        if decoded < needed:
            raise _Refused(f"an RLE segment decodes to {decoded} bytes, fewer than the {needed} bytes a "
                           f"{columns} x {rows} image needs")


def _check_inflated_size(path: Path, limit: int) -> None:
    """A deflated data set (Deflated Explicit VR Little Endian) inflates to at most `limit` bytes.

    pydicom inflates it whole before anything can be checked, and deflate packs 1000:1."""
    meta = read_file_meta_info(path)
    if meta.get("TransferSyntaxUID") != uid.DeflatedExplicitVRLittleEndian:
        return
    if "FileMetaInformationGroupLength" not in meta:
        raise _Refused("deflated DICOM file without a file meta group length")
    inflater, inflated = zlib.decompressobj(-zlib.MAX_WBITS), 0
    with open(path, "rb") as handle:
        # The data set starts after preamble, 'DICM' and the file meta group (its length element is 12 bytes).
        handle.seek(128 + 4 + 12 + int(meta.FileMetaInformationGroupLength))
        while chunk := handle.read(1 << 20):
            while chunk and inflated <= limit:
                inflated += len(inflater.decompress(chunk, 1 << 22))
                chunk = inflater.unconsumed_tail
            if inflated > limit:
                raise _Refused(f"its deflated data set inflates to more than {limit >> 20} MB")


# --------------------------------------------------------------------------------------------
# Attributes, read with a plain reason when they are not what the standard says
# --------------------------------------------------------------------------------------------

def _whole_number(dataset: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    raw = _raw_value(dataset, keyword)
    if raw in (None, ""):
        if default is None:
            raise _Refused(f"it has no {keyword}")
        return default
    try:
        number = float(str(raw))
    except (TypeError, ValueError):
        raise _Refused(f"its {keyword} {_shown(raw)} is not a number") from None
    if not number.is_integer():
        raise _Refused(f"its {keyword} {_shown(raw)} is not a whole number")
    return int(number)


def _real(dataset: pydicom.Dataset, keyword: str, default: float) -> float:
    raw = _raw_value(dataset, keyword)
    if raw in (None, ""):
        return default
    try:
        number = float(str(raw))
    except (TypeError, ValueError):
        raise _Refused(f"its {keyword} {_shown(raw)} is not a number") from None
    if not math.isfinite(number):
        raise _Refused(f"its {keyword} {_shown(raw)} is not a finite number")
    return number


def _check_window(dataset: pydicom.Dataset) -> None:
    if "WindowCenter" not in dataset or "WindowWidth" not in dataset or dataset.get("VOILUTSequence"):
        return
    # pydicom windows with the first value when several are given.
    center, width = (_first(_raw_value(dataset, k)) for k in ("WindowCenter", "WindowWidth"))
    for keyword, raw in (("WindowCenter", center), ("WindowWidth", width)):
        try:
            if not math.isfinite(float(str(raw))):
                raise ValueError
        except (TypeError, ValueError):
            raise _Refused(f"its {keyword} {_shown(raw)} is not a finite number") from None
    function = str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    minimum, rule = (1, "at least 1") if function == "LINEAR" else (math.nextafter(0, 1), "above 0")
    if float(str(width)) < minimum:
        raise _Refused(f"its WindowWidth {_shown(width)} is not a valid window width ({rule})")


def _raw_value(dataset: pydicom.Dataset, keyword: str):
    """The attribute's value, or its undecoded text when pydicom cannot convert it."""
    try:
        return dataset.get(keyword)
    except Exception:  # noqa: BLE001 - an unconvertible value: look at the raw bytes instead
        element = dataset.get_item(keyword)
        value = getattr(element, "value", None)
        return value.decode("latin-1", "replace").strip() if isinstance(value, bytes) else value


def _first(value):
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return value[0] if len(value) else None
    if isinstance(value, str) and "\\" in value:
        return value.split("\\")[0]
    return value


def _shown(value) -> str:
    """A value for a message: short, whatever the file holds; quoted unless it is a plain number."""
    text = str(value).strip()
    if re.fullmatch(r"[-+]?[0-9]{1,12}(\.[0-9]{1,6})?", text):
        return text
    return repr(text if len(text) <= 24 else text[:24] + "...")


def _brief(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _syntax_name(dataset: pydicom.Dataset) -> str:
    syntax = dataset.file_meta.get("TransferSyntaxUID", "unknown")
    return str(getattr(syntax, "name", syntax))
