"""Lung segmentation: a compact U-Net trained on the lung masks of ../shared/data/cxr.

    segmenter = LungSegmenter.load()          # the shipped lung model
    mask = segmenter.segment(image)           # bool (H, W), the image's own size

    covidxr segment --out runs/lungs          # train, test, write a self-describing checkpoint

It tells the audit (audit.py) and the app where the lungs are, so that a heatmap can be
scored by how much of its mass falls on them. The masks (V7 Labs, via torchxrayvision) exist for
adult COVID images only; `covidxr segment --sheet` draws its masks on adult normals and
children, to check by eye how far it carries.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy import ndimage
from sklearn.model_selection import GroupShuffleSplit
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm.auto import tqdm

from .checkpoint import BUNDLED, CheckpointError, checkpoint_path, load_checkpoint, save_checkpoint, update_config
from .data import check_split, data_dir, data_hash, load_grayscale, normalise, patient_groups, prepare, read_manifest
from .model import fold_batch_norms

SHIPPED_LUNGS = Path(__file__).parent / "weights" / "covidxr-lungs.safetensors"
NORMALISATION = {"method": "minmax", "mean": 0.5, "std": 0.25}
KEPT_ANSWERS = 16  # inputs whose lung probabilities a loaded segmenter keeps (64 x 64 floats each)


# -- the network --------------------------------------------------------------------------------

def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class LungUNet(nn.Module):
    """U-Net (Ronneberger et al. 2015), four levels, widths 16-128, one input and one output channel."""

    def __init__(self, widths=(16, 32, 64, 128)):
        super().__init__()
        self.down = nn.ModuleList()
        channels = 1
        for width in widths:
            self.down.append(_double_conv(channels, width))
            channels = width
        self.bottom = _double_conv(widths[-1], widths[-1] * 2)
        self.up, self.merge = nn.ModuleList(), nn.ModuleList()
        channels = widths[-1] * 2
        for width in reversed(widths):
            self.up.append(nn.ConvTranspose2d(channels, width, 2, stride=2))
            self.merge.append(_double_conv(2 * width, width))
            channels = width
        self.out = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.out(x)


# -- using it -----------------------------------------------------------------------------------

def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Keep the two largest connected regions (the two lungs), holes filled."""
    labels, count = ndimage.label(mask)
    if count > 2:
        sizes = ndimage.sum(mask, labels, range(1, count + 1))
        keep = 1 + np.argsort(sizes)[-2:]
        mask = np.isin(labels, keep)
    return ndimage.binary_fill_holes(mask)


