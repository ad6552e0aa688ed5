"""Checkpoints: safetensors weights that carry their own description.

The description (a JSON object in the safetensors header under the key "covidxr") holds all a
reader needs to use the weights: architecture, classes, input size, normalisation, Grad-CAM
layer, decision rule, training data fingerprint, test metrics, code version and date. Its fields
and their meaning are listed once, in `Description`; `update_config` is the one writer for a
saved checkpoint, and marks measured fields stale when what they were measured under changes.
Nothing is unpickled: safetensors stores raw tensors and a JSON header only.
"""

from __future__ import annotations

import json
import datetime
import types
import typing
from pathlib import Path
from typing import Literal, TypedDict

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "covidxr-checkpoint/2"
# Formats this code reads. /1 is /2 without the `stale` field: its measurements count as current.
READABLE_FORMATS = ("covidxr-checkpoint/1", FORMAT)


class Description(TypedDict, total=False):
    """The description a checkpoint carries, field by field (`format` covidxr-checkpoint/2).

    A reader may meet fields that this list does not name (written by a newer covidxr): they are
    kept as they are, and ignored. `REQUIRED_KEYS` says which fields each task must have.
    """

    format: str  # "covidxr-checkpoint/2": the version of this list
    task: Literal["classification", "segmentation"]  # what the network does; "classification" when absent
    arch: str  # the network's name in model.py / segment.py, e.g. "cxrnet", "densenet121", "efficientnet_lite0", "lung-unet"
    classes: list[str]  # output order of the logits
    label_map: dict[str, str]  # manifest label -> class, for the labels trained on
    input_size: int  # the network's input is input_size x input_size pixels, one grayscale channel
    normalisation: dict  # {"method": "minmax" | "equalize", "mean": float, "std": float} applied to [0, 1] pixels
    framing: dict | None  # what part of the image the network reads (framing.py); None: the whole image
    gradcam_layer: str  # the submodule whose activations Grad-CAM explains
    widths: list[int]  # segmentation: the U-Net's channel widths per level
    init: dict  # where the starting weights came from: {"source": ..., "licence": ...}; absent: random
    decision: dict  # the decision rule (predictor.decide): {"rule": "argmax"} or {"rule": "threshold",
    #                 "class": ..., "threshold": ..., "method": ..., "chosen_on": ...}
    calibration: dict  # {"temperature": T, "method": ..., "chosen_on": ...}: logits / T before the softmax
    parameters: int  # number of trainable parameters
    data: dict  # the training data: manifest name, filters, train_data_sha256, images per split, split_seed
    training: dict  # the training options (train.py's arguments) and how the run went
    code_version: str  # covidxr version and commit that trained it
    created: str  # ISO 8601 time of training
    metrics: dict  # the headline test numbers (evaluate.summarise), measured under `decision` and
    #                `calibration` as they were then; see `stale`
    ood: dict  # the not-a-chest-X-ray check (ood.py): its statistics' description and thresholds
    lung_focus_notice: dict  # the lungs-outside notice: its rule (chance), how often it fires, the split measured on
    lung_focus: dict  # the COVID map's share inside hand-drawn lung masks on unseen X-rays, with its chance level
    #                   (audit --hand-masks --store-focus): {"mean", "chance", "images", "method", "target",
    #                   "split", "masks"}
    card: dict  # for people choosing a model: {"name", "title", "summary", "shortcut"} (plain words; the
    #             numbers are the fields above)
    stale: dict[str, str]  # measured fields whose inputs changed since they were measured: field -> why.
    #                        A stale field is history, not a description of the model as it decides now.


# What each kind of model must say about itself ("task"; a classifier when absent).
REQUIRED_KEYS = {"classification": ("arch", "classes", "input_size", "normalisation", "gradcam_layer"),
                 "segmentation": ("arch", "input_size", "normalisation")}
