"""DICOM files built with pydicom from real X-rays give the prediction of the same pixels as PNG."""

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import real_image
from covidxr.data import ImageLoadError, load_grayscale

DIGITAL_XRAY = "1.2.840.10008.5.1.4.1.1.1.1"  # DX Image Storage, for presentation


def write_dicom(path, pixels: np.ndarray, bits_stored: int, photometric: str = "MONOCHROME2", **extra):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DIGITAL_XRAY
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DIGITAL_XRAY, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1 if pixels.ndim == 2 else pixels.shape[2]
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16 if bits_stored > 8 else 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    for key, value in extra.items():
        setattr(ds, key, value)
    dtype = np.uint16 if ds.BitsAllocated == 16 else np.uint8
    ds.PixelData = pixels.astype(dtype).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def xray(manifest_frame):
    path = real_image(manifest_frame, "covid", "ieee8023", 5)
    return path, np.asarray(Image.open(path).convert("L"), dtype=np.uint16)


@pytest.mark.parametrize("variant", ["mono2-12bit", "mono2-16bit", "mono1-12bit", "rescaled", "windowed"])
def test_dicom_matches_the_same_pixels_as_png(tmp_path, xray, predictor, variant):
    png, gray8 = xray
    if variant == "mono2-12bit":
        path = write_dicom(tmp_path / "a.dcm", gray8 * 16, 12)
    elif variant == "mono2-16bit":
        path = write_dicom(tmp_path / "a.dcm", gray8 * 257, 16)
    elif variant == "mono1-12bit":  # high values dark: stored inverted
        path = write_dicom(tmp_path / "a.dcm", 4095 - gray8 * 16, 12, "MONOCHROME1")
    elif variant == "rescaled":  # stored values map to HU-like units through slope/intercept
        path = write_dicom(tmp_path / "a.dcm", gray8 * 8, 12, RescaleSlope=2, RescaleIntercept=-1024)
    else:  # a window spanning the stored range
        path = write_dicom(tmp_path / "a.img", gray8 * 16, 12, WindowCenter=2040, WindowWidth=4100)
    np.testing.assert_allclose(load_grayscale(path), load_grayscale(png), atol=2e-3)
    from_dicom = predictor.predict(path)
    from_png = predictor.predict(png)
    assert from_dicom.label == from_png.label
    for name in predictor.classes:
        assert from_dicom.probabilities[name] == pytest.approx(from_png.probabilities[name], abs=0.01)


def test_narrow_window_is_applied(tmp_path, xray):
    _, gray8 = xray
    path = write_dicom(tmp_path / "w.dcm", gray8 * 16, 12, WindowCenter=2048, WindowWidth=512)
    windowed = load_grayscale(path)
    # Everything outside the window saturates: far more pure black and white than the original.
    saturated = np.mean((windowed == 0) | (windowed == 1))
    assert saturated > 0.3


def test_unsupported_dicom_is_refused_clearly(tmp_path, xray):
    _, gray8 = xray
    rgb = np.stack([gray8] * 3, axis=-1)
    with pytest.raises(ImageLoadError, match="colour"):
        load_grayscale(write_dicom(tmp_path / "rgb.dcm", rgb, 8, "RGB"))
    frames = np.concatenate([gray8, gray8])
    with pytest.raises(ImageLoadError, match="multi-frame"):
        load_grayscale(write_dicom(tmp_path / "multi.dcm", frames, 8, NumberOfFrames=2,
                                   Rows=gray8.shape[0]))
    report = write_dicom(tmp_path / "report.dcm", gray8[:2, :2], 8)
    from pydicom import dcmread
    dataset = dcmread(report)
    del dataset.PixelData
    dataset.save_as(report, enforce_file_format=True)
    with pytest.raises(ImageLoadError, match="without pixel data"):
        load_grayscale(report)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(write_dicom(tmp_path / "full.dcm", gray8, 8).read_bytes()[:4000])
    with pytest.raises(ImageLoadError, match="DICOM"):
        load_grayscale(truncated)


def test_app_handler_accepts_dicom(tmp_path, xray, predictor):
    from covidxr.app import analysis
    from covidxr.app.state import XrayApp

    png, gray8 = xray
    path = write_dicom(tmp_path / "upload.dcm", 4095 - gray8 * 16, 12, "MONOCHROME1")
    probabilities, original, overlay, summary = analysis.predict_api(XrayApp(predictor, tmp_path), str(path))
    assert original.size == overlay.size == Image.open(png).size
    assert summary.startswith(f"### Prediction: {predictor.predict(png).label}")


