"""`covidxr data download`: against a loopback HTTP server only (no internet), with generated
originals and their sha256s, and the reduction checked against the shared folder's own files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import DATA_DIR, MANIFEST, REPO
from covidxr import download
from covidxr.download import (MAX_SIDE, is_complete, main, mirrored, read_rows, reduce_image, reduce_mask,
                              reduced_size, write_manifest)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------------------------
# A loopback mirror and originals generated for it
# --------------------------------------------------------------------------------------------

class MirrorHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; records every request and how many ran at once; can be told to delay,
    stall, time out or fail a path."""

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        state = self.server.state
        with state["lock"]:
            state["requests"].append(self.path)
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
        try:
            if self.path in state["fail_once"]:
                state["fail_once"].discard(self.path)
                self.send_error(503, "Busy")
                return
            if self.path in state["hang"]:
                time.sleep(state["hang"][self.path])
            if self.path in state["stall"]:  # headers and half the body, then nothing
                body = (Path(self.directory) / self.path.lstrip("/").replace("%20", " ")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                state["stall"][self.path].wait(30)
                return
            time.sleep(state["delay"])
            super().do_GET()
        finally:
            with state["lock"]:
                state["active"] -= 1


@pytest.fixture
def mirror(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(MirrorHandler, directory=str(served)))
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # a client that timed out and hung up
    server.state = {"lock": threading.Lock(), "requests": [], "active": 0, "peak": 0, "delay": 0.0,
                    "fail_once": set(), "hang": {}, "stall": {}}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/", server.state
    for event in server.state["stall"].values():
        event.set()
    server.shutdown()
    server.server_close()


def generated_original(size: tuple[int, int], mode: str, image_format: str, seed: int) -> bytes:
    """A small X-ray-like picture: a smooth gradient with noise, in the mode and format asked."""
    rng = np.random.default_rng(seed)
    width, height = size
    gradient = np.add.outer(np.linspace(0, 160, height), np.linspace(0, 60, width))
    gray = np.clip(gradient + rng.normal(0, 12, (height, width)), 0, 255).astype(np.uint8)
    image = Image.fromarray(gray).convert(mode)
    out = io.BytesIO()
    image.save(out, image_format, **({"quality": 95} if image_format == "JPEG" else {}))
    return out.getvalue()


# (label, file name, size, mode, format) of the generated originals: larger and smaller than
# 640 px, JPEG and PNG, gray, RGB and RGBA, a name with a space (URL-encoded as %20).
ORIGINALS = [
    ("covid", "a case.jpeg", (800, 700), "L", "JPEG"),
    ("covid", "b.png", (300, 420), "RGBA", "PNG"),
    ("normal", "c.jpg", (500, 660), "RGB", "JPEG"),
    ("normal", "d.png", (700, 700), "L", "PNG"),
    ("pneumonia", "e.jpeg", (200, 150), "L", "JPEG"),
    ("pneumonia", "f.png", (650, 300), "RGB", "PNG"),
]


def build_manifest(tmp_path: Path, served: Path, originals=ORIGINALS) -> Path:
    """Serve each original as raw.githubusercontent.com would (owner/repo/commit/path) and list
    it in a manifest with the repository's columns."""
    columns = pd.read_csv(MANIFEST, nrows=0).columns
    rows = []
    for index, (label, name, size, mode, image_format) in enumerate(originals):
        content = generated_original(size, mode, image_format, seed=index)
        place = served / "owner" / "repo" / COMMIT / "images" / name
        place.parent.mkdir(parents=True, exist_ok=True)
        place.write_bytes(content)
        row = {column: "" for column in columns}
        row.update(filename=f"images/{label}/{name}", label=label, patient_id=f"test:{index // 2}",
                   source_dataset="test", license="CC BY 4.0", sha256=hashlib.sha256(content).hexdigest(),
                   source_url=f"https://raw.githubusercontent.com/owner/repo/{COMMIT}/images/{name.replace(' ', '%20')}")
        rows.append(row)
    manifest = tmp_path / "test_manifest.csv"
    pd.DataFrame(rows, columns=columns).to_csv(manifest, index=False)
    return manifest


def served_path(name: str) -> str:
    return f"/owner/repo/{COMMIT}/images/{name.replace(' ', '%20')}"


def run(manifest: Path, out: Path, url: str, *extra: str) -> int:
    return main(["--manifest", str(manifest), "--out", str(out), "--mirror", url, "--backoff", "0", *extra])


def leftovers(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.name.endswith(download.PART_SUFFIX)]


# --------------------------------------------------------------------------------------------
# The repository's manifest
# --------------------------------------------------------------------------------------------

def test_repository_manifest_has_the_shared_manifests_rows():
    ours = pd.read_csv(REPO / "covidxr" / "lists" / "manifest.csv", dtype=str, keep_default_na=False)
    shared = pd.read_csv(MANIFEST, dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(ours, shared)
    assert download.PACKAGED_MANIFEST == REPO / "covidxr" / "lists" / "manifest.csv"
    # Every row can be fetched and checked: a URL pinned to a commit and a sha256.
    assert ours["source_url"].str.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[0-9a-f]{40}/.+").all()
    assert ours["sha256"].str.fullmatch(r"[0-9a-f]{64}").all() and ours["filename"].is_unique


def test_written_manifest_of_every_row_is_the_shared_manifest_byte_for_byte(tmp_path):
    columns, rows = read_rows(MANIFEST)
    outcomes = [download.Outcome(row, "downloaded", mask="written" if row["lung_mask"] else "") for row in rows]
    assert write_manifest(tmp_path / "manifest.csv", columns, outcomes) == len(rows)
    assert (tmp_path / "manifest.csv").read_bytes() == MANIFEST.read_bytes()


# --------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------

def test_download_writes_the_shared_layout_and_a_second_run_skips_it(mirror, tmp_path, capsys):
    from covidxr.data import read_manifest

    served, url, state = mirror
    manifest = build_manifest(tmp_path, served)
    out = tmp_path / "out"
    assert run(manifest, out, url, "--workers", "3") == 0
    assert "images: 6 downloaded, 0 already present, 0 failed (of 6)" in capsys.readouterr().out

    frame = read_manifest(out / "manifest.csv")
    assert len(frame) == 6 and all(Path(path).is_file() for path in frame["path"])
    assert list(frame["filename"]) == list(pd.read_csv(manifest)["filename"])
    for (label, name, size, mode, image_format), path in zip(ORIGINALS, frame["path"]):
        with Image.open(path) as image:
            assert (image.format, image.mode) == (image_format, mode), name
            assert image.size == reduced_size(*size) and max(image.size) <= MAX_SIDE, name
    assert Image.open(out / "images/covid/a case.jpeg").size == (640, 560)
    assert not leftovers(out)

    requests_before = len(state["requests"])
    assert run(manifest, out, url) == 0
    assert "images: 0 downloaded, 6 already present, 0 failed (of 6)" in capsys.readouterr().out
    assert len(state["requests"]) == requests_before, "nothing present is fetched again"


def test_real_xrays_through_a_mirror_come_out_readable_in_the_shared_layout(mirror, tmp_path, manifest_frame,
                                                                           monkeypatch, capsys):
    """Shared X-rays standing in for their originals (the originals are not here): served at
    their URLs' paths, their manifest rows carrying the served files' sha256."""
    from covidxr.data import load_grayscale, read_manifest

    served, url, _ = mirror
    monkeypatch.setattr(download, "installed_masks", lambda: None)
    rows = pd.concat([manifest_frame[manifest_frame["source_dataset"] == source].head(2)
                      for source in ("ieee8023", "kermany", "nih14", "actualmed")])
    for row in rows.itertuples():
        place = served / mirrored(row.source_url, "http://x/").removeprefix("http://x/").replace("%20", " ")
        place.parent.mkdir(parents=True, exist_ok=True)
        place.write_bytes((DATA_DIR / row.filename).read_bytes())
    rows = rows.assign(sha256=[hashlib.sha256((DATA_DIR / f).read_bytes()).hexdigest() for f in rows["filename"]])
    manifest = tmp_path / "real.csv"
    rows.to_csv(manifest, index=False)
    out = tmp_path / "out"
    assert run(manifest, out, url) == 0
    assert f"images: {len(rows)} downloaded" in capsys.readouterr().out

    frame = read_manifest(out / "manifest.csv")
    assert list(frame["filename"]) == list(rows["filename"])
    for row, path in zip(rows.itertuples(), frame["path"]):
        shared, ours = Image.open(DATA_DIR / row.filename), Image.open(path)
        assert (ours.format, ours.mode, ours.size) == (shared.format, shared.mode, shared.size)
        if ours.format == "PNG":  # lossless: the same bytes come back
            assert Path(path).read_bytes() == (DATA_DIR / row.filename).read_bytes()
        assert load_grayscale(path).shape == (shared.height, shared.width)


def test_tampered_file_is_refused_and_never_written(mirror, tmp_path, capsys):
    served, url, _ = mirror
    manifest = build_manifest(tmp_path, served)
    tampered = served / "owner" / "repo" / COMMIT / "images" / "c.jpg"
    content = bytearray(tampered.read_bytes())
    content[len(content) // 2] ^= 0xFF  # one flipped byte: still a JPEG, not the original
    tampered.write_bytes(bytes(content))
    out = tmp_path / "out"
    assert run(manifest, out, url) == 1
    report = capsys.readouterr().out
    assert "images: 5 downloaded, 0 already present, 1 failed (of 6)" in report
    assert "images/normal/c.jpg: sha256 mismatch" in report and "refused, nothing written" in report
    assert not (out / "images/normal/c.jpg").exists() and not leftovers(out)
    assert "images/normal/c.jpg" not in set(pd.read_csv(out / "manifest.csv")["filename"])


def test_404_and_timeout_are_reported_per_file(mirror, tmp_path, capsys):
    served, url, state = mirror
    manifest = build_manifest(tmp_path, served)
    (served / "owner" / "repo" / COMMIT / "images" / "b.png").unlink()
    state["hang"][served_path("e.jpeg")] = 1.5
    out = tmp_path / "out"
    assert run(manifest, out, url, "--timeout", "0.3", "--retries", "1") == 1
    report = capsys.readouterr().out
    assert "images: 4 downloaded, 0 already present, 2 failed (of 6)" in report
    assert "images/covid/b.png: HTTP 404 File not found  [http://127.0.0.1:" in report
    assert "images/pneumonia/e.jpeg: timed out after 0.3 s (2 tries)" in report
    assert state["requests"].count(served_path("e.jpeg")) == 2
    assert state["requests"].count(served_path("b.png")) == 1
    assert len(pd.read_csv(out / "manifest.csv")) == 4


def test_a_transient_server_error_is_tried_again(mirror, tmp_path, capsys):
    served, url, state = mirror
    manifest = build_manifest(tmp_path, served)
    state["fail_once"].add(served_path("d.png"))
    assert run(manifest, tmp_path / "out", url, "--retries", "1") == 0
    assert state["requests"].count(served_path("d.png")) == 2
    assert run(manifest, tmp_path / "out2", url, "--retries", "0") == 0  # served fine the second time
    state["fail_once"].add(served_path("d.png"))
    assert run(manifest, tmp_path / "out3", url, "--retries", "0") == 1
    assert "images/normal/d.png: HTTP 503 Busy (1 try)" in capsys.readouterr().out


def test_an_interrupted_run_is_resumed(mirror, tmp_path, capsys):
    served, url, state = mirror
    manifest = build_manifest(tmp_path, served)
    out = tmp_path / "out"
    stalled = served_path("c.jpg")
    state["stall"][stalled] = threading.Event()
    # The real command in its own process, killed while the third file is half received.
    command = (f"import runpy, sys; sys.argv = ['download', '--manifest', {str(manifest)!r}, '--out', {str(out)!r}, "
               f"'--mirror', {url!r}, '--workers', '1']; "
               f"runpy.run_path({str(REPO / 'covidxr' / 'download.py')!r}, run_name='__main__')")
    process = subprocess.Popen([sys.executable, "-c", command], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while stalled not in state["requests"] and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert stalled in state["requests"], "the run never reached the stalled file"
    finally:
        process.kill()
        process.wait()
    state["stall"].pop(stalled).set()
    assert is_complete(out / "images/covid/a case.jpeg") and is_complete(out / "images/covid/b.png")
    assert not (out / "images/normal/c.jpg").exists() and not (out / "manifest.csv").exists()

    # What else an interruption can leave: a temporary file, and (copied by hand) a truncated image.
    (out / "images/normal").mkdir(exist_ok=True)
    (out / "images/normal/.c.jpg.x1y2z3.part").write_bytes(b"\xff\xd8 half a file")
    truncated = generated_original((600, 500), "L", "PNG", seed=3)
    (out / "images/normal/d.png").write_bytes(truncated[: len(truncated) // 2])
    fetched_before = list(state["requests"])
    assert run(manifest, out, url) == 0
    assert "images: 4 downloaded, 2 already present, 0 failed (of 6)" in capsys.readouterr().out
    assert served_path("a case.jpeg") not in state["requests"][len(fetched_before):]
    assert served_path("d.png") in state["requests"][len(fetched_before):], "a damaged file is fetched again"
    assert is_complete(out / "images/normal/d.png") and not leftovers(out)
    assert len(pd.read_csv(out / "manifest.csv")) == 6


@pytest.mark.slow  # several seconds: kept out of the fast layer
def test_workers_fetch_in_parallel(mirror, tmp_path):
    served, url, state = mirror
    manifest = build_manifest(tmp_path, served)
    state["delay"] = 0.3
    assert run(manifest, tmp_path / "serial", url, "--workers", "1") == 0
    assert state["peak"] == 1
    assert run(manifest, tmp_path / "parallel", url, "--workers", "4") == 0
    assert state["peak"] >= 3


def test_only_and_limit_choose_the_rows(mirror, tmp_path, capsys):
    served, url, state = mirror
    originals = ORIGINALS + [("covid", "g.png", (100, 100), "L", "PNG"), ("sars", "h.png", (100, 120), "L", "PNG")]
    manifest = build_manifest(tmp_path, served, originals)
    out = tmp_path / "out"
    assert run(manifest, out, url, "--only", "covid,normal", "--limit", "2") == 0
    written = pd.read_csv(out / "manifest.csv")
    assert list(written["filename"]) == ["images/covid/a case.jpeg", "images/covid/b.png",
                                         "images/normal/c.jpg", "images/normal/d.png"]
    assert len(state["requests"]) == 4
    with pytest.raises(SystemExit) as exit_info:
        run(manifest, out, url, "--only", "covid,typo")
    assert exit_info.value.code == 2 and "no label typo" in capsys.readouterr().err


def test_mirror_replaces_scheme_and_host_only():
    url = f"https://raw.githubusercontent.com/owner/repo/{COMMIT}/X-Ray%20Image/a.png"
    assert mirrored(url, None) == url
    assert mirrored(url, "http://127.0.0.1:8000/") == f"http://127.0.0.1:8000/owner/repo/{COMMIT}/X-Ray%20Image/a.png"
    assert mirrored(url, "http://cache.lan/cxr") == f"http://cache.lan/cxr/owner/repo/{COMMIT}/X-Ray%20Image/a.png"


def test_an_offline_cache_folder_works_as_a_mirror(mirror, tmp_path):
    served, _, _ = mirror
    manifest = build_manifest(tmp_path, served)
    assert run(manifest, tmp_path / "out", served.as_uri() + "/") == 0
    assert len(pd.read_csv(tmp_path / "out" / "manifest.csv")) == 6


def test_a_manifest_that_writes_outside_the_folder_is_refused(tmp_path, capsys):
    manifest = tmp_path / "evil.csv"
    pd.DataFrame([{"filename": "../../escape.png", "label": "covid", "patient_id": "x", "sha256": "0" * 64,
                   "source_url": "http://127.0.0.1:1/x.png"}]).to_csv(manifest, index=False)
    assert main(["--manifest", str(manifest), "--out", str(tmp_path / "out")]) == 1
    assert "not a path inside the output folder" in capsys.readouterr().err


def test_python_m_covidxr_data_download_is_wired(capsys):
    from covidxr.__main__ import main as cli

    with pytest.raises(SystemExit) as exit_info:
        cli(["data", "download", "--help"])
    assert exit_info.value.code == 0
    assert "usage: covidxr data download" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Lung masks
# --------------------------------------------------------------------------------------------

def masks_zip(tmp_path: Path, masks: dict[str, Image.Image]) -> Path:
    """A zip laid out like torchxrayvision's: masks named after the original file, as PNG."""
    path = tmp_path / "semantic_masks_v7labs_lungs.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, mask in masks.items():
            out = io.BytesIO()
            mask.save(out, "PNG")
            archive.writestr(download.MASKS_FOLDER + name, out.getvalue())
    return path


def test_lung_masks_from_the_wheels_zip_or_how_to_get_them(mirror, tmp_path, monkeypatch, capsys):
    served, url, _ = mirror
    manifest = build_manifest(tmp_path, served)
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    frame.loc[0, "lung_mask"] = "lung_masks/a case.png"  # an 800 x 700 original
    frame.to_csv(manifest, index=False)
    full = np.zeros((700, 800), np.uint8)
    full[100:600, 80:360] = 255
    full[100:600, 440:720] = 127  # the real zip holds some 127s too: below the threshold
    zip_path = masks_zip(tmp_path, {"a case.jpeg": Image.fromarray(full)})
    monkeypatch.setattr(download, "installed_masks", lambda: None)

    # No mask source: the images are written, the manifest says no mask, and the user is told how.
    assert run(manifest, tmp_path / "plain", url) == 0
    report = capsys.readouterr().out
    assert "lung masks: 0 written, 0 already present, 0 failed, 1 not written (of 1)" in report
    assert "pip download torchxrayvision==1.5.7 --no-deps" in report
    assert pd.read_csv(tmp_path / "plain" / "manifest.csv", keep_default_na=False)["lung_mask"].eq("").all()

    # A zip that is not torchxrayvision 1.5.7's is refused when asked for.
    assert run(manifest, tmp_path / "wrong", url, "--masks", str(zip_path)) == 1
    assert "not that of torchxrayvision 1.5.7" in capsys.readouterr().out

    monkeypatch.setattr(download, "MASKS_ZIP_SHA256", hashlib.sha256(zip_path.read_bytes()).hexdigest())
    out = tmp_path / "masked"
    assert run(manifest, out, url, "--masks", str(zip_path)) == 0
    assert "lung masks: 1 written" in capsys.readouterr().out
    mask = np.asarray(Image.open(out / "lung_masks" / "a case.png"))
    assert mask.shape == (560, 640) and set(np.unique(mask)) == {0, 255}
    assert mask[300, 100:180].all() and not mask[300, 400:560].any()
    assert pd.read_csv(out / "manifest.csv", keep_default_na=False)["lung_mask"].iloc[0] == "lung_masks/a case.png"


def test_mask_reduction_reproduces_the_shared_masks(manifest_frame):
    """Measured on all 329 with torchxrayvision 1.5.7's zip (data/README.md); here on shared masks:
    re-encoding is byte-identical, and a 2x finer mask reduces to the same pixels."""
    for name in manifest_frame.loc[manifest_frame["lung_mask"] != "", "lung_mask"].iloc[:: 60]:
        shared = DATA_DIR / name
        with Image.open(shared) as mask:
            mask.load()
        assert reduce_mask(mask, mask.size) == shared.read_bytes(), name
        finer = mask.resize((mask.width * 2, mask.height * 2), Image.Resampling.NEAREST)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(reduce_mask(finer, mask.size)))), np.asarray(mask))


def real_masks_source() -> Path | None:
    """torchxrayvision's masks zip: installed, or a wheel/zip named by COVIDXR_MASKS."""
    named = os.environ.get("COVIDXR_MASKS")
    return Path(named) if named else download.installed_masks()


@pytest.mark.skipif(real_masks_source() is None, reason="needs torchxrayvision's masks zip (not in requirements.txt): "
                                                        "pip download torchxrayvision==1.5.7 --no-deps, set COVIDXR_MASKS")
def test_torchxrayvision_masks_reproduce_every_shared_mask_byte_for_byte(manifest_frame):
    source = download.MaskSource(real_masks_source())
    rows = manifest_frame[manifest_frame["lung_mask"] != ""]
    assert len(rows) == 329
    for row in rows.itertuples():
        with Image.open(DATA_DIR / row.filename) as image:
            size = image.size
        reduced = reduce_mask(source.mask_for(Path(row.filename).name), size)
        assert reduced == (DATA_DIR / row.lung_mask).read_bytes(), row.lung_mask


# --------------------------------------------------------------------------------------------
# The reduction, checked against the shared folder's files
# --------------------------------------------------------------------------------------------

def shared_images(manifest_frame, image_format: str, smaller_than: int | None = None, exactly: int | None = None):
    """{mode: (row, path)}: the first shared file of each mode in a format whose longer side is
    below `smaller_than` or equal to `exactly`."""
    found = {}
    for row in manifest_frame.itertuples():
        path = DATA_DIR / row.filename
        with Image.open(path) as image:
            longer = max(image.size)
            fits = longer < smaller_than if smaller_than else longer == exactly
            if image.format == image_format and fits and image.mode not in found:
                found[image.mode] = (row, path)
    return found


@pytest.mark.slow  # several seconds: kept out of the fast layer
def test_reducing_a_png_reproduces_the_shared_file_byte_for_byte(manifest_frame):
    # PNG is lossless: a shared PNG under 640 px holds its original's pixels, so reducing it must
    # give back the same bytes if the encoder settings are the same. At 640 px the same holds
    # for the encoding (the resize itself cannot be checked without the original).
    small = shared_images(manifest_frame, "PNG", smaller_than=MAX_SIDE)
    assert {"L", "RGB", "RGBA"} <= set(small)
    at_640 = [path for _, path in shared_images(manifest_frame, "PNG", exactly=MAX_SIDE).values()]
    assert at_640
    for path in [path for _, path in small.values()] + at_640:
        assert reduce_image(path.read_bytes()) == path.read_bytes(), path.name


def test_reducing_a_jpeg_uses_the_shared_files_encoder_settings(manifest_frame):
    small = shared_images(manifest_frame, "JPEG", smaller_than=MAX_SIDE)
    assert {"L", "RGB"} <= set(small)
    for _, path in small.values():
        shared = Image.open(path)
        ours = Image.open(io.BytesIO(reduce_image(path.read_bytes())))
        assert (ours.format, ours.mode, ours.size) == (shared.format, shared.mode, shared.size)
        assert ours.quantization == shared.quantization  # quality 90, Pillow's tables
        assert jpeg_tables(reduce_image(path.read_bytes())) == jpeg_tables(path.read_bytes()), "Huffman, chroma"
        # JPEG is lossy, but re-encoding with the same settings nearly reproduces the pixels (over
        # all 948 shared JPEGs: mean absolute difference at most 0.053 gray levels).
        difference = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(shared, dtype=np.int16))
        assert difference.mean() < 0.1, path.name


def jpeg_tables(content: bytes) -> list[bytes]:
    """The JPEG's segments before the scan other than its size: APP0, DQT, DHT, SOF's sampling."""
    segments, position = [], 2
    while content[position + 1] != 0xDA:
        length = int.from_bytes(content[position + 2: position + 4], "big")
        body = content[position + 4: position + 2 + length]
        segments.append(body[5:] if content[position + 1] == 0xC0 else body)
        position += 2 + length
    return segments


# Original sizes (the V7 Labs masks' sizes) against the shared files' sizes, measured on the
# 329 masked COVID images: 253 of 269 reduced ones follow `reduced_size` exactly (16 differ by
# one pixel; see data/README.md). These are some of them, including a .5 that rounds to even.
MEASURED_SIZES = [((2000, 2000), (640, 640)), ((1020, 1024), (638, 640)), ((970, 682), (640, 450)),
                  ((817, 852), (614, 640)), ((1007, 1024), (629, 640)), ((1024, 1024), (640, 640))]


@pytest.mark.parametrize("original, shared", MEASURED_SIZES)
def test_reduced_size_follows_the_measured_rule(original, shared):
    assert reduced_size(*original) == shared


def test_reducing_a_large_original_keeps_format_and_mode_and_stops_at_640():
    for size, mode, image_format in [((1020, 1024), "L", "JPEG"), ((1200, 900), "RGB", "JPEG"),
                                     ((1024, 1024), "L", "PNG"), ((900, 700), "RGBA", "PNG")]:
        reduced = Image.open(io.BytesIO(reduce_image(generated_original(size, mode, image_format, seed=1))))
        assert (reduced.format, reduced.mode, reduced.size) == (image_format, mode, reduced_size(*size))
    small = generated_original((300, 200), "L", "PNG", seed=2)
    assert Image.open(io.BytesIO(reduce_image(small))).size == (300, 200), "nothing is enlarged"


def test_not_an_image_is_refused_with_the_reason():
    with pytest.raises(download.DownloadError, match="not an image"):
        reduce_image(b"<html>rate limited</html>")


def test_download_module_does_not_import_torch():
    # `covidxr data download` must start fast and run where only Pillow, numpy and tqdm are installed.
    code = (f"import runpy, sys; runpy.run_path({str(REPO / 'covidxr' / 'download.py')!r}, run_name='download'); "
            "print(sorted(name for name in ('torch', 'pandas', 'covidxr') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


# --------------------------------------------------------------------------------------------
# The hospitals outside the training sources (../shared/data/external): --external NAME
# --------------------------------------------------------------------------------------------

EXTERNAL_DIR = DATA_DIR.parent / "external"


@pytest.mark.parametrize("name", ["shenzhen", "montgomery"])
def test_packaged_external_lists_are_the_shared_manifests(name):
    ours = pd.read_csv(download.EXTERNAL_LISTS[name], dtype=str, keep_default_na=False)
    shared = pd.read_csv(EXTERNAL_DIR / name / "manifest.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(ours, shared)
    assert download.EXTERNAL_LISTS[name] == REPO / "covidxr" / "lists" / f"external-{name}.csv"
    assert ours["source_url"].str.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[0-9a-f]{40}/.+").all()
    assert ours["sha256"].str.fullmatch(r"[0-9a-f]{64}").all() and ours["filename"].is_unique


def _as_original(pixels: Image.Image, mode: str) -> bytes:
    """The shared copy's pixels as an original could hold them: RGB with R = G = B, gray with an
    opaque alpha channel, or 16-bit gray; saved without Pillow's optimisation."""
    if mode == "I;16":
        image = Image.fromarray((np.asarray(pixels, np.uint16) * 257).astype(np.uint16))
    else:
        image = pixels.convert(mode)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_external_set_rebuilt_through_a_mirror_is_the_shared_one_byte_for_byte(mirror, tmp_path, capsys):
    """Originals whose pixels are the shared copies' (in RGB, gray + alpha and 16-bit gray) come
    out as the shared files exactly, in the shared layout, with the shared manifest's rows."""
    served, url, _ = mirror
    rows = []
    for name, mode in [("shenzhen", "RGB"), ("shenzhen", "LA"), ("montgomery", "I;16"), ("montgomery", "L")]:
        shared = pd.read_csv(EXTERNAL_DIR / name / "manifest.csv", dtype=str, keep_default_na=False)
        row = shared[shared.label == ("other" if mode == "LA" else "normal")].iloc[len(rows) % 2].to_dict()
        original = _as_original(Image.open(EXTERNAL_DIR / name / row["filename"]), mode)
        assert original != (EXTERNAL_DIR / name / row["filename"]).read_bytes()
        place = served / mirrored(row["source_url"], "http://x/").removeprefix("http://x/")
        place.parent.mkdir(parents=True, exist_ok=True)
        place.write_bytes(original)
        rows.append(dict(row, sha256=hashlib.sha256(original).hexdigest(), _from=name))
    manifest = tmp_path / "external.csv"
    pd.DataFrame(rows).drop(columns="_from").to_csv(manifest, index=False)
    out = tmp_path / "external"
    assert run(manifest, out, url, "--gray-png") == 0
    for row in rows:
        assert (out / row["filename"]).read_bytes() == (EXTERNAL_DIR / row["_from"] / row["filename"]).read_bytes()
    assert len(pd.read_csv(out / "manifest.csv")) == 4
    # A second run finds them complete (8-bit gray PNGs) and fetches nothing.
    capsys.readouterr()
    assert run(manifest, out, url, "--gray-png") == 0
    assert "0 downloaded, 4 already present" in capsys.readouterr().out


def test_external_uses_its_packaged_list_and_refuses_bytes_that_are_not_the_original(mirror, tmp_path, capsys):
    """--external montgomery reads covidxr/lists/external-montgomery.csv: the shared copy served
    in place of its original does not match the original's sha256, and is refused."""
    served, url, state = mirror
    shared = pd.read_csv(EXTERNAL_DIR / "montgomery" / "manifest.csv", dtype=str, keep_default_na=False)
    row = shared.iloc[0]
    place = served / mirrored(row["source_url"], "http://x/").removeprefix("http://x/")
    place.parent.mkdir(parents=True, exist_ok=True)
    place.write_bytes((EXTERNAL_DIR / "montgomery" / row["filename"]).read_bytes())
    out = tmp_path / "montgomery"
    code = main(["--external", "montgomery", "--out", str(out), "--mirror", url, "--only", row["label"],
                 "--limit", "1", "--backoff", "0"])
    assert code == 1
    assert state["requests"] == [mirrored(row["source_url"], "http://x/").removeprefix("http://x")]
    assert "sha256" in capsys.readouterr().out and not (out / row["filename"]).exists()
    with pytest.raises(SystemExit):  # one list or the other
        main(["--external", "montgomery", "--manifest", str(MANIFEST), "--out", str(out)])
