"""`python -m covidxr predict`: folders, CSV, heatmaps, and per-file errors."""

import shutil
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, real_image
from covidxr.__main__ import main


@pytest.fixture
def folder(tmp_path, manifest_frame):
    root = tmp_path / "in"
    (root / "nested").mkdir(parents=True)
    shutil.copy(real_image(manifest_frame, "covid", "ieee8023"), root / "a.jpeg")
    shutil.copy(real_image(manifest_frame, "normal", "nih14"), root / "b.png")
    shutil.copy(real_image(manifest_frame, "pneumonia", "kermany"), root / "nested" / "c.jpeg")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "notes.txt").write_text("ignored: not an image suffix")
    return root


def test_folder_to_csv_with_errors_reported(folder, tmp_path, capsys):
    out = tmp_path / "out.csv"
    status = main(["predict", str(folder), "--csv", str(out)])
    assert status == 1  # broken.png failed
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sorted(pd.Series(table["file"]).map(lambda f: f.rsplit("/", 1)[1])) == ["a.jpeg", "b.png", "broken.png"]
    good = table[table["error"] == ""]
    probabilities = good[["p_covid", "p_normal", "p_pneumonia"]].astype(float)
    assert ((probabilities.sum(axis=1) - 1).abs() < 1e-3).all()
    assert set(good["label"]) <= {"covid", "normal", "pneumonia"}
    assert "broken.png" in table.loc[table["error"] != "", "error"].iloc[0]
    assert "2 predicted, 1 failed" in capsys.readouterr().err


def test_recursive_and_heatmaps(folder, tmp_path):
    (folder / "broken.png").unlink()
    cams = tmp_path / "cams"
    status = main(["predict", str(folder), "--recursive", "--cam-dir", str(cams), "--method", "hirescam",
                   "--csv", str(tmp_path / "all.csv")])
    assert status == 0
    assert len(pd.read_csv(tmp_path / "all.csv")) == 3
    written = sorted(p.name for p in cams.iterdir())
    assert written == ["a_hirescam.png", "b_hirescam.png", "c_hirescam.png"]
    assert Image.open(cams / "b_hirescam.png").size == Image.open(folder / "b.png").size


def test_warning_column_flags_a_photo(folder, tmp_path):
    from covidxr.ood import non_xray_images

    (folder / "broken.png").unlink()
    Image.fromarray(dict(non_xray_images())["skimage:astronaut"]).save(folder / "photo.png")
    status = main(["predict", str(folder), "--csv", str(tmp_path / "w.csv")])
    assert status == 0
    table = pd.read_csv(tmp_path / "w.csv", dtype=str, keep_default_na=False).set_index("file")
    assert "in colour" in table.loc[str(folder / "photo.png"), "warning"]
    assert table.loc[str(folder / "a.jpeg"), "warning"] == ""


def test_module_entry_point_runs(folder):
    result = subprocess.run([sys.executable, "-m", "covidxr", "predict", str(folder / "a.jpeg")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    header, line = result.stdout.splitlines()
    assert header.split("\t") == ["file", "label", "p_covid", "p_normal", "p_pneumonia", "warning", "error"]
    assert line.startswith(str(folder / "a.jpeg"))