@pytest.mark.parametrize("syntax", ["JPEG2000Lossless", "RLELossless", "JPEGBaseline8Bit"])
def test_compressed_dicom_decodes_to_the_same_pixels(tmp_path, xray, predictor, syntax):
    """Compressed transfer syntaxes, decoded by pylibjpeg (JPEG, JPEG 2000) and pydicom (RLE)."""
    import io

    import pydicom
    from pydicom import uid
    from pydicom.encaps import encapsulate

    png, gray8 = xray
    path = write_dicom(tmp_path / "plain.dcm", gray8 * 16, 12)
    dataset = pydicom.dcmread(path)
    reference = png
    if syntax == "JPEGBaseline8Bit":  # lossy: compare with the same JPEG bytes read by PIL
        buffer = io.BytesIO()
        Image.fromarray(gray8.astype(np.uint8)).save(buffer, "JPEG", quality=90)
        reference = tmp_path / "same.jpg"
        reference.write_bytes(buffer.getvalue())
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
        dataset.PixelData = encapsulate([buffer.getvalue()])
        dataset.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
        dataset["PixelData"].VR = "OB"
    else:
        dataset.compress(getattr(uid, syntax))
    dataset.save_as(tmp_path / "compressed.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "compressed.dcm").file_meta.TransferSyntaxUID == getattr(uid, syntax)
    np.testing.assert_allclose(load_grayscale(tmp_path / "compressed.dcm"), load_grayscale(reference), atol=3 / 255)
    from_dicom, from_reference = predictor.predict(tmp_path / "compressed.dcm"), predictor.predict(reference)
    assert from_dicom.label == from_reference.label
    assert from_dicom.probabilities["covid"] == pytest.approx(from_reference.probabilities["covid"], abs=0.02)


def test_undecodable_compressed_dicom_is_refused_clearly(tmp_path, xray):
    import struct

    import pydicom
    from pydicom import uid
    from pydicom.encaps import encapsulate

    _, gray8 = xray
    path = write_dicom(tmp_path / "plain.dcm", gray8, 8)
    dataset = pydicom.dcmread(path)
    rows, columns = gray8.shape
    # A size segment (SIZ) that matches the header, so the frame passes the checks and reaches
    # the decoder, and garbage where the coded data belong.
    siz = struct.pack(">HHIIIIIIIIHBBB", 41, 0, columns, rows, 0, 0, columns, rows, 0, 0, 1, 7, 1, 1)
    dataset.PixelData = encapsulate([b"\xff\x4f\xff\x51" + siz + b"garbage" * 100 + b"\xff\xd9"])
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = uid.JPEG2000Lossless
    dataset.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageLoadError, match="cannot decode DICOM pixel data .*JPEG 2000"):
        load_grayscale(path)


def jpeg_dicom(path, jpeg: bytes, rows: int, columns: int, syntax=None):
    """A DICOM holding `jpeg` as its one (encapsulated) frame, whatever state the frame is in."""
    import pydicom
    from pydicom import uid
    from pydicom.encaps import encapsulate

    dataset = pydicom.dcmread(write_dicom(path, np.zeros((8, 8)), 8))
    dataset.Rows, dataset.Columns = rows, columns
    dataset.PixelData = encapsulate([jpeg])
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = syntax or uid.JPEGBaseline8Bit
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def xray_jpeg(xray) -> bytes:
    """The real X-ray at 640 x 640 as a JPEG (quality 90), as a scanner might encapsulate it."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(xray[1].astype(np.uint8)).resize((640, 640)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("kept", [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
def test_dicom_with_a_cut_jpeg_frame_is_refused(tmp_path, xray_jpeg, kept):
    """The decoder pads a cut frame with gray and reports success; a plain JPEG cut so is refused."""
    whole = jpeg_dicom(tmp_path / "whole.dcm", xray_jpeg, 640, 640)
    assert load_grayscale(whole).shape == (640, 640)  # the uncut frame is read
    cut = xray_jpeg[:int(len(xray_jpeg) * kept)]
    with pytest.raises(ImageLoadError, match="frame is cut short"):
        load_grayscale(jpeg_dicom(tmp_path / "cut.dcm", cut, 640, 640))


def test_dicom_with_a_cut_jpeg2000_frame_is_refused(tmp_path, xray):
    import pydicom
    from pydicom import uid

    dataset = pydicom.dcmread(write_dicom(tmp_path / "plain.dcm", xray[1][:256, :256], 8))
    dataset.compress(uid.JPEG2000Lossless)
    codestream = next(iter(__import__("pydicom").encaps.generate_frames(dataset.PixelData, number_of_frames=1)))
    assert load_grayscale(jpeg_dicom(tmp_path / "whole.dcm", codestream, 256, 256, uid.JPEG2000Lossless)).shape \
        == (256, 256)
    cut = codestream[:int(len(codestream) * 0.8)]
    with pytest.raises(ImageLoadError, match="frame is cut short"):
        load_grayscale(jpeg_dicom(tmp_path / "cut.dcm", cut, 256, 256, uid.JPEG2000Lossless))


def test_dicom_jpeg_frame_claiming_more_pixels_than_its_data_hold_is_refused(tmp_path, xray_jpeg):
    """A 640-px frame whose header (and the DICOM's) says 8000 x 8000: libjpeg would pad it to 64
    megapixels. Refused from the headers, before decoding."""
    start = xray_jpeg.find(b"\xff\xc0")
    claimed = bytearray(xray_jpeg)
    claimed[start + 5:start + 9] = (8000).to_bytes(2, "big") * 2  # height, width
    with pytest.raises(ImageLoadError, match="8000 x 8000 pixels, far more than its .* bytes of image data"):
        load_grayscale(jpeg_dicom(tmp_path / "claims.dcm", bytes(claimed), 8000, 8000))
