"""The `covidxr` command: its sub-commands, and `covidxr predict` on folders, CSV, heatmaps and
per-file errors."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, real_image
from covidxr import cli
from covidxr.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listed = capsys.readouterr().out
    for name in ("predict", "train", "calibrate", "evaluate", "audit", "segment", "ood", "bench", "serve",
                 "examples", "data"):
        assert re.search(rf"\n +{name}\b", listed), name


@pytest.mark.parametrize("name", ["predict", "serve", "train", "calibrate", "evaluate", "audit", "segment", "ood",
                                  "examples", "bench", "loadtest"])
def test_each_command_is_its_stage_under_its_own_name(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: covidxr {name} ")


def test_shared_options_have_one_name(capsys):
    """--data for the data folder, --limit for "use only N", wherever a command has them."""
    for name in ("train", "evaluate", "audit", "segment", "ood", "bench", "loadtest"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        usage = capsys.readouterr().out
        assert "--data" in usage and "--data-root" not in usage, name
        assert "--max-images" not in usage, name
    for name in ("train", "evaluate", "audit", "segment"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert "--limit" in capsys.readouterr().out, name


def test_unknown_commands_and_missing_modules_are_refused_clearly(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["diagnose"])
    assert exit_.value.code == 2 and "invalid choice: 'diagnose'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["data", "upload"])
    assert exit_.value.code == 2 and "invalid choice: 'upload' (choose from 'download')" in capsys.readouterr().err
    monkeypatch.setitem(COMMANDS, "data", ("covidxr.no_such_module", "absent"))
    with pytest.raises(SystemExit, match="covidxr data download: covidxr.no_such_module is not available"):
        main(["data", "download", "--out", "x"])
    # A stage whose own dependency is missing (the web app without the [app] extra) says which.
    monkeypatch.setattr(cli.importlib, "import_module", lambda module: __import__("gradio_is_not_installed"))
    with pytest.raises(SystemExit, match="covidxr serve needs the package 'gradio_is_not_installed'.*covidxr\\[app\\]"):
        main(["serve"])


def test_the_sub_command_gets_its_own_arguments_and_status(monkeypatch):
    seen = []

    class Stage:
        @staticmethod
        def main(argv):
            seen.append((list(argv), sys.argv[0]))
            return 3

    monkeypatch.setattr(cli, "_import", lambda name, module: Stage)
    assert main(["data", "download", "--out", "d", "--limit", "2"]) == 3
    assert seen == [(["--out", "d", "--limit", "2"], "covidxr data download")]
    assert sys.argv[0] != "covidxr data download"  # restored


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


@pytest.mark.slow  # several seconds: kept out of the fast layer
def test_the_quality_column_says_whether_the_label_held(folder, tmp_path):
    """`covidxr predict --quality`: a label_held column, from the same test as the app's button."""
    from covidxr import Predictor
    from covidxr.quality import held

    out = tmp_path / "held.csv"
    assert main(["predict", str(folder / "a.jpeg"), str(folder / "b.png"), "--quality", "--csv", str(out)]) == 0
    table = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("file")
    predictor = Predictor.load()
    for name in ("a.jpeg", "b.png"):
        tested = held(predictor, folder / name)
        expected = "yes" if tested.label_held else "no: " + ", ".join(tested.changed)
        assert table.loc[str(folder / name), "label_held"] == expected
    plain = tmp_path / "plain.csv"
    main(["predict", str(folder / "b.png"), "--csv", str(plain)])
    assert "label_held" not in pd.read_csv(plain).columns  # only when asked: three more passes a file


def test_recursive_and_heatmaps(folder, tmp_path):
    (folder / "broken.png").unlink()
    cams = tmp_path / "cams"
    status = main(["predict", str(folder), "--recursive", "--cam-dir", str(cams), "--method", "hirescam",
                   "--csv", str(tmp_path / "all.csv")])
    assert status == 0
    assert len(pd.read_csv(tmp_path / "all.csv")) == 3
    written = sorted(p.name for p in cams.iterdir())
    assert written == ["a_hirescam.png", "b_hirescam.png", "c_hirescam.png"]
    # The heatmap keeps the image's width, with a caption strip below: class, method, probability, scale.
    (width, height), (captioned_width, captioned_height) = Image.open(folder / "b.png").size, \
        Image.open(cams / "b_hirescam.png").size
    assert captioned_width == width and captioned_height > height
    table = pd.read_csv(tmp_path / "all.csv", dtype=str, keep_default_na=False)
    assert list(table.columns) == ["file", "label", "p_covid", "p_normal", "p_pneumonia", "lung_focus", "chance_focus",
                                   "notice", "warning", "error"]
    assert table["lung_focus"].astype(float).between(0, 1).all()


def test_cam_target_chooses_the_class_and_the_caption_says_it(folder, tmp_path, monkeypatch):
    from covidxr import legend

    (folder / "broken.png").unlink()
    captions = []
    real = legend.captioned
    monkeypatch.setattr("covidxr.batch.captioned", lambda image, text: captions.append(text) or real(image, text))
    assert main(["predict", str(folder / "a.jpeg"), "--cam-dir", str(tmp_path / "cams"), "--cam-target", "pneumonia",
                 "--method", "gradcam++"]) == 0
    assert len(captions) == 1 and captions[0].startswith("Grad-CAM++ evidence for pneumonia (p = 0.")
    with pytest.raises(SystemExit):
        main(["predict", str(folder / "a.jpeg"), "--cam-target", "cat"])


