"""The deletion curve: the pixels the picked model's map (each model's, in the compare view)
marks hottest are removed first, a growing share, then as many at random, and the explained
class's probability is plotted for both (occlusion.deletion_curve, pytorch-grad-cam's ROAD);
the `/deletion_curve` API. A map that points at what the model uses makes the probability fall
faster than chance does.

An input the not-a-chest-X-ray check refuses is refused before any curve is computed (one pass
per model, not the curve's dozens).
"""

from __future__ import annotations

import html

import gradio as gr

from ..data import ImageLoadError
from ..occlusion import plot_deletion
from .analysis import file_path, problems, refuse_problems
from .map_test import shown_on_page, tested_models
from .state import PREDICTED, XrayApp
from .jobs import stop_if_cancelled

NO_MAP_TO_TEST = "This does not look like a frontal chest X-ray: its map means nothing to test."


def deletion(app: XrayApp, file, method="gradcam", explain_class=PREDICTED, view=None):
    """The page's button: (text, plot, plot box) for the picked model, or every model in the
    compare view; why not, in the curve's own area, when it cannot be drawn."""
    return shown_on_page(lambda: curves(app, file, tested_models(app, view), method, explain_class))


def deletion_api(app: XrayApp, file, method="gradcam", explain_class=PREDICTED, model=None):
    """(text, plot, numbers) for one model: the `/deletion_curve` API."""
    model = model or app.models.default
    refuse_problems(problems(app, method, explain_class, 0.4, model, views=app.names))
    text, plot, numbers = curves(app, file, [model], method, explain_class)
    return text, plot, numbers[model]


def curves(app: XrayApp, file, names: list[str], method: str, explain_class):
    """(text, plot, numbers by model) of each named model's deletion curve."""
    refuse_problems(problems(app, method, explain_class, 0.4))
    path = file_path(file)
    try:
        for name in names:  # the input check first: a refused photo costs one pass, not a curve
            if app.models[name].predict(path).not_an_xray:
                raise gr.Error(NO_MAP_TO_TEST, print_exception=False)
    except ImageLoadError as error:
        raise gr.Error(html.escape(str(error), quote=False), print_exception=False) from error
    texts, drawn, numbers = [], {}, {}
    for name in names:
        predictor = app.models[name]
        target = explain_class if explain_class in predictor.classes else None
        curve = predictor.deletion_curve(path, method, target)
        stop_if_cancelled()
        numbers[name] = {"target": curve.target, "method": curve.method, "removed": list(curve.removed),
                         "as_is": curve.as_is, "by_map": curve.by_map, "at_random": curve.at_random, "gap": curve.gap}
        drawn[app.title(name)] = curve
        said = deletion_text(curve)
        texts.append(said if len(names) == 1 else f"#### {html.escape(app.title(name))}\n{said}")
    return "\n\n".join(texts), plot_deletion(drawn), numbers


def deletion_text(curve) -> str:
    """The deletion curve in words, for a student: what removing the map's hottest pixels did,
    against removing as many at random, at one share and on average over them all."""
    share = curve.removed.index(0.2) if 0.2 in curve.removed else len(curve.removed) // 2
    text = (f"With the {curve.removed[share]:.0%} of pixels the map marks hottest removed: {curve.target} "
            f"{curve.by_map[share]:.0%} (as it is: {curve.as_is:.0%}; the same share removed at random: "
            f"{curve.at_random[share]:.0%}). Over every share removed ({curve.removed[0]:.0%} to "
            f"{curve.removed[-1]:.0%}), {curve.target} is on average {abs(curve.gap):.0%} "
            f"{'lower' if curve.gap >= 0 else 'higher'} when the map picks the pixels than when chance does: ")
    if curve.gap >= 0.10:
        return text + "the map points at what the model uses."
    if curve.gap >= 0.03:
        return text + "the map points at some of what the model uses."
    if curve.gap > -0.03:
        return text + ("removing what the map marks costs about as much as removing pixels at random: on this image "
                       "the map says little about what the model uses (it may read the film as a whole).")
    return text + "the map does not point at what the model uses."
