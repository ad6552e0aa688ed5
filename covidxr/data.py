"""Data stage: read images and manifests, split by patient, serve tensors.

Every image that enters covidxr, for training, evaluation or the app, goes through
`load_grayscale` and `prepare` below, so a model sees the same pixels everywhere.
"""

from __future__ import annotations

import errno
import hashlib
import math
import mmap
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .codestreams import HUFFMAN_DCT_MARKERS, CodestreamError, jpeg_header
from .dicom import is_dicom, read_dicom

DATA_ENV = "COVIDXR_DATA"


def data_dir(explicit: str | Path | None = None) -> Path:
    """The data folder (manifest.csv and images/), the one definition every command uses:
    `--data DIR` when given, else $COVIDXR_DATA, else ../shared/data/cxr beside the checkout
    (as CI and the team have it). An installed package has no checkout around it: there the
    last fallback is ../shared/data/cxr from the working folder."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    checkout = Path(__file__).resolve().parents[1]
    base = checkout.parent if (checkout / "pyproject.toml").is_file() else Path.cwd().parent
    return base / "shared" / "data" / "cxr"


# The default, read once at import; commands take `--data` and call data_dir(args.data).
DATA_DIR = data_dir()
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
# The largest digital radiographs are about 4300 x 4300 (18.5 MP); anything far beyond is refused.
MAX_PIXELS = 64_000_000


class ImageLoadError(ValueError):
    """An input that cannot be turned into an X-ray image, with a message fit for a user."""


class SplitLeakError(RuntimeError):
    """The same patient or the same image file landed in two splits."""


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def load_grayscale(image) -> np.ndarray:
    """Turn a path, PIL image or numpy array into a float32 (H, W) array scaled to [0, 1].

    Accepts any bit depth (8/16-bit, float) and mode (L, I;16, RGB, RGBA, P, CMYK, ...), DICOM
    files (recognised by content, not extension; see dicom.py), applies EXIF orientation, and
    stretches the image's own value range to [0, 1], because sources store
    the same anatomy at different depths and windows.
    """
    return load_image(image)[0]


def load_image(image) -> tuple[np.ndarray, float]:
    """(grayscale as in `load_grayscale`, colourfulness of the input before it lost its colour).

    The colourfulness feeds the not-an-X-ray check (ood.py): X-rays are gray, photos are not.
    """
    colour = 0.0
    if isinstance(image, (str, Path)):
        path = Path(image)
        _check_file(path)
        image = read_dicom(path, ImageLoadError, MAX_PIXELS) if is_dicom(path) else _open_image(path)
    if isinstance(image, Image.Image):
        _check_size(image, "image")
        try:
            array, colour = _pil_to_array(image)
        except (OSError, ValueError) as error:  # e.g. an exotic mode PIL cannot convert
            raise ImageLoadError(f"cannot convert a {image.mode} image to grayscale ({error})") from error
    elif isinstance(image, np.ndarray):
        array, colour = _numpy_to_gray(image)
    else:
        raise ImageLoadError(f"cannot read an image from a {type(image).__name__}")
    if array.ndim != 2 or min(array.shape) < 1:
        raise ImageLoadError(f"image has shape {array.shape}, expected a 2-D picture")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(array.min()), float(array.max())
    if high > low:
        array = (array - low) / (high - low)
    else:
        array = np.zeros_like(array)
    return array, colour


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler and Suesstrunk's (2003) colourfulness of an (H, W, 3) 0-255 image: 0 for gray,
    about 15 'slightly', 33 'moderately', 59 'quite' colourful."""
    rgb = np.asarray(rgb, dtype=np.float32)[..., :3]
    # A 256-pixel-wide sample is plenty for a global statistic and keeps huge inputs cheap.
    step = max(1, max(rgb.shape[:2]) // 256)
    red, green, blue = np.moveaxis(rgb[::step, ::step], -1, 0)
    rg, yb = red - green, 0.5 * (red + green) - blue
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def _check_file(path: Path) -> None:
    reason = not_a_file(path)
    if reason:
        raise ImageLoadError(f"{path.name}: {reason}")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"{path.name}: the file is empty (0 bytes)")


