"""The examples fetcher: from a local dataset by sha256, or downloaded and sha256-checked."""

import functools
import hashlib
import http.server
import shutil
import threading

import pandas as pd
import pytest

from conftest import DATA_DIR, REPO
from covidxr.examples import EXAMPLES_CSV, available_examples, main, read_examples


def test_listed_examples_cover_the_cases_and_exist_in_the_dataset(manifest_frame):
    examples = read_examples()
    assert 6 <= len(examples) <= 10
    for column in ("file_name", "label", "sha256", "caption", "why", "source_repo", "source_path", "license",
                   "source_url"):
        assert (examples[column] != "").all(), column
    assert set(examples["sha256"]) <= set(manifest_frame["sha256"])
    assert {"covid", "normal", "pneumonia", "sars"} <= set(examples["label"])
    assert {"adult", "pediatric"} <= set(examples["age_group"])
    assert examples["why"].str.contains("misses").any(), "a COVID case the model misses is listed"


def test_listed_calls_are_the_shipped_models(examples_dir, predictor, tmp_path):
    """`model_called` in the committed list is what the shipped model decides (rewritten by
    `covidxr examples --describe` whenever a model ships), and the case listed as missed is one."""
    csv = tmp_path / "examples.csv"
    shutil.copyfile(EXAMPLES_CSV, csv)  # described here: the packaged list stays as committed
    committed = read_examples(EXAMPLES_CSV)
    assert main(["--describe", "--csv", str(csv), "--dest", str(examples_dir)]) == 0
    described = read_examples(csv)
    assert list(described["model_called"]) == list(committed["model_called"])
    for row in described.to_dict("records"):
        label = predictor.predict(examples_dir / row["file_name"]).label
        assert row["model_called"].startswith(f"{label} (p_covid "), row["file_name"]
        if "misses" in row["why"]:
            assert row["label"] == "covid" != label, row["file_name"]


def test_copy_from_local_dataset(tmp_path):
    assert main(["--from", str(DATA_DIR), "--dest", str(tmp_path)]) == 0
    found = available_examples(tmp_path)
    assert len(found) == len(read_examples())
    assert all(path.stat().st_size > 1000 for path, _ in found)


@pytest.fixture
def file_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_keeps_only_files_whose_sha256_matches(file_server, tmp_path):
    served, url = file_server
    good = next((DATA_DIR / "images" / "normal").iterdir()).read_bytes()
    (served / "good.png").write_bytes(good)
    (served / "tampered.png").write_bytes(good + b"extra")
    rows = [{"file_name": "good.png", "sha256": hashlib.sha256(good).hexdigest(), "source_url": f"{url}/good.png"},
            {"file_name": "tampered.png", "sha256": hashlib.sha256(good).hexdigest(), "source_url": f"{url}/tampered.png"},
            {"file_name": "absent.png", "sha256": "0" * 64, "source_url": f"{url}/absent.png"}]
    csv = tmp_path / "list" / "examples.csv"
    csv.parent.mkdir()
    pd.DataFrame(rows).assign(label="normal", why="test").to_csv(csv, index=False)
    dest = tmp_path / "dest"
    assert main(["--download", "--csv", str(csv), "--dest", str(dest)]) == 1  # two of three failed
    assert (dest / "good.png").read_bytes() == good
    assert not (dest / "tampered.png").exists() and not (dest / "absent.png").exists()
    assert [path.name for path, _ in available_examples(dest)] == ["good.png"]


def test_the_images_go_to_a_folder_of_the_users_when_installed(monkeypatch, tmp_path):
    from covidxr import examples

    monkeypatch.setenv("COVIDXR_EXAMPLES", str(tmp_path / "mine"))
    assert examples.examples_dir() == tmp_path / "mine"
    monkeypatch.delenv("COVIDXR_EXAMPLES")
    assert examples.examples_dir() == REPO / "examples"  # a checkout: beside the code
    # An installed package (no pyproject.toml above it): the user's cache, not site-packages.
    monkeypatch.setattr(examples, "__file__", str(tmp_path / "site-packages" / "covidxr" / "examples.py"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert examples.examples_dir() == tmp_path / "cache" / "covidxr" / "examples"
