"""Serving stage: `Predictor`, the one way to run a trained model on images.

    from covidxr import Predictor
    predictor = Predictor.load()               # the shipped model
    result = predictor.predict("xray.png")     # path, PIL image or numpy array
    result.label, result.probabilities          # 'covid', {'covid': 0.91, ...}
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import BUNDLED, DEFAULT_MODEL, CheckpointError, checkpoint_path, load_checkpoint, read_config
from .data import load_grayscale, load_image, normalise
from .framing import Framing, frame, frame_all, uses_lungs
from .model import build_model, fold_batch_norms
from .ood import FeatureHook, OutOfDistribution
from .report import Verdict, decision_rule, verdict
from .xray_check import XrayCheck

SHIPPED_CHECKPOINT = checkpoint_path()  # the default of the bundled models (checkpoint.BUNDLED)
# Which patients of ../shared/data/cxr it was trained, tuned and tested on (no images).
SHIPPED_SPLIT = SHIPPED_CHECKPOINT.with_suffix(".split.csv")


@dataclass
class Prediction:
    """One image's prediction. `label` is the verdict's (report.py): the decided class, or None
    when the input is no frontal chest X-ray (`reasons` says why; xray_check.py). `decided` is
    the class the checkpoint's rule gives for the probabilities either way: a reading only when
    `label` is not None. `warnings`: every message, the refusal's reasons first, then what is
    unusual about an X-ray that is read all the same (unlike the training data, no lungs found)."""

    decided: str
    probabilities: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    decision: dict | None = None  # the checkpoint's decision rule (decide)

    @property
    def not_an_xray(self) -> bool:
        """True when the input check refuses the image as no frontal chest X-ray."""
        return bool(self.reasons)

    @property
    def label(self) -> str | None:
        return None if self.reasons else self.decided

    @property
    def verdict(self) -> Verdict:
        """What is shown of this prediction (report.py), without a heatmap."""
        return verdict(self.decided, self.probabilities, warnings=self.warnings[len(self.reasons):],
                       reasons=self.reasons, decision=self.decision)


def decide(probabilities: np.ndarray, classes: list[str], decision: dict | None) -> np.ndarray:
    """Class indices from probabilities (N, C) under the checkpoint's decision rule.

    Rule "argmax": the most probable class. Rule "threshold": call `class` whenever its
    probability reaches `threshold` (an operating point chosen on validation data to trade
    sensitivity against specificity), otherwise the most probable of the other classes.
    """
    probabilities = np.asarray(probabilities)
    if not decision or decision.get("rule", "argmax") == "argmax":
        return probabilities.argmax(1)
    target = classes.index(decision["class"])
    others = probabilities.copy()
    others[:, target] = -1.0
    return np.where(probabilities[:, target] >= decision["threshold"], target, others.argmax(1))


class Predictor:
    def __init__(self, model: torch.nn.Module, config: dict, device: str | torch.device | None = None,
                 ood: OutOfDistribution | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.config = config
        self.ood = ood  # the feature-distance warning (ood.py); None for checkpoints without one
        # The not-a-chest-X-ray check (xray_check.py): the classifier's own features play no part.
        self.xray_check = XrayCheck.load()
        self.lungs_checkpoint = None  # None: the shipped lung model (segment.py); False: none
        self._segmenter = None
        self._explainer = None
        # Held around every forward (and CAM backward) pass: the hooks on the networks are
        # shared, so two threads at once would mix up each other's activations. Re-entrant, so a
        # caller (the app) can hold it around a whole analysis.
        self.lock = threading.RLock()

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | None = None) -> "Predictor":
        """The shipped model, a bundled one by name ("lung-reader", "recipe-2020": checkpoint.BUNDLED)
        or the checkpoint at `path`, ready to predict: its batch norms are folded into the
        convolutions (`model.fold_batch_norms`). To train or save weights, build the network from
        `load_checkpoint` instead."""
        path = checkpoint_path(path)
        state, config = load_checkpoint(path)
        ood = OutOfDistribution.from_checkpoint(state, config)
        model = build_model(config["arch"], len(config["classes"]))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise CheckpointError(
                f"{path}: weights do not fit architecture {config['arch']!r} with "
                f"{len(config['classes'])} classes: {str(error).splitlines()[0]}") from error
        # A loaded model only predicts: batch norms folded into the convolutions (model.py).
        predictor = cls(fold_batch_norms(model), config, device, ood)
        predictor.segmenter  # fail closed: a missing or damaged lung model stops here, named
        return predictor

    @property
    def classes(self) -> list[str]:
        return list(self.config["classes"])

    @property
    def framing_recipe(self) -> dict | None:
        """What part of the image the network reads (framing.py); None: the whole image."""
        return self.config.get("framing")

    @property
    def temperature(self) -> float:
        """Logits are divided by this before the softmax (calibration.py); 1 when uncalibrated."""
        return float(self.config.get("calibration", {}).get("temperature", 1.0))

    def view(self, gray: np.ndarray) -> tuple[torch.Tensor, Framing]:
        """(the network's input (1, S, S) uint8, where it was cut from) for a grayscale image as
        `load_grayscale` returns it: the lungs' box when the checkpoint reads the lungs, else the
        whole image."""
        recipe = self.framing_recipe
        segmenter = self.segmenter if uses_lungs(recipe) else None
        if uses_lungs(recipe) and segmenter is None:
            raise CheckpointError("this checkpoint reads the lungs only, and no lung model was found "
                                  f"({recipe.get('lungs')})")
        return frame(gray, recipe, self.config["input_size"], self.config["normalisation"]["method"] == "equalize",
                     segmenter)

    def frame_files(self, paths: list, cache_dir: str | Path | None = ".cache",
                    description: str = "framing") -> torch.Tensor:
        """Many image files as the network reads them, (N, 1, S, S) uint8: `view` for each, batched
        and cached on disk (framing.frame_all), for measuring a checkpoint over a data set."""
        recipe = self.framing_recipe
        images, _ = frame_all([str(p) for p in paths], recipe, self.config["input_size"],
                              self.config["normalisation"]["method"] == "equalize",
                              self.segmenter if uses_lungs(recipe) else None, cache_dir, description=description)
        return images

    def prepare(self, image) -> torch.Tensor:
        """(1, S, S) uint8 tensor for a path, PIL image or numpy array."""
        return self.view(load_grayscale(image))[0]

    def model_input(self, batch: torch.Tensor) -> torch.Tensor:
        """Prepared uint8 images (N, 1, S, S) as the normalised float tensor the network takes."""
        norm = self.config["normalisation"]
        inputs = normalise(batch.to(self.device), norm["mean"], norm["std"])
        return inputs.contiguous(memory_format=torch.channels_last)

    def probabilities(self, batch: torch.Tensor, chunk: int = 64) -> np.ndarray:
        """Softmax probabilities (N, C) for prepared uint8 images (N, 1, S, S), `chunk` at a time."""
        return self.probabilities_and_features(batch, chunk)[0]

    def add_forward_check(self, check) -> None:
        """Call `check(module, inputs)` before each forward pass of the classifier and of the
        explainer's copy (a pre-hook): it may raise to stop the work (limits.stop_if_cancelled)."""
        self.model.register_forward_pre_hook(check)
        if self._explainer is not None:
            self._explainer.model.register_forward_pre_hook(check)

    def probabilities_and_features(self, batch: torch.Tensor, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (N, C), penultimate features (N, D)) from one forward pass."""
        with self.lock:
            return self._probabilities_and_features(batch, chunk)

    @torch.inference_mode()
    def _probabilities_and_features(self, batch: torch.Tensor, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        self.model.eval()
        probabilities, features = [], []
        hook = FeatureHook(self.model)  # removed again below: the model may be shared (training)
        try:
            for start in range(0, len(batch), chunk):
                with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
                    logits = self.model(self.model_input(batch[start:start + chunk]))
                probabilities.append(torch.softmax(logits.float() / self.temperature, dim=1).cpu())
                features.append(hook.features.cpu())
        finally:
            hook.remove()
        if not probabilities:
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0, 0), np.float32)
        return torch.cat(probabilities).numpy(), torch.cat(features).numpy()

    def input_check(self, gray: np.ndarray, colourfulness: float, features: np.ndarray | None = None
                    ) -> tuple[list[str], list[str]]:
        """(reasons to refuse the image as no frontal chest X-ray, warnings for an X-ray that is
        read all the same) for a grayscale image as `load_image` returns it.

        The refusal rests on evidence that does not depend on this classifier (xray_check.py:
        size, colour, gray levels, lungs found by the lung model); the distance of the
        classifier's features from its training images (ood.py) only warns, and only of an image
        that is read (its words are for an X-ray)."""
        finding = self.xray_check.examine(gray, colourfulness, self.segmenter)
        warnings = list(finding.warnings)
        if self.ood is not None and features is not None and not finding.reasons:
            distance = float(self.ood.distance(np.asarray(features).reshape(1, -1))[0])
            warnings += self.ood.warnings(distance)
        return list(finding.reasons), warnings

    def prediction(self, probabilities: np.ndarray, features: np.ndarray | None, gray: np.ndarray,
                   colourfulness: float, framed: Framing | None = None) -> Prediction:
        """The `Prediction` for one image's probabilities (C,) and penultimate features: refused
        when the input check calls it no chest X-ray; its warnings are the input check's, the
        feature distance's and the framing's (no lungs found)."""
        index = int(self.decide(np.asarray(probabilities)[None])[0])
        reasons, warnings = self.input_check(gray, colourfulness, features)
        if framed is not None and not reasons:
            warnings += [warning for warning in framed.warnings if warning not in warnings]
        return Prediction(decided=self.classes[index],
                          probabilities={c: float(p) for c, p in zip(self.classes, probabilities)},
                          warnings=reasons + warnings, reasons=reasons, decision=self.config.get("decision"))

    def ood_scores(self, image) -> tuple[float, float, tuple[int, int]]:
        """(feature distance, colourfulness, (height, width)): what the feature warning tests."""
        gray, colour = load_image(image)
        _, features = self.probabilities_and_features(self.prepare(gray)[None])
        return float(self.ood.distance(features)[0]), colour, gray.shape

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        return decide(probabilities, self.classes, self.config.get("decision"))

    @property
    def decision_rule(self) -> str:
        """The decision rule in words, for the app and the command line."""
        return decision_rule(self.config.get("decision"))

    def predict(self, image) -> Prediction:
        gray, colour = load_image(image)
        tensor, framed = self.view(gray)
        probabilities, features = self.probabilities_and_features(tensor[None])
        return self.prediction(probabilities[0], features[0], gray, colour, framed)

    @property
    def segmenter(self):
        """The lung segmentation model (segment.py), loaded on first use. It fails closed: the
        not-a-chest-X-ray check needs it, so a missing or damaged file raises `CheckpointError`
        naming it, never a quiet skip. None only where a predictor was built to read no lungs
        (`lungs_checkpoint = False`: the audit's randomised-weights copy, which makes maps only)."""
        if self._segmenter is None and self.lungs_checkpoint is not False:
            from .segment import SHIPPED_LUNGS, LungSegmenter

            self._segmenter = LungSegmenter.load(self.lungs_checkpoint or SHIPPED_LUNGS, self.device)
        return self._segmenter or None

    def segment_lungs(self, image) -> np.ndarray:
        """Boolean lung mask (H, W) at the image's own size."""
        if self.segmenter is None:
            raise CheckpointError("this predictor was built without a lung model (lungs_checkpoint is False)")
        return self.segmenter.segment(image)

    def explain(self, image, method: str = "gradcam", target: str | None = None, opacity: float = 0.4,
                max_side: int | None = None):
        """A class activation map for `target` (default: the predicted class), at the image's size
        or at most `max_side` pixels a side; see explain.py."""
        with self.lock:
            return self.explainer.explain(image, method=method, target=target, opacity=opacity, max_side=max_side)

    @property
    def explainer(self):
        """The CAM maker (explain.Explainer), built on first use: its own copy of the network."""
        with self.lock:
            if self._explainer is None:
                from .explain import Explainer

                self._explainer = Explainer(self)  # its copy of the network keeps the forward checks
            return self._explainer

    def deletion_curve(self, image, method: str = "gradcam", target: str | None = None):
        """How fast `target`'s probability (default: the decided class) falls as the map's hottest
        pixels are removed, against removing as many at random (occlusion.deletion_curve)."""
        from .occlusion import deletion_curve

        return deletion_curve(self, image, method, target)

    def occlusion(self, image, painted=None):
        """The image predicted as it is, with its lungs blanked and with all but its lungs
        blanked (occlusion.py): does the model need the evidence where its map puts it? With
        `painted` (a boolean mask, any size), as it is and with what it covers blanked."""
        from .occlusion import occlusion_test, painted_test

        return occlusion_test(self, image) if painted is None else painted_test(self, image, np.asarray(painted, bool))

    def predict_batch(self, images, batch_size: int = 32, progress: bool = False) -> list[Prediction]:
        images = list(images)
        results = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="predicting", unit="batch", disable=not progress):
            loaded = [load_image(image) for image in images[start:start + batch_size]]
            views = [self.view(gray) for gray, _ in loaded]
            probabilities, features = self.probabilities_and_features(torch.stack([tensor for tensor, _ in views]))
            results += [self.prediction(p, f, gray, colour, framed)
                        for p, f, (gray, colour), (_, framed) in zip(probabilities, features, loaded, views)]
        return results


class ModelShelf:
    """Predictors by name, each loaded the first time it is used (the app offers several, and a
    visitor may never pick one). `on_load(predictor)` runs once per loaded model (the app adds its
    cancellation check there). The first name is the default."""

    def __init__(self, paths: dict[str, Path | None], on_load=None, loaded: dict[str, Predictor] | None = None):
        if not paths:
            raise CheckpointError("no model to serve")
        # A model given already loaded (`loaded`) needs no path.
        self.paths = dict(paths)
        self._loaded: dict[str, Predictor] = dict(loaded or {})
        self.configs = {name: self._loaded[name].config if name in self._loaded else read_config(path)
                        for name, path in self.paths.items()}  # headers only: no weights loaded yet
        self.on_load = on_load
        self._lock = threading.Lock()

    @classmethod
    def bundled(cls, default: str | None = None, **kwargs) -> "ModelShelf":
        """The bundled models whose files are present (checkpoint.BUNDLED), `default` first."""
        names = [name for name in BUNDLED if checkpoint_path(name).is_file()]
        default = default or DEFAULT_MODEL
        names = sorted(names, key=lambda name: name != default)
        return cls({name: checkpoint_path(name) for name in names}, **kwargs)

    @classmethod
    def of(cls, checkpoint: str | Path | None = None, **kwargs) -> "ModelShelf":
        """For `--checkpoint`: every bundled model with the named one first, or a checkpoint file
        of one's own alone (by its file name)."""
        path = checkpoint_path(checkpoint)
        for name in BUNDLED:
            if checkpoint_path(name).resolve() == path.resolve():
                return cls.bundled(name, **kwargs)
        return cls({path.stem: path}, **kwargs)

    def on_each(self, prepare) -> None:
        """Run `prepare(predictor)` on each model loaded so far, and on each loaded later."""
        with self._lock:
            self.on_load = prepare
            for predictor in self._loaded.values():
                prepare(predictor)

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def forget_lung_answers(self) -> None:
        """Drop what the lung model(s) of the loaded models keep (segment.py): the app does at
        the start of each request, so that no request reuses, or can time, another's."""
        with self._lock:
            for predictor in self._loaded.values():
                if predictor._segmenter:
                    predictor._segmenter.forget()

    def load_all(self) -> None:
        """Load every model now (and with each its lung model): a server fails at start, naming
        the file, rather than at a visitor's first request for a damaged one."""
        for name in self.names:
            self[name]

    @property
    def default(self) -> str:
        return self.names[0]

    def title(self, name: str) -> str:
        return (self.configs[name].get("card") or {}).get("title") or name

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in self.paths

    def __getitem__(self, name: str) -> Predictor:
        with self._lock:
            if name not in self._loaded:
                predictor = Predictor.load(self.paths[name])
                # One lung model for them all: it answers the same image once, whichever
                # classifier's check or outline asks (segment.py keeps its last answers).
                shared = next((loaded.segmenter for loaded in self._loaded.values()
                               if loaded.lungs_checkpoint is None), None)
                if shared is not None and predictor.lungs_checkpoint is None:
                    predictor._segmenter = shared
                if self.on_load:
                    self.on_load(predictor)
                self._loaded[name] = predictor
            return self._loaded[name]