class LungSegmenter:
    def __init__(self, model: nn.Module, config: dict, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # channels_last: oneDNN's fast layout for convolutions with few channels at full
        # resolution, which is most of a U-Net's work (BENCHMARKS.md).
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.config = config
        self.fingerprint = None
        # The last few images' answers (`probabilities(..., keep=True)`): the not-a-chest-X-ray
        # check and the lung outline of the same image, or of the same image for several
        # classifiers (the app's compare view), ask for the very same 64-px input.
        self._kept: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._kept_lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | None = None) -> "LungSegmenter":
        path = Path(path) if path else SHIPPED_LUNGS
        state, config = load_checkpoint(path)  # CheckpointError naming the file if absent or damaged
        try:
            model = LungUNet(tuple(config["widths"]))
            model.load_state_dict(state, strict=True)
        except (KeyError, TypeError, RuntimeError) as error:
            raise CheckpointError(f"{path}: not a lung model this version can read "
                                  f"({str(error).splitlines()[0]})") from error
        segmenter = cls(fold_batch_norms(model), config, device)
        # Which lung model framed a classifier's training images (framing.frame_all's cache key).
        segmenter.fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return segmenter

    def forget(self) -> None:
        """Drop the kept answers (the app does at the start of every job: nothing one request
        asked is reused, or timed, by another)."""
        with self._kept_lock:
            self._kept.clear()

    def probabilities(self, batch: torch.Tensor, keep: bool = False) -> torch.Tensor:
        """Lung probability (N, S, S) for prepared uint8 images (N, 1, S, S). With `keep`, the
        answers for the last KEPT_ANSWERS inputs are kept and reused for the same bytes (only for a
        loaded model: one being trained changes under it)."""
        if not keep:
            return self._probabilities(batch)
        keys = [hashlib.blake2b(item.numpy().tobytes(), digest_size=16).digest() for item in batch.cpu()]
        with self._kept_lock:
            found = {key: self._kept[key] for key in keys if key in self._kept}
        missing = [index for index, key in enumerate(keys) if key not in found]
        if missing:
            computed = self._probabilities(batch[missing])
            with self._kept_lock:
                for index, answer in zip(missing, computed):
                    found[keys[index]] = self._kept[keys[index]] = answer
                    while len(self._kept) > KEPT_ANSWERS:
                        self._kept.popitem(last=False)
        return torch.stack([found[key] for key in keys])

    @torch.inference_mode()
    def _probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        norm = self.config["normalisation"]
        inputs = normalise(batch.to(self.device), norm["mean"], norm["std"]).contiguous(memory_format=torch.channels_last)
        # Scoring never updates batch-norm statistics, whatever mode a training loop left the model in.
        self.model.eval()
        return torch.sigmoid(self.model(inputs).float())[:, 0].cpu()

    def view(self, gray: np.ndarray) -> torch.Tensor:
        """The model's input for a grayscale image (uint8, (1, S, S)): the whole image, resized."""
        return prepare(gray, self.config["input_size"])

    def segment(self, image, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Boolean lung mask with the image's own height and width, or `shape` (H, W): the mask of
        a full-size image drawn at its display copy's size."""
        gray = load_grayscale(image)
        probability = self.probabilities(self.view(gray)[None], keep=True)[0].numpy()
        # Clean at the network's resolution (25x fewer pixels than a 640-px image: the cleaning
        # cost more than the network), then let the upsampled probabilities draw the smooth edge:
        # only the pixels the cleaning changed (filled holes, dropped specks) are overwritten.
        found = probability > 0.5
        kept = clean_mask(found)
        probability = np.where(kept & ~found, 0.75, np.where(found & ~kept, 0.25, probability)).astype(np.float32)
        height, width = shape or gray.shape
        resized = Image.fromarray(probability, mode="F").resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(resized) > 0.5


# -- evidence shares: where a heatmap's mass lies --------------------------------------------------

BORDER = 0.08  # outer frame, as a fraction of each side
TOP = 0.12     # top strip, where text markers sit


def evidence_shares(heatmap: np.ndarray, lung_mask: np.ndarray) -> dict[str, float]:
    """Share of the heatmap's mass inside the lungs, on the image border, and on the top strip."""
    heatmap = np.clip(np.asarray(heatmap, dtype=np.float64), 0, None)
    total = heatmap.sum()
    if total <= 0:
        return {"lung_focus": 0.0, "border_share": 0.0, "top_share": 0.0}
    height, width = heatmap.shape
    border = np.ones_like(lung_mask, dtype=bool)
    dy, dx = max(1, round(BORDER * height)), max(1, round(BORDER * width))
    border[dy:height - dy, dx:width - dx] = False
    top = np.zeros_like(border)
    top[:max(1, round(TOP * height))] = True
    return {"lung_focus": float(heatmap[lung_mask].sum() / total),
            "border_share": float(heatmap[border].sum() / total),
            "top_share": float(heatmap[top].sum() / total)}


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The boundary pixels of a mask, `width` pixels thick. (OpenCV's erosion: the same pixels
    as scipy.ndimage.binary_erosion with a cross, about 15x faster on a 640-px mask.)"""
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    eroded = cv2.erode(mask.astype(np.uint8), cross, iterations=max(1, width),
                       borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return mask & ~eroded.astype(bool)


# -- training -------------------------------------------------------------------------------------

def dice_iou(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    intersection = np.logical_and(predicted, truth).sum()
    total = predicted.sum() + truth.sum()
    union = np.logical_or(predicted, truth).sum()
    return (2 * intersection / total if total else 1.0), (intersection / union if union else 1.0)


def bundled_splits() -> list[Path]:
    """The split files of the bundled classifiers (NAME.split.csv beside each checkpoint)."""
    return [split for name in BUNDLED if (split := checkpoint_path(name).with_suffix(".split.csv")).is_file()]


def classifier_test_patients(splits: list[str | Path]) -> set[str]:
    """Every patient in the test split of any of these classifier split files: the lung model
    must not learn their masks, or the lung reader's crop, the not-an-X-ray check and the lung
    focus on those test images would come from a segmenter that has seen them."""
    patients = set()
    for split in splits:
        rows = pd.read_csv(split, dtype=str, keep_default_na=False)
        patients |= set(rows.loc[rows["split"] == "test", "patient_id"])
    return patients


def split_around(frame: pd.DataFrame, held_out: set[str], seed: int, val_fraction: float) -> pd.DataFrame:
    """train / val / test for the mask rows: the held-out patients (and any patient sharing an
    image with one) are the test split; the rest are split into train and val by patient."""
    frame = frame.assign(split="train")
    groups = patient_groups(frame)
    test_groups = set(groups[frame["patient_id"].isin(held_out)])
    test = groups.isin(test_groups)
    frame.loc[test, "split"] = "test"
    rest = frame.index[~test]
    if len(rest) > 1:
        folds = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        _, val = next(folds.split(rest, groups=groups.loc[rest]))
        frame.loc[rest[val], "split"] = "val"
    check_split(frame)
    return frame


def _load_pairs(frame: pd.DataFrame, root: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = [], []
    for filename, mask_name in tqdm(zip(frame["filename"], frame["lung_mask"]), total=len(frame),
                                    desc="reading masks", unit="img"):
        images.append(prepare(root / filename, size))
        mask = Image.open(root / mask_name).convert("L").resize((size, size), Image.Resampling.NEAREST)
        masks.append(torch.from_numpy(np.asarray(mask) > 127)[None])
    return torch.stack(images), torch.stack(masks)


def _augment() -> v2.Compose:
    # Geometry moves image and mask together (tv_tensors.Mask); intensity touches the image only.
    return v2.Compose([v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.85, 1.15)),
                       v2.ColorJitter(brightness=0.3, contrast=0.3)])


def nothing(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, empty mask): a blank field, as `prepare` gives any flat image (stretched to black).
    Every mask of the training data has lungs in it, so without these the network was free to
    find "lungs" in nothing at all: one retrain drew a fifth of a blank image as lung, which a
    lung-reading model would then have cropped to. (Smooth noise as a second kind of nothing cost
    a heavily edge-enhanced test film its lungs, Dice 0.93 -> 0.03: left out.)"""
    return torch.zeros((1, size, size), dtype=torch.uint8), torch.zeros((1, size, size), dtype=torch.bool)


def train_segmenter(args: argparse.Namespace) -> Path:
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.manifest).parent
    frame = read_manifest(args.manifest)
    frame = frame[frame["lung_mask"].fillna("") != ""].reset_index(drop=True).assign(target="lung")
    if args.limit:  # quick runs: the first patients only
        frame = frame[frame["patient_id"].isin(frame["patient_id"].drop_duplicates()[:args.limit])]
        frame = frame.reset_index(drop=True)
    held_out = classifier_test_patients(args.hold_out)
    frame = split_around(frame, held_out, args.seed, 0.15)
    frame[["filename", "lung_mask", "patient_id", "split"]].to_csv(out / "split.csv", index=False)
    images, masks = _load_pairs(frame, root, args.input_size)
    index = {name: np.flatnonzero(frame["split"].to_numpy() == name) for name in ("train", "val", "test")}
    print({name: len(ix) for name, ix in index.items()}, "images;",
          {name: frame.iloc[ix]["patient_id"].nunique() for name, ix in index.items()}, "patients")

    model = LungUNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    batches = int(np.ceil(len(index["train"]) / args.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, epochs=args.epochs, steps_per_epoch=batches)
    augment = _augment()
    segmenter = LungSegmenter(model, {"input_size": args.input_size, "normalisation": NORMALISATION}, "cpu")
    # One seeded order of batches: the same command retrains the same model.
    order_rng = np.random.default_rng(args.seed)
    best, best_state, history = -1.0, None, []
    for epoch in tqdm(range(1, args.epochs + 1), desc="training lung U-Net", unit="epoch"):
        model.train()
        order = order_rng.permutation(index["train"])
        losses = []
        for start in range(0, len(order), args.batch_size):
            pairs = [augment(images[i], tv_tensors.Mask(masks[i])) for i in order[start:start + args.batch_size]]
            if args.negatives:  # a picture of nothing, with no lungs to find in it
                pairs.append(nothing(args.input_size))
            batch = normalise(torch.stack([p[0] for p in pairs]), NORMALISATION["mean"], NORMALISATION["std"])
            truth = torch.stack([p[1] for p in pairs]).float()
            logits = model(batch)
            probability = torch.sigmoid(logits)
            soft_dice = 1 - (2 * (probability * truth).sum((1, 2, 3)) + 1) / (probability.sum((1, 2, 3)) + truth.sum((1, 2, 3)) + 1)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, truth) + soft_dice.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        # Eval mode before scoring: in train mode batch norm would normalise with the validation
        # batch's own statistics and fold them into its running statistics, so the saved model
        # would carry the validation (and test) images in its weights.
        model.eval()
        predicted = segmenter.probabilities(images[index["val"]]).numpy() > 0.5
        val_dice = float(np.mean([dice_iou(p, t[0].numpy())[0] for p, t in zip(predicted, masks[index["val"]])]))
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_dice": val_dice})
        if val_dice > best:
            best, best_state, best_epoch = val_dice, copy.deepcopy(model.state_dict()), epoch
    model.load_state_dict(best_state)
    model.eval()
    pd.DataFrame(history).to_csv(out / "history.csv", index=False)
    config = {"task": "segmentation", "arch": "lung-unet", "widths": [16, 32, 64, 128], "classes": ["lung"],
              "input_size": args.input_size, "normalisation": NORMALISATION,
              "data": {"manifest": portable_path(args.manifest), "masks": "lung_mask column (V7 Labs, adult COVID images)",
                       # Every classifier test patient with a mask is this model's test patient too.
                       "held_out": {"splits": [Path(split).name for split in args.hold_out],
                                    "test_patients": len(held_out),
                                    "test_patients_sha256": hashlib.sha256("\n".join(sorted(held_out)).encode()).hexdigest()},
                       "train_data_sha256": data_hash(frame.iloc[index["train"]]),
                       "images": {name: int(len(ix)) for name, ix in index.items()}},
              "training": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
                           "negatives": args.negatives,
                           "kept_epoch": best_epoch, "steps_per_epoch": batches},
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    checkpoint = save_checkpoint(out / "lungs.safetensors", model, config)

    # Test the model as shipped: read back from the file (fp16 weights, batch norms folded) by
    # the same LungSegmenter.load every user goes through, at each image's own resolution,
    # against its own mask file, after clean-up.
    segmenter = LungSegmenter.load(checkpoint, "cpu")
    rows = []
    for i in tqdm(index["test"], desc="testing", unit="img"):
        row = frame.iloc[i]
        truth = np.asarray(Image.open(root / row["lung_mask"]).convert("L")) > 127
        dice, iou = dice_iou(segmenter.segment(root / row["filename"]), truth)
        rows.append({"filename": row["filename"], "patient_id": row["patient_id"], "dice": dice, "iou": iou})
    scores = pd.DataFrame(rows)
    scores.to_csv(out / "test_scores.csv", index=False)
    metrics = {"split": "test", "images": len(scores), "patients": int(scores["patient_id"].nunique()),
               "dice_mean": float(scores["dice"].mean()), "dice_median": float(scores["dice"].median()),
               "iou_mean": float(scores["iou"].mean()), "dice_min": float(scores["dice"].min()),
               "val_dice": best, "measured": "as shipped: LungSegmenter.load of the saved fp16 file"}
    update_config(checkpoint, {"metrics": metrics})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    return out


