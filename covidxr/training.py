"""Training stage: from a manifest to a run folder holding a self-describing checkpoint.

A run folder gets: model.safetensors, split.csv, args.json, history.csv, curves.png and the
test evaluation (report.md, metrics.json, confusion_matrix.png, roc.png, predictions.csv).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import random
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim.swa_utils import get_ema_multi_avg_fn  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from . import __version__  # noqa: E402
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .data import (XrayTensors, data_hash, normalise, parse_filters, parse_label_map,  # noqa: E402
                   prepare_all, read_manifest, select, split_by_patient, training_augmentation)
from .evaluate import evaluate_predictions, write_gallery, write_report  # noqa: E402
from .model import build_model, count_parameters, gradcam_layer_name  # noqa: E402
from .ood import fit_for  # noqa: E402
from .predictor import Predictor  # noqa: E402



def normalisation(equalize: bool) -> dict:
    # After equalisation pixel values are close to uniform on [0, 1]: mean 0.5, std 1/sqrt(12).
    # Min-max stretched X-rays sit a little brighter and narrower.
    if equalize:
        return {"method": "equalize", "mean": 0.5, "std": 0.289}
    return {"method": "minmax", "mean": 0.5, "std": 0.25}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a covidxr classifier; writes a run folder.")
    parser.add_argument("--manifest", default="../shared/data/cxr/manifest.csv",
                        help="manifest CSV, or a folder with one sub-folder per class")
    parser.add_argument("--classes", nargs="+", default=["covid", "normal", "pneumonia"])
    parser.add_argument("--filter", action="append", default=[],
                        help="keep rows where COLUMN is one of VALUES: COLUMN=V1[,V2]; repeatable")
    parser.add_argument("--label-map", action="append", default=[],
                        help="SOURCE_LABEL=CLASS: also feed SOURCE_LABEL images to CLASS; repeatable")
    parser.add_argument("--arch", default="cxrnet", choices=["cxrnet", "resnet18", "densenet121", "efficientnet_b0"])
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
    parser.add_argument("--operating-point", choices=["argmax", "youden"], default="argmax",
                        help="argmax: the most probable class; youden: a COVID threshold set on validation data")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--max-per-class", type=int, help="use at most N patients' images per class (quick runs)")
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
    scores = [roc_auc_score(targets == k, probabilities[:, k])
              for k in range(probabilities.shape[1]) if 0 < (targets == k).sum() < len(targets)]
    return float(np.mean(scores)) if scores else float("nan")


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
    fpr, tpr, thresholds = roc_curve(positive, probabilities[:, covid])
    j = tpr - fpr
    best = np.flatnonzero(j == j.max())
    threshold = float(np.clip(thresholds[best].min(), 0.05, 0.95))
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


def train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, ema, norm: dict,
                    device: torch.device, description: str, progress: bool = True) -> tuple[float, float]:
    """One pass over the (augmented) training set; returns mean loss and accuracy."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for batch, batch_targets in tqdm(loader, desc=description, leave=False, unit="batch", disable=not progress):
        batch = normalise(batch.to(device), norm["mean"], norm["std"])
        batch_targets = batch_targets.to(device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = model(batch.contiguous(memory_format=torch.channels_last))
            loss = criterion(logits.float(), batch_targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema:
            ema.update_parameters(model)
        total_loss += loss.item() * len(batch_targets)
        correct += (logits.argmax(1) == batch_targets).sum().item()
        seen += len(batch_targets)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def train(args: argparse.Namespace) -> Path | None:
    """Train, evaluate on the test split, write the run folder; returns it (None on ranks > 0)."""
    dist = Distributed(args.device)
    try:
        return _train(args, dist)
    finally:
        dist.close()


def _train(args: argparse.Namespace, dist: Distributed) -> Path | None:
    if args.start_size and not 1 <= args.full_size_epochs:
        raise ValueError("--full-size-epochs must be at least 1: the best model is chosen among full-size epochs")
    generator = seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = dist.device
    out_dir = Path(dist.broadcast(args.out or f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}-{args.arch}"))
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "args.json").write_text(json.dumps(vars(args) | {"processes": dist.world}, indent=2))

    # Data: select, split by patient, decode once.
    label_map = parse_label_map(args.label_map, args.classes)
    frame = select(read_manifest(args.manifest), parse_filters(args.filter), label_map)
    if args.max_per_class:
        frame = limit_patients(frame, args.max_per_class, args.seed)
    frame = split_by_patient(frame, args.seed, args.val_fraction, args.test_fraction)
    norm = normalisation(args.equalize)
    if dist.main:
        frame.drop(columns=["path"]).to_csv(out_dir / "split.csv", index=False)
        images = prepare_all(list(frame["path"]), args.input_size, args.equalize, args.cache_dir)
    dist.barrier()  # rank 0 filled the cache; the others read it instead of racing to write it
    if not dist.main:
        images = prepare_all(list(frame["path"]), args.input_size, args.equalize, args.cache_dir)
    targets = torch.tensor([args.classes.index(t) if t else -1 for t in frame["target"]])
    index = {name: np.flatnonzero(frame["split"].to_numpy() == name) for name in ("train", "val", "test")}
    counts = frame[frame["split"] != "eval_only"].groupby(["split", "target"]).size()
    if dist.main:
        print("images per split and class:\n" + counts.unstack(fill_value=0).to_string())
        if dist.active:
            print(f"distributed: {dist.world} processes ({torch.distributed.get_backend()}), "
                  f"{args.batch_size // dist.world} images per process per step")

    # Model and optimisation.
    model = build_model(args.arch, len(args.classes))
    if args.init_from:
        state, _ = load_checkpoint(args.init_from)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("ood.")})
    model = model.to(device).to(memory_format=torch.channels_last)
    augment = None if args.no_augment else training_augmentation(hide_shortcuts=args.hide_shortcuts)
    train_set = XrayTensors(images[index["train"]], targets[index["train"]], augment)
    sampler = (torch.utils.data.DistributedSampler(train_set, dist.world, dist.rank, shuffle=True, seed=args.seed,
                                                   drop_last=True) if dist.active else None)
    batch_size = max(1, args.batch_size // dist.world)

    def make_loader(dataset: XrayTensors) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                                           generator=generator, drop_last=len(dataset) > args.batch_size,
                                           num_workers=args.workers, persistent_workers=args.workers > 0,
                                           worker_init_fn=_seed_worker)

    loader = make_loader(train_set)
    # Progressive resizing: one loader per size, images downscaled once (augmentation then
    # runs on the small images too).
    loaders = {args.input_size: loader}
    if args.start_size and args.start_size != args.input_size:
        loaders[args.start_size] = make_loader(XrayTensors(resized(train_set.images, args.start_size),
                                                           train_set.targets, augment))
    trained = dist.wrap(model)  # what the optimiser steps through: DDP averages the gradients
    criterion = nn.CrossEntropyLoss(weight=class_weights(train_set.targets, len(args.classes)).to(device),
                                    label_smoothing=args.label_smoothing)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                    weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # Optional average of recent weights; it did not beat the plain weights here (MODEL_CARD.md).
    ema = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
           if args.ema else None)
    evaluated = ema.module if ema else model
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, epochs=args.epochs,
                                                    steps_per_epoch=max(1, len(loader)), pct_start=0.15)
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda")
    val_targets = targets[index["val"]].numpy()

    history, best, best_state, best_epoch, stale = [], (-np.inf, np.inf), None, 0, 0
    epochs = tqdm(range(1, args.epochs + 1), desc=f"training {args.arch}", unit="epoch", disable=not dist.main)
    for epoch in epochs:
        if sampler is not None:
            sampler.set_epoch(epoch)
        size = epoch_size(epoch, args)
        train_loss, train_accuracy = train_one_epoch(trained, loaders[size], criterion, optimizer, scheduler, scaler,
                                                     ema, norm, device, f"epoch {epoch} ({size} px)", dist.main)
        val_probabilities = predict_probabilities(evaluated, resized(images[index["val"]], size), norm, device)
        val_loss = float(nn.functional.nll_loss(torch.log(torch.from_numpy(val_probabilities).clamp_min(1e-7)),
                                                torch.from_numpy(val_targets)))
        record = {"epoch": epoch, "size": size, "train_loss": train_loss, "train_accuracy": train_accuracy,
                  "val_loss": val_loss, "val_accuracy": float((val_probabilities.argmax(1) == val_targets).mean()),
                  "val_macro_auroc": macro_auroc(val_targets, val_probabilities)}
        history.append(record)
        epochs.set_postfix(loss=f"{record['train_loss']:.3f}", val_loss=f"{val_loss:.3f}",
                           val_auc=f"{record['val_macro_auroc']:.3f}")
        if size != args.input_size:
            continue  # only a model trained at the size it will serve can be the best one
        # Best = highest validation macro AUROC, ties broken by lower validation loss.
        score = (np.nan_to_num(record["val_macro_auroc"], nan=0.0), val_loss)
        if score[0] > best[0] or (score[0] == best[0] and score[1] < best[1]):
            best, best_state, best_epoch, stale = score, copy.deepcopy(evaluated.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= args.patience:
                if dist.main:
                    tqdm.write(f"early stop at epoch {epoch}: no validation gain for {args.patience} epochs")
                break
    if not dist.main:
        return None
    history = pd.DataFrame(history)
    history.to_csv(out_dir / "history.csv", index=False)
    plot_history(history, out_dir / "curves.png")
    model.load_state_dict(best_state)

    # Decision rule from validation, then the test evaluation of the chosen model.
    val_probabilities = predict_probabilities(model, images[index["val"]], norm, device)
    config = {
        "arch": args.arch,
        "classes": list(args.classes),
        "label_map": label_map,
        "input_size": args.input_size,
        "normalisation": norm,
        "gradcam_layer": gradcam_layer_name(args.arch),
        "decision": choose_operating_point(val_targets, val_probabilities, args.classes, args.operating_point),
        "parameters": count_parameters(model),
        "data": {
            "manifest": str(args.manifest),
            "filters": args.filter,
            "train_data_sha256": data_hash(frame.iloc[index["train"]]),
            "images": {name: int(len(ix)) for name, ix in index.items()},
            "split_seed": args.seed,
        },
        "training": {key: value for key, value in vars(args).items() if key not in ("manifest", "out")}
        | {"best_epoch": best_epoch, "epochs_run": int(len(history)), "device": device.type},
        "code_version": code_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    predictor = Predictor(model, config, device)
    unseen = frame[frame["split"].isin(["test", "eval_only"])].reset_index(drop=True)
    unseen_index = np.flatnonzero(frame["split"].isin(["test", "eval_only"]).to_numpy())
    probabilities = predictor.probabilities(images[unseen_index])
    report = evaluate_predictions(unseen, probabilities, predictor.decide(probabilities), args.classes)
    train_probabilities = predictor.probabilities(images[index["train"]])
    report["train_accuracy"] = float((predictor.decide(train_probabilities) == targets[index["train"]].numpy()).mean())
    write_report(report, unseen, probabilities, out_dir)
    write_gallery(predictor, unseen, report, out_dir)
    config["metrics"] = summarise(report)
    # The not-a-chest-X-ray check: fitted on the training images, threshold from validation.
    predictor.ood = fit_for(predictor, images, targets.numpy(), frame["split"].to_numpy())
    config["ood"] = predictor.ood.describe()
    save_checkpoint(out_dir / "model.safetensors", model, config, extra_tensors=predictor.ood.tensors())
    print(f"test: {json.dumps(config['metrics'])}")
    print(f"run folder: {out_dir}")
    return out_dir


def summarise(report: dict) -> dict:
    """The headline test numbers a checkpoint carries about itself."""
    overall = report["overall"]
    summary = {"split": "test", "n": overall["n"], "accuracy": overall["accuracy"]["value"],
               "train_accuracy": report.get("train_accuracy")}
    for name, m in overall["per_class"].items():
        summary[name] = {"sensitivity": m["sensitivity"]["value"], "specificity": m["specificity"]["value"],
                         "auroc": m["auroc"]["value"]}
    if "adult_normals_called_covid" in report:
        summary["adult_normals_called_covid"] = report["adult_normals_called_covid"]["value"]
        summary["sars_called_covid"] = report["comparison_2020"]["sars_called_covid"]
    return summary


def main(argv: list[str] | None = None) -> Path | None:
    return train(build_parser().parse_args(argv))