def not_a_file(path: Path) -> str | None:
    """Why `path` is no regular file to read, or None. A folder, a FIFO (reading it would wait
    forever), a device or a symbolic link loop is refused before anything opens it."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return "no such file"
    except OSError as error:
        return "a symbolic link loop" if error.errno == errno.ELOOP else f"cannot be opened ({error.strerror})"
    if stat.S_ISDIR(status.st_mode):
        return "a folder, not an image file"
    if not stat.S_ISREG(status.st_mode):
        return f"not a regular file but {_file_kind(status.st_mode)}"
    return None


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device"}
    return next((kind for test, kind in kinds.items() if test(mode)), "a special file")


def _open_image(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"{path.name}: image is too large to decode safely ({error})") from error
    except UnidentifiedImageError as error:
        raise ImageLoadError(f"{path.name}: not an image we can read (PNG, JPEG, another common "
                             "image format or DICOM)") from error
    except OSError as error:
        raise ImageLoadError(f"{path.name}: cannot be opened ({error.strerror or error})") from error
    except (SyntaxError, ValueError) as error:
        raise ImageLoadError(f"{path.name}: the image is damaged") from error
    try:
        _check_size(image, path.name)
        _check_coded_size(image, path)
        # PIL's default, which refuses truncated data rather than padding it with gray, is what the
        # checks above count on: never turn on ImageFile.LOAD_TRUNCATED_IMAGES in covidxr.
        image.load()
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"{path.name}: image is too large to decode safely ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:
        # The decoder's own words ("broken data stream ...") stay in the exception's cause.
        raise ImageLoadError(f"{path.name}: the image is damaged or truncated") from error
    return image


def _check_size(image: Image.Image, name: str) -> None:
    # Checked from the header, before decoding: a 30000 x 30000 file would take gigabytes.
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageLoadError(f"{name}: image is {width} x {height} pixels, more than the "
                             f"{MAX_PIXELS // 1_000_000} megapixels accepted")


# The most pixels a format can pack into one byte of coded data, well beyond what real images
# reach. A Huffman-coded JPEG spends at least one bit on every 8x8 block in every scan (512
# pixels a byte); deflate in a PNG packs at most 1032 bytes of rows into one.
JPEG_PIXELS_PER_CODED_BYTE = 1024
PNG_ROW_BYTES_PER_FILE_BYTE = 2048
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type


def _check_coded_size(image: Image.Image, path: Path) -> None:
    """Refuse a JPEG or PNG whose header promises far more pixels than its data can hold.

    libjpeg pads a cut JPEG with gray and reports success: a 335-byte file whose header says
    8000 x 8000 would be decoded to 64 megapixels (about 1 GB on its way to the model)."""
    width, height = image.size
    if image.format in ("JPEG", "MPO"):
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                header = jpeg_header(data)
            except CodestreamError:
                return  # PIL's decoder will say what is wrong
            if header.marker not in HUFFMAN_DCT_MARKERS:
                return  # arithmetic coding has no such bound
            end = data.find(b"\xff\xd9", header.scan_start)
            coded = (end if end >= 0 else len(data)) - header.scan_start
        needed = width * height // JPEG_PIXELS_PER_CODED_BYTE
    elif image.format == "PNG":
        with open(path, "rb") as handle:
            ihdr = handle.read(26)
        bits = ihdr[24] * PNG_CHANNELS.get(ihdr[25], 4) if len(ihdr) == 26 else 1
        coded = path.stat().st_size
        needed = height * (math.ceil(width * bits / 8) + 1) // PNG_ROW_BYTES_PER_FILE_BYTE
    else:
        return
    if coded < needed:
        raise ImageLoadError(f"{path.name}: its header promises {width} x {height} pixels, far more than its "
                             f"{coded} bytes of image data can hold (the file is truncated or damaged)")


def _pil_to_array(image: Image.Image) -> tuple[np.ndarray, float]:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return np.asarray(image, dtype=np.float32), 0.0
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels become black, the colour of air on an X-ray.
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    colour = 0.0 if image.mode in ("1", "L", "LA") else colourfulness(np.asarray(image.convert("RGB")))
    return np.asarray(image.convert("L"), dtype=np.float32), colour


def _numpy_to_gray(array: np.ndarray) -> tuple[np.ndarray, float]:
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.float32)
    if not np.issubdtype(array.dtype, np.number):
        raise ImageLoadError(f"array of dtype {array.dtype} is not an image")
    colour = 0.0
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        if array.shape[-1] == 1:
            array = array[..., 0]
        else:
            rgb = array[..., :3].astype(np.float32)
            top = float(rgb.max()) if rgb.size else 0.0
            colour = colourfulness(rgb * (255.0 / top if top > 255 else 1.0))
            # ITU-R 601 luma, as PIL's convert("L"); alpha is ignored.
            array = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    return array, colour


def prepare(image, size: int, equalize: bool = False) -> torch.Tensor:
    """The model's view of an image: a (1, size, size) uint8 tensor, stretched and resized.

    `equalize` adds histogram equalisation, which maps every source's contrast onto one
    intensity distribution. It was meant to hide a source cue, but it scored lower on
    validation than the plain min-max stretch (MODEL_CARD.md), so it is off by default.
    """
    gray = torch.from_numpy(load_grayscale(image))[None]
    resized = TF.resize(gray, [size, size], antialias=True)
    as_uint8 = (resized.clamp(0, 1) * 255).round().to(torch.uint8)
    return TF.equalize(as_uint8) if equalize else as_uint8


def normalise(batch: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 images (N, 1, H, W) to the float input the network expects."""
    return (batch.float() / 255.0 - mean) / std


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------