@pytest.mark.slow  # seconds: kept out of the fast layer (README: under a minute)
def test_refused_inputs_get_no_class_in_the_label_column(tmp_path):
    """A 1x1 PNG, a black 8000 px PNG and a colour photo: the refusal, never a class."""
    from covidxr.not_xrays import non_xray_images

    folder = tmp_path / "odd"
    folder.mkdir()
    Image.new("L", (1, 1), 128).save(folder / "dot.png")
    Image.new("L", (8000, 8000), 0).save(folder / "black.png")
    Image.fromarray(dict(non_xray_images())["skimage:coffee"]).save(folder / "photo.png")
    assert main(["predict", str(folder), "--csv", str(tmp_path / "odd.csv")]) == 0
    table = pd.read_csv(tmp_path / "odd.csv", dtype=str, keep_default_na=False).set_index("file")
    assert set(table["label"]) == {"not a frontal chest X-ray"}
    assert "too small" in table.loc[str(folder / "dot.png"), "warning"]
    assert "blank" in table.loc[str(folder / "black.png"), "warning"]
    assert "in colour" in table.loc[str(folder / "photo.png"), "warning"]
    assert (table[["lung_focus", "notice"]] == "").all().all()


def test_warning_column_flags_a_photo(folder, tmp_path):
    from covidxr.not_xrays import non_xray_images

    (folder / "broken.png").unlink()
    Image.fromarray(dict(non_xray_images())["skimage:astronaut"]).save(folder / "photo.png")
    status = main(["predict", str(folder), "--csv", str(tmp_path / "w.csv")])
    assert status == 0
    table = pd.read_csv(tmp_path / "w.csv", dtype=str, keep_default_na=False).set_index("file")
    assert "in colour" in table.loc[str(folder / "photo.png"), "warning"]
    assert table.loc[str(folder / "a.jpeg"), "warning"] == ""


@pytest.mark.slow
def test_module_entry_point_runs(folder):
    result = subprocess.run([sys.executable, "-m", "covidxr", "predict", str(folder / "a.jpeg")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    header, line = result.stdout.splitlines()
    assert header.split("\t") == ["file", "label", "p_covid", "p_normal", "p_pneumonia", "lung_focus", "chance_focus",
                                  "notice", "warning", "error"]
    assert line.startswith(str(folder / "a.jpeg"))


def test_csv_cells_are_never_run_as_formulas(tmp_path, manifest_frame, monkeypatch, capsys):
    """OWASP's rule: a cell starting with =, +, - or @ gets a leading quote, in the CSV and on stdout."""
    monkeypatch.chdir(tmp_path)
    for name in ("=1+2.png", "+1.png", "-x.png", "@SUM(A1).png"):
        shutil.copy(real_image(manifest_frame, "normal", "nih14"), tmp_path / name)
    assert main(["predict", "--csv", "out.csv", "--", "=1+2.png", "+1.png", "-x.png", "@SUM(A1).png"]) == 0
    cells = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False)["file"].tolist()
    assert cells == ["'=1+2.png", "'+1.png", "'-x.png", "'@SUM(A1).png"]
    printed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert printed == cells


@pytest.mark.slow  # seconds: kept out of the fast layer (README: under a minute)
def test_heatmaps_of_huge_images_are_written_downscaled(tmp_path):
    """A 64-megapixel input would cost gigabytes of full-size map and overlay: the overlay is
    made at most CAM_MAX_SIDE pixels a side, keeping the image's shape (the caption strip
    below it adds only height)."""
    from covidxr.batch import CAM_MAX_SIDE

    height, width = 3000, 4500
    ramp = (np.add.outer(np.arange(height), np.arange(width)) * 255 // (height + width)).astype(np.uint8)
    Image.fromarray(ramp).save(tmp_path / "big.png")
    assert main(["predict", str(tmp_path / "big.png"), "--cam-dir", str(tmp_path / "cams")]) == 0
    written_width, written_height = Image.open(tmp_path / "cams" / "big_gradcam.png").size
    assert written_width == CAM_MAX_SIDE
    assert 0 < written_height - round(height * CAM_MAX_SIDE / width) < 300


def test_checkpoint_options_take_a_bundled_models_name(tmp_path, manifest_frame, capsys):
    """`--checkpoint recipe-2020` in any command; `covidxr describe NAME` prints the description."""
    import pandas as pd

    from covidxr.cli import main

    image = real_image(manifest_frame, "normal", "nih14")
    assert main(["predict", str(image), "--checkpoint", "recipe-2020", "--csv", str(tmp_path / "out.csv")]) == 0
    row = pd.read_csv(tmp_path / "out.csv").iloc[0]
    assert row["label"] in ("covid", "normal") and "p_pneumonia" not in row
    capsys.readouterr()
    assert main(["describe", "lung-reader"]) in (0, None)
    described = json.loads(capsys.readouterr().out)
    assert described["arch"] == "efficientnet_lite0" and described["card"]["name"] == "lung-reader"
