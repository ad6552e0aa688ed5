"""Distillation for training (`covidxr train --teacher CKPT [--teacher CKPT ...] --distill W`).

Issue 24's seeds study (MODEL_CARD.md, "Seeds") found that EfficientNet-Lite2 ranks a hospital it
never saw better than Lite0 across seeds, and that averaging networks ranks better still; but an
average of several networks (or one Lite2) costs more time than the speed bar allows.
Distillation (Hinton, Vinyals & Dean 2015) asks one small network to copy the average: the
student learns from the teachers' softened class probabilities on the very augmented batch it
sees, besides the labels.

    loss = (1 - W) * cross-entropy(labels) + W * T^2 * KL(teachers_T || student_T)

where `_T` is a softmax at temperature T (the T^2 keeps the gradient's scale as T changes). The
teachers run in eval mode without gradients, batch norms folded; they are read from their
checkpoints (no pickle) and must read the image exactly as the student does (framing, input size,
normalisation, classes), or their probabilities would describe another picture.

Teachers should not have trained on the student's validation or test images: give ones trained
with the same `--split-from` (the cxr split is then shared; an external hospital is split by the
seed, so use the teachers' seed for the student, or accept that its validation rows overlap).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_checkpoint, read_config
from .model import build_model, fold_batch_norms
from .ood import OutOfDistribution


def load_teachers(paths: list[str | Path], expected: dict, device: torch.device) -> list[nn.Module]:
    """The teacher networks, frozen in eval mode. `expected`: the student's classes, input_size,
    normalisation and framing; a teacher that reads the image otherwise is refused."""
    teachers = []
    for path in paths:
        state, config = load_checkpoint(path)
        differs = [key for key, value in expected.items() if config.get(key) != value]
        if differs:
            raise ValueError(f"--teacher {path}: reads the image otherwise than this run "
                             f"({', '.join(f'{key} {config.get(key)!r} != {expected[key]!r}' for key in differs)})")
        OutOfDistribution.from_checkpoint(state, config)  # pops the input check's statistics: not weights
        model = build_model(config["arch"], len(config["classes"]))
        model.load_state_dict(state)
        # A teacher only predicts, once per training batch: batch norms folded, as Predictor.load does.
        model = fold_batch_norms(model).to(device).to(memory_format=torch.channels_last).eval()
        model.requires_grad_(False)
        teachers.append(model)
    return teachers


def describe(path: str | Path) -> dict:
    """What the student's checkpoint records of a teacher: no path of this machine, the teacher's
    own description instead."""
    config = read_config(path)
    return {"arch": config["arch"], "seed": config.get("training", {}).get("seed"),
            "external": config.get("data", {}).get("external"),
            "train_data_sha256": config.get("data", {}).get("train_data_sha256"), "created": config.get("created")}


@torch.no_grad()
def teacher_probabilities(teachers: list[nn.Module], batch: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teachers' mean class probabilities at `temperature` for a normalised batch (N, C)."""
    return torch.stack([torch.softmax(teacher(batch).float() / temperature, dim=1) for teacher in teachers]).mean(0)


def distillation_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(soft_targets || softmax(student_logits / T)), averaged over the batch; `soft_targets`
    are the teachers' probabilities at the same T (teacher_probabilities)."""
    log_student = torch.log_softmax(student_logits.float() / temperature, dim=1)
    return temperature ** 2 * nn.functional.kl_div(log_student, soft_targets, reduction="batchmean")