def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV (filename,label,patient_id[,view,age_group,source_dataset,sha256,...])
    or build one from a folder-per-class tree. Filenames become absolute paths."""
    path = Path(path)
    if path.is_dir():
        return _manifest_from_folders(path)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"filename", "label", "patient_id"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {sorted(missing)}")
    frame["path"] = [str((path.parent / name).resolve()) for name in frame["filename"]]
    if "lung_mask" in frame.columns:  # hand-drawn lung masks, where the source has them
        frame["lung_mask_path"] = [str((path.parent / name).resolve()) if name else "" for name in frame["lung_mask"]]
    for column in ("view", "age_group", "source_dataset", "sha256"):
        if column not in frame.columns:
            frame[column] = ""
    return frame


def _manifest_from_folders(root: Path) -> pd.DataFrame:
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(class_dir.rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                rows.append({
                    "filename": str(file.relative_to(root)),
                    "label": class_dir.name,
                    # No patient ids in a bare folder tree: each image stands alone.
                    "patient_id": f"{class_dir.name}/{file.stem}",
                    "path": str(file.resolve()),
                    "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
                })
    if not rows:
        raise ValueError(f"{root}: no images found in class sub-folders")
    warnings.warn(f"{root}: folder tree has no patient ids; each image is its own patient")
    frame = pd.DataFrame(rows)
    for column in ("view", "age_group", "source_dataset"):
        frame[column] = ""
    return frame


def parse_filters(filters: list[str] | None) -> dict[str, list[str]]:
    """['view=PA', 'source_dataset=ieee8023,kermany'] -> {'view': ['PA'], ...}."""
    parsed = {}
    for item in filters or []:
        column, sep, values = item.partition("=")
        if not sep or not column or not values:
            raise ValueError(f"filter {item!r} is not COLUMN=VALUE[,VALUE...]")
        parsed[column.strip()] = [v.strip() for v in values.split(",")]
    return parsed


def parse_label_map(items: list[str] | None, classes: list[str]) -> dict[str, str]:
    """Which manifest labels feed which class. Each class takes its own name by default;
    ['sars=covid'] would also feed SARS images to covid."""
    label_map = {name: name for name in classes}
    for item in items or []:
        source, sep, target = item.partition("=")
        if not sep or target not in classes:
            raise ValueError(f"label map {item!r} must be SOURCE_LABEL=CLASS with CLASS in {classes}")
        label_map[source.strip()] = target.strip()
    return label_map


def select(frame: pd.DataFrame, filters: dict[str, list[str]], label_map: dict[str, str]) -> pd.DataFrame:
    """Apply filters and map labels to classes. Rows whose label feeds no class keep
    target '' : they are never trained on, only evaluated (e.g. SARS)."""
    for column, values in filters.items():
        if column not in frame.columns:
            raise ValueError(f"filter column {column!r} is not in the manifest")
        frame = frame[frame[column].isin(values)]
    frame = frame.copy()
    frame["target"] = frame["label"].map(label_map).fillna("")
    return frame.reset_index(drop=True)


def data_hash(frame: pd.DataFrame) -> str:
    """A fingerprint of exactly which images with which labels went in."""
    key = frame["sha256"].where(frame["sha256"] != "", frame["filename"])
    lines = sorted(f"{k},{t}" for k, t in zip(key, frame["target"]))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Patient-disjoint split
# --------------------------------------------------------------------------------------------

def split_by_patient(frame: pd.DataFrame, seed: int, val_fraction: float = 0.15,
                     test_fraction: float = 0.15) -> pd.DataFrame:
    """Add a `split` column: train / val / test for trainable rows, eval_only for the rest.

    Stratified by class and source, grouped by patient; patients sharing an identical image
    (same sha256) are grouped together too, so no picture can sit on both sides.
    """
    frame = frame.copy()
    frame["split"] = "eval_only"
    trainable = frame.index[frame["target"] != ""]
    sub = frame.loc[trainable]
    groups = patient_groups(sub)
    strata = sub["target"] + "|" + sub["source_dataset"]

    def carve(index, fraction, salt):
        n_splits = max(2, round(1 / fraction))
        labels = strata.loc[index]
        if labels.value_counts().min() < n_splits:
            labels = sub.loc[index, "target"]  # too few per source: stratify by class alone
        if labels.value_counts().min() < n_splits:
            # Very small sets (quick runs): plain patient-grouped shuffle.
            folds = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed + salt)
        else:
            folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + salt)
        _, held = next(folds.split(index, labels, groups.loc[index]))
        return index[held]

    test = carve(sub.index, test_fraction, 0)
    rest = sub.index.difference(test)
    val = carve(rest, val_fraction / (1 - test_fraction), 1)
    frame.loc[rest, "split"] = "train"
    frame.loc[val, "split"] = "val"
    frame.loc[test, "split"] = "test"
    check_split(frame)
    return frame


def patient_groups(frame: pd.DataFrame) -> pd.Series:
    """A group name per row: patients who share an identical image (same sha256) are one group,
    and so, transitively, is every patient linked to them through another shared image (the
    connected components of the patient-image graph). The group is named after its first
    patient in row order."""
    patients = pd.Index(pd.unique(frame["patient_id"]))
    shas = pd.Index(pd.unique(frame.loc[frame["sha256"] != "", "sha256"]))
    with_sha = (frame["sha256"] != "").to_numpy()
    # Nodes: patients 0..P-1, then images P..P+S-1; an edge joins a patient to each of its images.
    rows = patients.get_indexer(frame["patient_id"][with_sha])
    columns = len(patients) + shas.get_indexer(frame["sha256"][with_sha])
    size = len(patients) + len(shas)
    graph = coo_matrix((np.ones(len(rows)), (rows, columns)), shape=(size, size))
    _, component = connected_components(graph, directed=False)
    # Name each component after its first patient (patients are indexed in order of appearance).
    first_patient = {}
    for index, patient in enumerate(patients):
        first_patient.setdefault(component[index], patient)
    names = [first_patient[component[index]] for index in range(len(patients))]
    return frame["patient_id"].map(dict(zip(patients, names)))


def assign_fold(frame: pd.DataFrame, folds: int, fold: int, seed: int) -> pd.DataFrame:
    """Cross-validation inside the training pool: train and val rows are split by patient into
    `folds` folds (stratified by class and source); fold `fold` becomes the run's `val` (its
    out-of-fold predictions), the rest `train`. Test rows stay untouched."""
    frame = frame.copy()
    pool = frame.index[frame["split"].isin(["train", "val"])]
    sub = frame.loc[pool]
    strata = sub["target"] + "|" + sub["source_dataset"]
    if strata.value_counts().min() < folds:
        strata = sub["target"]
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + 2)
    held = list(splitter.split(pool, strata, patient_groups(sub)))[fold][1]
    frame.loc[pool, "split"] = "train"
    frame.loc[pool[held], "split"] = "val"
    check_split(frame)
    return frame


def check_split(frame: pd.DataFrame) -> None:
    """Refuse any split where a patient or an image file is in two of train/val/test."""
    used = frame[frame["split"].isin(["train", "val", "test"])]
    for column in ("patient_id", "sha256"):
        values = used[used[column] != ""]
        spread = values.groupby(column)["split"].nunique()
        leaked = spread[spread > 1]
        if len(leaked):
            raise SplitLeakError(
                f"{len(leaked)} {column} value(s) appear in more than one split, "
                f"e.g. {list(leaked.index[:3])}")


# --------------------------------------------------------------------------------------------
# Tensors for training
# --------------------------------------------------------------------------------------------

def training_augmentation(rotation: float = 10.0, brightness: float = 0.3, contrast: float = 0.3,
                          erase_probability: float = 0.25, hide_shortcuts: bool = False,
                          photometric: bool = False, matched_quality: float = 0.0) -> v2.Compose:
    """The 2020 recipe (rotation, brightness) plus small shifts, zoom, contrast and erasing.

    Random erasing of a patch makes the network gather evidence from more than one spot, which
    keeps it from leaning on a single marker or border. `hide_shortcuts` adds `HideShortcuts`,
    `photometric` adds `SourceJitter`, `matched_quality` (a probability) adds `MatchedQuality`
    last, as a file's encoding comes last."""
    steps = [v2.RandomAffine(degrees=rotation, translate=(0.06, 0.06), scale=(0.9, 1.1)),
             v2.ColorJitter(brightness=brightness, contrast=contrast)]
    if photometric:
        steps.append(SourceJitter())
    if hide_shortcuts:
        steps.append(HideShortcuts())
    steps.append(v2.RandomErasing(p=erase_probability, scale=(0.02, 0.1), value=0))
    if matched_quality:
        steps.append(MatchedQuality(matched_quality))
    return v2.Compose(steps)


