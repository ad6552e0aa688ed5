"""Checkpoints: safetensors weights that carry their own description.

The description (a JSON object in the safetensors header under the key "covidxr") holds all a
reader needs to use the weights: architecture, classes, input size, normalisation, Grad-CAM
layer, decision rule, training data fingerprint, test metrics, code version and date.
Nothing is unpickled: safetensors stores raw tensors and a JSON header only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "covidxr-checkpoint/1"
# What each kind of model must say about itself ("task"; a classifier when absent).
REQUIRED_KEYS = {"classification": ("arch", "classes", "input_size", "normalisation", "gradcam_layer"),
                 "segmentation": ("arch", "input_size", "normalisation")}


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not fit the model it describes."""


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: dict,
                    dtype: torch.dtype = torch.float16, extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write weights (floating tensors cast to `dtype` to keep the file small) and config.

    `extra_tensors` (e.g. the not-an-X-ray statistics, ood.py) are stored as given, in float32.
    """
    missing = _missing(config)
    if missing:
        raise CheckpointError(f"checkpoint config lacks {missing}")
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        tensors[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    for name, tensor in (extra_tensors or {}).items():
        tensors[name] = tensor.detach().cpu().float().contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"covidxr": json.dumps({"format": FORMAT, **config})})
    return path


def update_config(path: str | Path, changes: dict) -> None:
    """Rewrite a checkpoint's description with `changes` merged in; the tensors are kept
    byte for byte (same names, dtypes and values)."""
    with _open(path) as handle:
        config = _parse_config(path, handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    config.update(changes)
    missing = _missing(config)
    if missing:
        raise CheckpointError(f"checkpoint config lacks {missing}")
    partial = Path(path).with_suffix(".partial")
    save_file(tensors, str(partial), metadata={"covidxr": json.dumps(config)})
    partial.replace(path)


def read_config(path: str | Path) -> dict:
    """Only the description, without loading the weights."""
    with _open(path) as handle:
        return _parse_config(path, handle.metadata())


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict as float32, config). Raises CheckpointError with the reason on any fault."""
    with _open(path) as handle:
        config = _parse_config(path, handle.metadata())
        try:
            state = {name: handle.get_tensor(name) for name in handle.keys()}
        except SafetensorError as error:
            raise CheckpointError(f"{path}: weights are unreadable ({error})") from error
    state = {name: t.float() if t.is_floating_point() else t for name, t in state.items()}
    return state, config


def _open(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path}: not a valid safetensors checkpoint (damaged or a different format): {error}"
        ) from error


def _parse_config(path, metadata: dict | None) -> dict:
    if not metadata or "covidxr" not in metadata:
        raise CheckpointError(f"{path}: safetensors file has no covidxr description in its header")
    try:
        config = json.loads(metadata["covidxr"])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: covidxr description is not valid JSON ({error})") from error
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {config.get('format')!r}, expected {FORMAT!r}")
    missing = _missing(config)
    if missing:
        raise CheckpointError(f"{path}: description lacks {missing}")
    return config


def _missing(config: dict) -> list[str]:
    task = config.get("task", "classification")
    if task not in REQUIRED_KEYS:
        return [f"a known task (got {task!r})"]
    return [key for key in REQUIRED_KEYS[task] if key not in config]
