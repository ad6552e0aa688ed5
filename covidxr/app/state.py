"""`XrayApp`: what every view of the page shares, and nothing of how the page looks.

- `models`: the models offered (predictor.ModelShelf), loaded on first use; the first is the
  default. A visitor picks one, or compares them all (COMPARE).
- `kept`: what each page session analysed (sessions.py), so a view picked again runs no model
  and a new opacity only re-blends.
- `examples`: the example X-rays found on disk (examples.py).
- `analyses`: the job runner (jobs.py): one analysis at a time, stoppable by a cancel, with the
  lung model's answers of the previous job forgotten first; `places` caps each client's.

The views (analysis.py, map_test.py, eraser.py, deletion.py, model_card.py) are plain functions
of an `XrayApp` and a request's values; layout.py wires them to the page.
"""

from __future__ import annotations

from pathlib import Path

from ..examples import available_examples
from ..predictor import ModelShelf, Predictor
from .jobs import AnalysisPlaces, OneAtATime, stop_if_cancelled
from .sessions import KeptMaps

COMPARE = "compare"  # the model choice that shows every model side by side
PREDICTED = "predicted class"  # the explained-class choice that means "the class the model decided"
MODEL_GROUP = "model"  # Gradio's concurrency group of every handler that runs a model
# Analyses one address may have waiting or running: a user needs one or two, several users
# behind one address (an office, a proxy) share them, and a script cannot fill the queue.
MAX_ANALYSES_PER_CLIENT = 8


class XrayApp:
    def __init__(self, predictor: Predictor | None = None, examples_dir: Path | None = None,
                 models: ModelShelf | None = None):
        # One model (a Predictor given, as with a checkpoint of one's own) or a shelf of several.
        self.models = models or ModelShelf({"model": None}, loaded={"model": predictor})
        # A cancelled analysis stops at its next forward pass, whichever model runs it.
        self.models.on_each(lambda loaded: loaded.add_forward_check(stop_if_cancelled))
        self.examples = available_examples(examples_dir) if examples_dir else available_examples()
        self.kept = KeptMaps()
        # Each job starts with nothing of another request's lung-model answers kept (segment.py
        # keeps them within a job), so no request can time whether another's X-ray was seen.
        self.analyses = OneAtATime(before_each=self.models.forget_lung_answers)
        self.places = AnalysisPlaces(MAX_ANALYSES_PER_CLIENT, MODEL_GROUP)

    @property
    def predictor(self) -> Predictor:
        """The default model (the examples' captions; the API's model when none is named)."""
        return self.models[self.models.default]

    @property
    def names(self) -> list[str]:
        return self.models.names

    @property
    def several(self) -> bool:
        return len(self.models.names) > 1

    @property
    def classes(self) -> list[str]:
        """Every class of the models offered, in order (the explained-class choices)."""
        return list(dict.fromkeys(c for name in self.names for c in self.models.configs[name]["classes"]))

    @property
    def views(self) -> list[str]:
        """What the model choice may name: a model, or COMPARE when there are several."""
        return self.names + ([COMPARE] if self.several else [])

    def shown_models(self, view: str | None) -> list[str]:
        """The models a view shows: every one for COMPARE, else the one named (default: the default)."""
        return self.names if view == COMPARE else [view or self.models.default]

    def title(self, name: str) -> str:
        return self.models.title(name)

    def lacks(self, name: str, explain_class) -> bool:
        """Whether model `name` has no class `explain_class` (the 2020 recipe has no pneumonia)."""
        return explain_class not in (None, "", PREDICTED) and explain_class not in self.models.configs[name]["classes"]