class MatchedQuality(torch.nn.Module):
    """Make the file's quality carry no information about the label: with `probability`, whatever
    the label, one degradation drawn from a single distribution wide enough for the worst source
    (issue 35): each of gamma 0.7-1.4, blur sigma 0.3-1.5 px, a copy down to 35-100% of the size
    and back up, sensor noise 0.5-3% and JPEG quality 20-95 is applied with probability one half
    (at least one of them), in that order, JPEG last as a file's encoding is. Unlike
    `SourceJitter`, whose steps each fire at 0.35, nearly every image goes through it: with every
    COVID film already degraded and every normal pristine, a rare degradation still meant COVID.
    Works on uint8 (1, S, S) images; a region travelling with the image is left as it is."""

    def __init__(self, probability: float = 0.8):
        super().__init__()
        self.probability = probability
        self.steps = [_Gamma((0.7, 1.4)), v2.GaussianBlur(9, sigma=(0.3, 1.5)), _ResolutionLoss((0.35, 1.0)),
                      _Grain((0.005, 0.03)), v2.JPEG((20, 95))]

    def forward(self, image: torch.Tensor, *others):
        if others:
            return (self.forward(image), *others)
        if torch.rand(()) >= self.probability:
            return image
        chosen = torch.rand(len(self.steps)) < 0.5
        if not chosen.any():
            chosen[torch.randint(len(self.steps), ())] = True
        for step, on in zip(self.steps, chosen):
            if on:
                image = step(image)
        return image


