"""The file test: the picked model (each, in the compare view) asked again with the same X-ray
compressed, smaller and blurred (quality.held), the verdicts side by side and what they mean;
the `/quality` API. The lungs are the same in every copy: a model whose answer moves reads the
file's quality, not the disease (issue 35, MODEL_CARD's quality audit).
"""

from __future__ import annotations

import html

import gradio as gr

from .. import quality
from ..data import ImageLoadError
from .analysis import file_path, problems
from .map_test import TEST_FAILED, tested_models
from .state import PREDICTED, XrayApp


def file_test(app: XrayApp, file, view=None) -> str:
    """The page's button: the verdicts side by side, for the picked model or every model; why
    not, in the test's own area, when it cannot run."""
    try:
        text, _ = tested(app, file, tested_models(app, view))
    except gr.Error as error:
        return f"{TEST_FAILED}\n{error.message}"
    return text


def quality_api(app: XrayApp, file, model=None):
    """(text, numbers) for one model: the `/quality` API. numbers: each copy's label and
    probabilities, and whether the label held."""
    model = model or app.models.default
    found = problems(app, "gradcam", PREDICTED, 0.4, model, views=app.names)
    if found:
        raise gr.Error(html.escape(found["model"], quote=False), print_exception=False)
    text, numbers = tested(app, file, [model])
    return text, numbers[model]


def tested(app: XrayApp, file, names: list[str]):
    """(text, numbers by model) of the file test of each named model."""
    path = file_path(file)
    results = {}
    for name in names:
        try:
            results[name] = quality.held(app.models[name], path)
        except ImageLoadError as error:
            raise gr.Error(html.escape(str(error), quote=False), print_exception=False) from error
    first = next(iter(results.values()))
    if first.verdicts[quality.AS_IS].status != "result":
        raise gr.Error("This image gets no result as it is, so there is no answer to hold.", print_exception=False)
    copies = list(first.verdicts)
    rows = ["| model | " + " | ".join(copies) + " |", "|---|" + "---|" * len(copies)]
    for name, result in results.items():
        cells = [cell(verdict, result.target) for verdict in result.verdicts.values()]
        rows.append(f"| {html.escape(app.title(name))} | " + " | ".join(cells) + " |")
    words = [result.words() if len(results) == 1 else f"**{html.escape(app.title(name))}:** {result.words()}"
             for name, result in results.items()]
    numbers = {name: {"label_held": result.label_held, "changed_under": result.changed,
                      "copies": {copy: {"label": verdict.shown_label, "probabilities": dict(verdict.probabilities)}
                                 for copy, verdict in result.verdicts.items()}}
               for name, result in results.items()}
    return "\n".join(rows) + "\n\n" + "\n\n".join(words), numbers


def cell(verdict, target: str) -> str:
    """A copy's verdict in a table cell: its label and the followed class's probability."""
    if verdict.status != "result":
        return verdict.shown_label
    return f"**{verdict.label}** ({target} {verdict.probabilities.get(target, 0):.0%})"
