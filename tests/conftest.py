"""Shared fixtures and the test layers.

Layers (markers registered in pyproject.toml): `slow` (training runs, the benchmark, whole-data
checks), `app` (launches the web app in its own process) and `browser` (drives Chromium); `app`
and `browser` imply `slow`. The fast layer: `python -m pytest -m "not slow"`. Everything:
`python -m pytest`, as CI runs it.
"""

import logging
from pathlib import Path

import pandas as pd
import pytest

from covidxr.data import data_dir

REPO = Path(__file__).resolve().parents[1]
# The data folder as every command finds it ($COVIDXR_DATA, else ../shared/data/cxr).
DATA_DIR = data_dir()
MANIFEST = DATA_DIR / "manifest.csv"


def pytest_collection_modifyitems(items):
    for item in items:
        if "served_app" in getattr(item, "fixturenames", ()):  # the launched app: an app test
            item.add_marker(pytest.mark.app)
        if item.get_closest_marker("app") or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    """Tests write into temporary folders only: no image cache or run folder in the checkout."""
    def written():
        return {path for folder in (".cache", "runs") for path in (REPO / folder).glob("**/*")}

    before = written()
    yield
    left = sorted(str(path.relative_to(REPO)) for path in written() - before)
    assert not left, f"tests left files in the checkout: {left[:5]}"


@pytest.fixture(scope="session")
def manifest_frame() -> pd.DataFrame:
    assert MANIFEST.exists(), f"real data expected at {MANIFEST}"
    return pd.read_csv(MANIFEST, dtype=str, keep_default_na=False)


@pytest.fixture(scope="session")
def predictor():
    """The shipped model, loaded once for every test file that only reads from it."""
    from covidxr import Predictor

    return Predictor.load()


@pytest.fixture(scope="session")
def small_manifest(tmp_path_factory, manifest_frame) -> Path:
    """A manifest of real images: a few patients of every label and source, absolute paths."""
    rows = (manifest_frame[manifest_frame["label"] != "other"].sort_values("patient_id")
            .groupby(["label", "source_dataset"]).head(4))
    rows = rows.assign(filename=[str(DATA_DIR / f) for f in rows["filename"]])
    path = tmp_path_factory.mktemp("manifest") / "small.csv"
    rows.to_csv(path, index=False)
    return path


def real_image(manifest_frame, label: str, source: str, position: int = 0) -> Path:
    row = manifest_frame[(manifest_frame["label"] == label) & (manifest_frame["source_dataset"] == source)]
    return DATA_DIR / row.iloc[position]["filename"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A real training run, as small as it gets: few patients, small images, one epoch."""
    from covidxr.training import main

    out = tmp_path_factory.mktemp("tiny_run")
    # What the run says as it goes, kept beside it (run.log) for the tests that read it.
    said = logging.FileHandler(out / "run.log")
    logger = logging.getLogger("covidxr")
    level = logger.level
    logger.addHandler(said)
    logger.setLevel(logging.INFO)
    try:
        main(["--manifest", str(MANIFEST), "--limit", "6", "--epochs", "1", "--input-size", "64",
              "--batch-size", "8", "--out", str(out), "--cache-dir", str(out / "cache")])
    finally:
        logger.removeHandler(said)
        logger.setLevel(level)
        said.close()
    return out


@pytest.fixture(scope="session")
def examples_dir(tmp_path_factory):
    from covidxr.examples import main as fetch_examples

    folder = tmp_path_factory.mktemp("examples")
    assert fetch_examples(["--from", str(DATA_DIR), "--dest", str(folder)]) == 0
    return folder


@pytest.fixture(scope="session")
def served_app(examples_dir, tmp_path_factory):
    """`python app.py --port P` in its own process, as a user starts it."""
    from benchmarks.common import AppProcess

    log = tmp_path_factory.mktemp("app_log") / "app.log"
    try:
        app = AppProcess(examples_dir, log=log)
    except RuntimeError as error:
        pytest.fail(f"{error}:\n{log.read_text()}")
    with app:
        yield app.url