class HideShortcuts(torch.nn.Module):
    """Take away what tells a source or an age apart but is not lung: at random, cover the
    borders (collimation edges, film borders) and the top strip (where hospitals print text
    markers such as "L", "DX", "PORTABLE") with a flat gray, and bend the tone curve (gamma),
    since each source has its own exposure and processing. Works on uint8 (1, S, S) images."""

    def __init__(self, border_probability: float = 0.5, top_probability: float = 0.5,
                 gamma: tuple[float, float] = (0.7, 1.5)):
        super().__init__()
        self.border_probability, self.top_probability, self.gamma = border_probability, top_probability, gamma

    def forward(self, image: torch.Tensor, *others):
        if others:  # a region travelling with the image (XrayTensors) is left as it is
            return (self.forward(image), *others)
        image = image.clone()
        size = image.shape[-1]
        fill = int(torch.randint(0, 256, ()).item())

        def band(low: float, high: float) -> int:
            return int(size * (low + (high - low) * torch.rand(()).item()))

        if torch.rand(()) < self.border_probability:
            for side in range(4):
                if torch.rand(()) < 0.5:
                    width = band(0.02, 0.12)
                    region = [slice(None)] * image.ndim
                    region[-1 if side < 2 else -2] = slice(0, width) if side % 2 == 0 else slice(size - width, size)
                    image[tuple(region)] = fill
        if torch.rand(()) < self.top_probability:
            image[..., :band(0.05, 0.15), :] = fill
        gamma = self.gamma[0] + (self.gamma[1] - self.gamma[0]) * torch.rand(()).item()
        return v2.functional.adjust_gamma(image, gamma)


