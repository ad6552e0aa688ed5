"""The one image path every stage shares: odd files in, one normalised tensor out."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA_DIR, MANIFEST, real_image
from covidxr.data import (ImageLoadError, load_grayscale, parse_filters, parse_label_map, prepare,
                          read_manifest, select)


def gradient(height=60, width=40, maximum=255, dtype=np.uint8):
    """Top-to-bottom ramp: dark at the top, bright at the bottom."""
    column = np.linspace(0, maximum, height).astype(dtype)
    return np.repeat(column[:, None], width, axis=1)


def save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_16_bit_png_uses_full_depth(tmp_path):
    values = gradient(maximum=4095, dtype=np.uint16)  # 12-bit data in a 16-bit PNG
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    gray = load_grayscale(path)
    assert gray.dtype == np.float32 and gray.shape == (60, 40)
    assert gray.min() == 0.0 and gray.max() == 1.0
    # 60 distinct rows survive: nothing was truncated to 8 bits before scaling.
    assert len(np.unique(gray)) == 60
    np.testing.assert_allclose(gray[:, 0], values[:, 0] / 4095, atol=1e-6)


def test_rgba_transparency_becomes_black(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[:10, :, 3] = 0  # top half transparent
    rgba[15:, :, :3] = 100
    gray = load_grayscale(save(Image.fromarray(rgba, "RGBA"), tmp_path / "alpha.png"))
    assert gray[:10].max() == 0.0
    assert gray[10:15].min() == 1.0
    assert 0.4 < gray[15:].mean() < 0.6


def test_palette_image(tmp_path):
    palette_image = Image.fromarray(gradient()).convert("P")
    gray = load_grayscale(save(palette_image, tmp_path / "palette.png"))
    assert gray.shape == (60, 40)
    assert gray[0].mean() < gray[-1].mean()


def test_exif_rotation_is_applied(tmp_path):
    image = Image.fromarray(gradient(height=60, width=40))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = save(image, tmp_path / "rotated.jpg", exif=exif, quality=95)
    gray = load_grayscale(path)
    assert gray.shape == (40, 60)
    # The ramp ran top to bottom; shown rotated clockwise, it runs right to left.
    assert gray[:, 0].mean() > gray[:, -1].mean() + 0.5


def test_tiny_and_huge_images(tmp_path):
    tiny = save(Image.new("L", (1, 1), 128), tmp_path / "tiny.png")
    assert load_grayscale(tiny).shape == (1, 1)
    assert prepare(tiny, 32).shape == (1, 32, 32)
    huge = Image.fromarray(np.tile(gradient(height=5000, width=1), (1, 4000)))
    tensor = prepare(save(huge, tmp_path / "huge.png"), 64)
    assert tensor.shape == (1, 64, 64) and tensor.dtype == torch.uint8
    assert tensor[0, 0].float().mean() < tensor[0, -1].float().mean()


def test_numpy_and_pil_inputs_agree(tmp_path):
    rgb = np.stack([gradient()] * 3, axis=-1)
    from_array = prepare(rgb, 32)
    from_pil = prepare(Image.fromarray(rgb), 32)
    from_float = prepare(gradient().astype(np.float64) / 255, 32)
    assert torch.equal(from_array, from_pil)
    assert torch.equal(from_array, from_float)


def test_prepare_real_images_with_and_without_equalisation(manifest_frame):
    for label, source in (("covid", "ieee8023"), ("normal", "kermany"), ("normal", "nih14")):
        path = real_image(manifest_frame, label, source)
        stretched = prepare(path, 128)
        assert stretched.shape == (1, 128, 128) and stretched.dtype == torch.uint8
        assert stretched.min() < 10 and stretched.max() > 240  # min-max stretch uses the full range
        equalised = prepare(path, 128, equalize=True)
        # Equalisation spreads every source evenly over the range: a mid-grey mean.
        assert equalised.min() < 10 and equalised.max() > 245
        assert 110 < equalised.float().mean() < 145


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"this is not an image at all", "not an image"),
])
def test_bad_files_get_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=message):
        load_grayscale(path)


def test_truncated_real_file_is_refused(tmp_path, manifest_frame):
    original = real_image(manifest_frame, "normal", "kermany").read_bytes()
    path = tmp_path / "truncated.jpeg"
    path.write_bytes(original[: len(original) // 3])
    with pytest.raises(ImageLoadError, match="damaged or truncated"):
        load_grayscale(path)


def test_wrong_inputs_are_refused(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file"):
        load_grayscale(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError):
        load_grayscale(12)
    with pytest.raises(ImageLoadError, match="2-D"):
        load_grayscale(np.zeros((4, 4, 4, 4)))
    with pytest.raises(ImageLoadError, match="dtype"):
        load_grayscale(np.array([["a", "b"]]))


def test_manifest_filters_reproduce_2020_setting():
    frame = read_manifest(MANIFEST)
    classes = ["covid", "normal"]
    chosen = select(frame, parse_filters(["view=PA", "source_dataset=ieee8023,kermany"]),
                    parse_label_map([], classes))
    trainable = chosen[chosen["target"] != ""]
    assert set(trainable["target"]) == {"covid", "normal"}
    assert set(trainable.loc[trainable["target"] == "normal", "source_dataset"]) == {"kermany"}
    assert set(trainable.loc[trainable["target"] == "covid", "source_dataset"]) == {"ieee8023"}
    assert (chosen["view"] == "PA").all()
    # Labels with no class stay in as evaluation-only rows: that is how SARS gets tested.
    assert set(chosen.loc[chosen["target"] == "", "label"]) >= {"sars", "pneumonia"}
    assert all(DATA_DIR.resolve() in Path(p).parents for p in chosen["path"][:5])


def test_label_map_and_bad_options():
    assert parse_label_map(["sars=covid"], ["covid", "normal"])["sars"] == "covid"
    with pytest.raises(ValueError, match="SOURCE_LABEL=CLASS"):
        parse_label_map(["sars=flu"], ["covid", "normal"])
    with pytest.raises(ValueError, match="COLUMN=VALUE"):
        parse_filters(["view"])
    with pytest.raises(ValueError, match="not in the manifest"):
        select(read_manifest(MANIFEST), parse_filters(["colour=red"]), {})


def test_folder_tree_manifest(tmp_path):
    for label in ("covid", "normal"):
        (tmp_path / label).mkdir()
        for k in range(2):
            save(Image.fromarray(gradient() + k), tmp_path / label / f"{k}.png")
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="no patient ids"):
        frame = read_manifest(tmp_path)
    assert sorted(frame["label"]) == ["covid", "covid", "normal", "normal"]
    assert frame["patient_id"].is_unique and frame["sha256"].str.len().eq(64).all()


def test_bytes_buffer_via_pil():
    buffer = io.BytesIO()
    Image.fromarray(gradient()).save(buffer, format="PNG")
    buffer.seek(0)
    assert load_grayscale(Image.open(buffer)).shape == (60, 40)


def test_image_cache_follows_the_files_content(tmp_path):
    """An image edited in place is decoded again, not served stale from the cache."""
    from covidxr.framing import frame_all

    paths = [save(Image.fromarray(gradient()), tmp_path / "a.png"), save(Image.fromarray(gradient()[::-1]), tmp_path / "b.png")]
    cache = tmp_path / "cache"
    first, _ = frame_all([str(p) for p in paths], None, 16, cache_dir=cache)
    assert len(list(cache.glob("framed-*.npz"))) == 1
    assert torch.equal(frame_all([str(p) for p in paths], None, 16, cache_dir=cache)[0], first)  # a hit
    save(Image.fromarray(gradient()[:, ::-1].T.copy()), paths[0])  # same name, other pixels
    edited, _ = frame_all([str(p) for p in paths], None, 16, cache_dir=cache)
    assert torch.equal(edited[0], prepare(paths[0], 16)) and not torch.equal(edited[0], first[0])
    assert torch.equal(edited[1], first[1])
    assert len(list(cache.glob("framed-*.npz"))) == 2


def test_one_definition_of_the_data_folder(tmp_path, monkeypatch):
    from covidxr import data

    monkeypatch.delenv("COVIDXR_DATA", raising=False)
    # In a checkout: ../shared/data/cxr beside it, wherever the command runs from.
    monkeypatch.chdir(tmp_path)
    assert data.data_dir() == Path(data.__file__).resolve().parents[2] / "shared" / "data" / "cxr"
    # Installed (no checkout around the package): ../shared/data/cxr from the working folder.
    installed = tmp_path / "venv" / "site-packages" / "covidxr" / "data.py"
    installed.parent.mkdir(parents=True)
    monkeypatch.setattr(data, "__file__", str(installed))
    (tmp_path / "clone").mkdir()
    monkeypatch.chdir(tmp_path / "clone")
    assert data.data_dir() == tmp_path / "shared" / "data" / "cxr"
    monkeypatch.setenv("COVIDXR_DATA", str(tmp_path / "env"))
    assert data.data_dir() == tmp_path / "env"
    assert data.data_dir(tmp_path / "given") == tmp_path / "given"  # --data wins over the variable