# Measured fields and what they were measured under: when a change rewrites one of the latter
# and does not measure the field again, the field is marked stale. (The notice's numbers count
# correctly classified X-rays, so they depend on the rule too; the test metrics do not depend on
# the notice, which changes no label.)
MEASURED_UNDER = {"metrics": ("decision", "calibration"),
                  "lung_focus_notice": ("decision", "calibration")}


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not fit the model it describes."""


WEIGHTS_DIR = Path(__file__).parent / "weights"
# The classifiers that ship in the package, by the names `Predictor.load`, every `--checkpoint`
# and the app take. The first is the default. Each file describes itself (its "card" says what it
# is for and what it is known to read besides the lungs).
BUNDLED = {"whole-image": "covidxr-cxrnet.safetensors",
           "lung-reader": "covidxr-lungreader.safetensors",
           "recipe-2020": "covidxr-2020.safetensors"}
DEFAULT_MODEL = next(iter(BUNDLED))


def checkpoint_path(name_or_path: str | Path | None = None) -> Path:
    """The file of a bundled model's name (`BUNDLED`), or the path as given; None: the default
    model. A file of that name in the working folder wins over the bundled one."""
    if name_or_path is None or name_or_path == "":
        return WEIGHTS_DIR / BUNDLED[DEFAULT_MODEL]
    if str(name_or_path) in BUNDLED and not Path(name_or_path).exists():
        return WEIGHTS_DIR / BUNDLED[str(name_or_path)]
    return Path(name_or_path)


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: dict,
                    dtype: torch.dtype = torch.float16, extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write weights (floating tensors cast to `dtype` to keep the file small) and config.

    `extra_tensors` (e.g. the not-an-X-ray statistics, ood.py) are stored as given, in float32.
    """
    problems = _problems({"format": FORMAT, **config})
    if problems:
        raise CheckpointError(f"checkpoint config: {'; '.join(problems)}")
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        tensors[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    for name, tensor in (extra_tensors or {}).items():
        tensors[name] = tensor.detach().cpu().float().contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"covidxr": json.dumps({**config, "format": FORMAT})})
    return path


def update_config(path: str | Path, changes: dict, why: str = "") -> dict:
    """The one way to change a saved checkpoint's description: `changes` merged in, the tensors
    kept byte for byte (same names, dtypes and values). Returns the new description.

    A measured field (`MEASURED_UNDER`) whose inputs `changes` rewrites, and which `changes` does
    not measure again, is marked stale with `why` (e.g. "decision rule set by covidxr calibrate");
    a field `changes` does measure again is current once more."""
    with _open(path) as handle:
        config = _parse_config(path, handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    stale = dict(config.get("stale") or {})
    for field in changes:
        stale.pop(field, None)
    today = datetime.date.today().isoformat()
    for field, inputs in MEASURED_UNDER.items():
        changed = [key for key in inputs if key in changes and changes[key] != config.get(key)]
        if field in config and field not in changes and changed:
            stale[field] = f"{' and '.join(changed)} changed on {today}" + (f" ({why})" if why else "")
    config.update(changes, format=FORMAT)
    if stale:
        config["stale"] = stale
    else:
        config.pop("stale", None)
    problems = _problems(config)
    if problems:
        raise CheckpointError(f"checkpoint description: {'; '.join(problems)}")
    partial = Path(path).with_suffix(".partial")
    save_file(tensors, str(partial), metadata={"covidxr": json.dumps(config)})
    partial.replace(path)
    return config


def current(config: dict, field: str):
    """The field's value if it describes the checkpoint as it is now; None if absent or stale."""
    return None if field in (config.get("stale") or {}) else config.get(field)


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
    if config.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: format {config.get('format')!r}, expected one of {READABLE_FORMATS}")
    problems = _problems(config)
    if problems:
        raise CheckpointError(f"{path}: description {'; '.join(problems)}")
    return config


def _problems(config: dict) -> list[str]:
    """What is wrong with a description: required fields missing, known fields of the wrong type."""
    task = config.get("task", "classification")
    if task not in REQUIRED_KEYS:
        return [f"lacks a known task (got {task!r})"]
    problems = [f"lacks {key!r}" for key in REQUIRED_KEYS[task] if key not in config]
    hints = typing.get_type_hints(Description)
    problems += [f"field {key!r} should be {_name(hints[key])}, is {type(value).__name__}"
                 for key, value in config.items() if key in hints and not _matches(value, hints[key])]
    return problems


def _matches(value, hint) -> bool:
    """Whether a JSON value fits a Description field's type (containers checked at the top only)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    expected = origin or hint
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def main(argv: list[str] | None = None) -> dict:
    """`covidxr describe`: print a checkpoint's description (without its weights); with --card,
    set the plain-words card the app shows when the model is picked."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.split(";")[0].replace("`covidxr describe`: ", ""))
    parser.add_argument("checkpoint", type=checkpoint_path, nargs="?", metavar="FILE_OR_NAME",
                        help=f"a checkpoint file or a bundled model's name ({', '.join(BUNDLED)}; default "
                             f"{DEFAULT_MODEL})")
    parser.add_argument("--card", metavar="JSON_FILE",
                        help='store this card: {"name", "title", "summary", "shortcut"}; weights untouched')
    args = parser.parse_args(argv)
    path = args.checkpoint or checkpoint_path()
    if args.card:
        card = json.loads(Path(args.card).read_text())
        missing = [key for key in ("name", "title", "summary", "shortcut") if not isinstance(card.get(key), str)]
        if missing:
            parser.error(f"{args.card}: the card lacks {', '.join(missing)} (text each)")
        update_config(path, {"card": card})
    config = read_config(path)
    print(json.dumps(config, indent=2))
    return config