# -- a contact sheet to judge it by eye where no masks exist ------------------------------------------

def contact_sheet(segmenter: LungSegmenter, paths: list[Path], titles: list[str], path: Path, columns: int = 6) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = int(np.ceil(len(paths) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows))
    for axis in np.atleast_1d(axes).ravel():
        axis.axis("off")
    for axis, image_path, title in zip(np.atleast_1d(axes).ravel(), paths, titles):
        gray = load_grayscale(image_path)
        rgb = np.repeat(gray[..., None], 3, axis=-1)
        rgb[outline(segmenter.segment(gray), max(1, gray.shape[0] // 150))] = (1.0, 0.2, 0.2)
        axis.imshow(rgb)
        axis.set_title(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def sheet(args: argparse.Namespace) -> Path:
    """Masks drawn on images the segmenter never had masks for: adult normals, children, pneumonias."""
    frame = read_manifest(args.manifest)
    root = Path(args.manifest).parent
    picks = pd.concat([
        frame[(frame["label"] == "normal") & (frame["age_group"] == "adult")].sample(6, random_state=0),
        frame[(frame["label"] == "normal") & (frame["age_group"] == "pediatric")].sample(6, random_state=0),
        frame[(frame["label"] == "pneumonia") & (frame["age_group"] == "adult")].sample(6, random_state=0),
        frame[(frame["label"] == "pneumonia") & (frame["age_group"] == "pediatric")].sample(6, random_state=0)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    titles = [f"{r.label} {r.age_group} {r.source_dataset}" for r in picks.itertuples()]
    path = contact_sheet(LungSegmenter.load(args.checkpoint), [root / f for f in picks["filename"]], titles,
                         out / "lung_sheet.png")
    print(f"contact sheet: {path}")
    return path


def portable_path(path: str | Path) -> str:
    """`path` relative to the working folder: what a checkpoint records of its data, since a
    checkpoint ships and an absolute path names one machine's folders."""
    return Path(os.path.relpath(Path(path).resolve(), Path.cwd())).as_posix()


def build_parser() -> argparse.ArgumentParser:
    """The defaults retrain the shipped lung model (its recipe is in its checkpoint's config)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None,
                        help="data folder with manifest.csv and the lung masks (default: $COVIDXR_DATA, "
                             "else ../shared/data/cxr)")
    parser.add_argument("--manifest", default=None, help="another manifest (default: the data folder's)")
    parser.add_argument("--out", default="runs/lungs")
    # 64: the input size of the shipped lung model, which these defaults retrain (128 gave test Dice
    # 0.950 against 0.947 at 64, for about 4x the network cost: MODEL_CARD.md).
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hold-out", action="append", default=None, metavar="SPLIT_CSV",
                        help="a classifier's split file: its test patients are this model's test patients, never "
                             "trained or validated on (repeatable; default: every bundled classifier's)")
    parser.add_argument("--negatives", type=int, default=1, choices=(0, 1),
                        help="add a picture of nothing (a blank field, empty mask) to each batch (default 1)")
    parser.add_argument("--limit", type=int, help="use only the first N patients' images (quick runs)")
    parser.add_argument("--sheet", action="store_true", help="only draw masks on images without masks (no training)")
    parser.add_argument("--checkpoint", default=None, help="lung checkpoint for --sheet (default: the shipped one)")
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    args.manifest = args.manifest or str(data_dir(args.data) / "manifest.csv")
    args.hold_out = args.hold_out if args.hold_out is not None else bundled_splits()
    return sheet(args) if args.sheet else train_segmenter(args)


if __name__ == "__main__":
    main()