class SourceJitter(torch.nn.Module):
    """Make a scanner's or a journal's fingerprint stop paying: each step, at random, changes how
    an X-ray was acquired or processed while leaving the anatomy and the disease where they are.

    The COVID films in the training data come mostly from journal figures and a few hospitals,
    the adult normals mostly from one (NIH): tone curve, contrast, sharpness, noise, resolution
    and compression tell them apart, inside the lungs as well as outside. Gamma and contrast
    stand for exposure and processing, blur and resolution loss for detectors and downscaled
    figures, grain for film and detector noise, JPEG re-encoding for publication, and histogram
    equalisation for the processing some hospitals apply. Works on uint8 (1, S, S) images;
    a region travelling with the image (XrayTensors) is left as it is."""

    def __init__(self, probability: float = 0.35):
        super().__init__()
        p = probability
        self.steps = v2.Compose([
            v2.RandomApply([_Gamma((0.6, 1.7))], p=p),
            v2.RandomApply([v2.ColorJitter(contrast=0.4)], p=p),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.3, 1.5))], p=p),
            v2.RandomApply([_ResolutionLoss((0.25, 0.7))], p=p),
            v2.RandomApply([_Grain((0.01, 0.05))], p=p),
            v2.RandomApply([v2.JPEG((20, 85))], p=p),
            v2.RandomEqualize(p=p / 2),
        ])

    def forward(self, image: torch.Tensor, *others):
        if others:
            return (self.forward(image), *others)
        return self.steps(image)


class _Gamma(torch.nn.Module):
    def __init__(self, gamma: tuple[float, float]):
        super().__init__()
        self.gamma = gamma

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        low, high = np.log(self.gamma[0]), np.log(self.gamma[1])  # as likely to darken as to brighten
        return TF.adjust_gamma(image, float(np.exp(low + (high - low) * torch.rand(()).item())))


class _ResolutionLoss(torch.nn.Module):
    """Down to a fraction of the size and back up: a downscaled figure or a coarse detector."""

    def __init__(self, scale: tuple[float, float]):
        super().__init__()
        self.scale = scale

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = image.shape[-1]
        factor = self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(()).item()
        small = TF.resize(image, [max(8, round(size * factor))] * 2, antialias=True)
        return TF.resize(small, [size, size], antialias=False)


class _Grain(torch.nn.Module):
    """Gaussian noise, its strength a fraction of the full range."""

    def __init__(self, sigma: tuple[float, float]):
        super().__init__()
        self.sigma = sigma

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        sigma = 255 * (self.sigma[0] + (self.sigma[1] - self.sigma[0]) * torch.rand(()).item())
        noisy = image.float() + sigma * torch.randn(image.shape)
        return noisy.clamp(0, 255).round().to(torch.uint8)


@dataclass
class XrayTensors(torch.utils.data.Dataset):
    """Prepared uint8 images with class indices and, optionally, the region (N, 1, S, S) where
    evidence may lie (framing.py) and each image's source index (for a source adversary);
    augmentation moves image and region together. Items: (image, region, target, source)."""

    images: torch.Tensor
    targets: torch.Tensor
    augment: v2.Compose | None = None
    regions: torch.Tensor | None = None
    sources: torch.Tensor | None = None

    def __post_init__(self):
        if self.regions is None:
            self.regions = torch.ones((len(self.images), 1, 1, 1), dtype=torch.uint8).expand_as(self.images)
        if self.sources is None:
            self.sources = torch.zeros(len(self.targets), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image, region = self.images[index], tv_tensors.Mask(self.regions[index])
        if self.augment is not None:
            with warnings.catch_warnings():
                # RandomErasing leaves masks alone, as wanted here (an erased patch is still lung).
                warnings.filterwarnings("ignore", "RandomErasing", UserWarning)
                image, region = self.augment(image, region)
        return image, region.as_subclass(torch.Tensor), self.targets[index], self.sources[index]
