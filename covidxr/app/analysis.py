"""The analysis view: one model's label, probabilities and heatmap for one file, or every
model's side by side (COMPARE); the `/predict` API; re-blending at a new opacity.

`analysed` is the one analysis (one model, one file): the upload, an example click, a change of
model, view, method or class and `/predict` all go through it. What it says is the analysis's
verdict (report.py), as in the CLI and `Predictor`. With a page session, what it analysed is
kept (sessions.py), so a view picked again runs no model and a new opacity only re-blends.

`page` turns analyses into the page's outputs (PAGE_OUTPUTS, then three per compare column):
every new result also clears the map test, the eraser and the deletion curve, which belonged
to the previous image. A file that cannot be analysed gets its reason in the result area
(`failed`), in place of the previous verdict.
"""

from __future__ import annotations

import hashlib
import html
import logging
import os
from pathlib import Path

import gradio as gr
from PIL import Image

from .. import report
from ..data import ImageLoadError
from ..explain import METHODS
from .gradio_fixes import label_data
from .model_card import card, facts
from .sessions import Shown
from .state import COMPARE, PREDICTED, XrayApp

log = logging.getLogger("covidxr.serve")

# The two images go back at most this many pixels a side: twice the box they are shown in. A
# 1-megapixel upload no longer pays for its colour mapping, JPEG encoding, transfer and drawing
# at full size (1024 cost 34 ms a result in the overlay alone). The model reads the full image,
# and lung focus is scored at one size whatever is shown (explain.SCORING_SIDE).
DISPLAY_SIDE = 768
# What the page's analysis handlers return, in order (layout's `outputs`), then three per
# compare column (its text, probabilities and map) when there are several models.
PAGE_OUTPUTS = ("probabilities", "original", "overlay", "summary", "kept", "occlusion_result", "occluded",
                "occluded_box", "eraser", "eraser_box", "deletion_result", "deletion_plot", "deletion_box", "file_test_result",
                "card", "facts", "single_view", "compare_view")
NO_TEST = ("", None, gr.update(visible=False))  # a test's words, image and its box: cleared by each new result


def problems(app: XrayApp, method, explain_class, opacity, view=None, views=None) -> dict[str, str]:
    """What is wrong with a request's settings, by parameter name; empty when nothing is. The
    API accepts any JSON, so nothing is assumed of the types, and a refused value is quoted
    short: a 100,000-character one does not come back."""
    found = {}
    if not isinstance(method, str) or method not in METHODS:
        found["method"] = f"Unknown explanation method {quoted(method)}; choose one of {', '.join(METHODS)}."
    if not (explain_class in (None, "") or isinstance(explain_class, str) and explain_class in (PREDICTED, *app.classes)):
        found["explain_class"] = f"Unknown class {quoted(explain_class)}; choose one of {', '.join([PREDICTED, *app.classes])}."
    if isinstance(opacity, bool) or not isinstance(opacity, (int, float)) or not 0 <= opacity <= 1 \
            or opacity != opacity:
        found["opacity"] = f"Opacity must be a number from 0 to 1, not {quoted(opacity)}."
    views = app.views if views is None else views
    if view not in (None, "") and not (isinstance(view, str) and view in views):
        found["model"] = f"Unknown model {quoted(view)}; choose one of {', '.join(views)}."
    return found


def refuse_problems(found: dict[str, str]) -> None:
    if found:
        raise gr.Error(html.escape(" ".join(found.values()), quote=False), print_exception=False)


def analysed(app: XrayApp, file, model: str, method: str = "gradcam", explain_class: str = PREDICTED,
             opacity: float = 0.4, session: str | None = None) -> Shown:
    """One model's analysis of a file, as shown (sessions.Shown, with its verdict). With a
    `session`, kept for that page session: the same file, model, method and class asked again is
    not run again. A file that cannot be analysed raises `gr.Error` with the reason."""
    path = file_path(file)
    predictor = app.models[model]
    # A class this model does not have (the 2020 recipe has no pneumonia): its predicted class.
    target = explain_class if explain_class in predictor.classes else None
    key = None
    if session and path.is_file():
        key = app.kept.key_for(session, digest(path), model, method, target or PREDICTED)
        kept = app.kept.get(key)
        if kept is not None:
            return kept
    try:
        explanation = predictor.explain(path, method=method, target=target, opacity=float(opacity),
                                        max_side=DISPLAY_SIDE)
    except ImageLoadError as error:
        # An expected refusal: one line in the log, no traceback; the file named once. An upload
        # is deleted at once (nothing of it is kept or served back).
        message = str(error) if str(error).startswith(path.name) else f"{path.name}: {error}"
        log.info("refused an upload: %s", message)
        delete_upload(path)
        raise gr.Error(html.escape(message, quote=False), print_exception=False) from error
    verdict = explanation.verdict
    shown = Shown.of(explanation.image, explanation.heatmap,
                     explanation.lung_mask if verdict.evidence_shown else None, verdict)
    if key is not None:
        shown.key = app.kept.keep(shown, key)
    return shown


def predict_api(app: XrayApp, file, method="gradcam", explain_class=PREDICTED, opacity=0.4, model=None):
    """(label, original, overlay, summary) for one file and one model (default: the default
    model): the `/predict` API. It keeps no map: the API never re-blends, and its calls would
    push page visitors' maps out of the shared table."""
    refuse_problems(problems(app, method, explain_class, opacity, model, views=app.names))
    model = model or app.models.default
    shown = analysed(app, file, model, method, explain_class, opacity)
    return label_data(shown.verdict), Image.fromarray(shown.image), shown.overlay(float(opacity)), \
        summary(app, shown.verdict, model, explain_class)


def show(app: XrayApp, file, method="gradcam", explain_class=PREDICTED, opacity=0.4, view=None, session=None):
    """The page's outputs for the chosen model's analysis, or every model's (COMPARE). A file that
    cannot be analysed gets its reason in the result area, in place of the previous verdict (a
    toast alone goes after a few seconds, and the old result would stay as if it were this file's)."""
    view = view or app.models.default
    try:
        refuse_problems(problems(app, method, explain_class, opacity, view))
        shown = [analysed(app, file, name, method, explain_class, opacity, session) for name in app.shown_models(view)]
        return page(app, view, shown, explain_class, opacity)
    except gr.Error as error:
        return failed(app, error.message, view)


def show_new(app: XrayApp, file, method="gradcam", explain_class=PREDICTED, opacity=0.4, view=None, session=None):
    """A new image (an upload or an example): the explained class goes back to the predicted
    one, on the page too, so the evidence shown first is always for the prediction."""
    return (PREDICTED, *show(app, file, method, PREDICTED, opacity, view, session))


def show_example(app: XrayApp, index, method, explain_class, opacity, view=None, session=None):
    """An example clicked: its file goes into the upload box and is analysed, in one request."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(app.examples):
        raise gr.Error(f"There is no example {quoted(index)}.", print_exception=False)
    path = str(app.examples[index][0])
    return (path, *show_new(app, path, method, explain_class, opacity, view, session))


def show_another(app: XrayApp, file, method, explain_class, opacity, view=None, session=None):
    """Another file chosen over the one shown: it goes into the upload box and is analysed. One
    that could not be read is deleted at once (`analysed`): the box is then emptied, and the
    result area says why."""
    path = file_path(file)
    outputs = show_new(app, file, method, explain_class, opacity, view, session)
    return (str(path) if path.exists() else None, *outputs)


def reanalyse(app: XrayApp, file, method, explain_class, opacity, view=None, session=None):
    """A changed model, method or class: analyse again (what this session analysed before comes
    from the kept table); while no file is loaded, the result area stays empty."""
    if not file:
        return cleared(app, view)[1:]
    return show(app, file, method, explain_class, opacity, view, session)


def cleared(app: XrayApp, view=None):
    """The upload cleared: the result goes with it, and the explained class is reset. No model."""
    view = view if view in app.views else app.models.default
    return (PREDICTED, *page(app, view, []))


def page(app: XrayApp, view: str, shown: list[Shown], explain_class=PREDICTED, opacity: float = 0.4):
    """The page's outputs (PAGE_OUTPUTS, then the compare columns) for the analyses `shown` (one
    per model in the compare view; one otherwise): the single view filled and the compare view
    empty, or the other way round."""
    compare = view == COMPARE
    # What a re-blend needs: each analysis's key (one kept without a session gets a random,
    # unguessable one: nothing is shared between sessions).
    kept = {"view": view, "keys": [item.key or app.kept.keep(item) for item in shown]} if shown else None
    single = [None, None, None, ""]
    if shown and not compare:
        item = shown[0]
        single = [label_data(item.verdict), Image.fromarray(item.image), item.overlay(float(opacity)),
                  summary(app, item.verdict, view, explain_class)]
    columns = []
    for index, name in enumerate(app.names if app.several else []):
        item = shown[index] if compare and shown else None
        heading = f"#### {html.escape(app.title(name))}\n"
        columns += [heading + (column_text(app, item, name, explain_class) if item else ""),
                    label_data(item.verdict) if item else None,
                    item.overlay(float(opacity)) if item else None]
    return (*single, kept, *NO_TEST, None, gr.update(open=False), *NO_TEST, "", card(app, view), facts(app, view),
            gr.update(visible=not compare), gr.update(visible=compare), *columns)


def failed(app: XrayApp, message: str = "The analysis failed unexpectedly; try again, or try another file.",
           view=None):
    """The result area for an input that could not be analysed: the error's verdict, no images."""
    outputs = list(page(app, view if view in app.views and view != COMPARE else app.models.default, []))
    verdict = report.failure(message)
    outputs[0], outputs[3] = label_data(verdict), report.markdown(verdict)
    return tuple(outputs)


def summary(app: XrayApp, verdict, model: str, explain_class) -> str:
    """The verdict in words (report.markdown), with a word when the model lacks the class asked for."""
    text = report.markdown(verdict)
    if app.lacks(model, explain_class):
        text += f"\n\n*{html.escape(app.title(model))} has no {explain_class} class: the heatmap is for its prediction.*"
    return text


def column_text(app: XrayApp, shown: Shown, name: str, explain_class) -> str:
    """One model's column in the compare view (report.brief)."""
    text = report.brief(shown.verdict)
    if app.lacks(name, explain_class):
        text += f"  \n*No {explain_class} class: map of its prediction.*"
    return text


def reblend(app: XrayApp, kept, opacity):
    """The overlays at a new opacity from the kept maps: no model. A map no longer kept leaves
    its overlay as it is. Outputs: the single view's overlay, then each compare column's."""
    columns = len(app.names) if app.several else 0
    skipped = [gr.skip()] * (1 + columns)
    found = problems(app, "gradcam", PREDICTED, opacity)
    if found or not isinstance(kept, dict):
        if found:
            gr.Warning(html.escape(found["opacity"], quote=False))
        return tuple(skipped) if columns else skipped[0]
    shown = [app.kept.get(key) for key in kept.get("keys", [])]
    if not shown or any(item is None for item in shown):
        gr.Info("This analysis is no longer kept: choose the method again to redo it.")
        return tuple(skipped) if columns else skipped[0]
    overlays = [item.overlay(float(opacity)) for item in shown]
    result = [*skipped[:1], *overlays] if kept.get("view") == COMPARE else [overlays[0], *skipped[1:]]
    return tuple(result) if columns else result[0]


def example_captions(app: XrayApp) -> list[str]:
    """What each example is, what the default model calls it, and what to try (HTML: Gradio shows
    text examples cut at 60 characters). From the model at hand, so they stay true when it changes."""
    captions = []
    predictor = app.predictor
    for path, row in app.examples:
        truth = row["label"]
        try:
            label = predictor.predict(path).label
        except ImageLoadError as error:  # a damaged copy: the app still starts, and says so
            said = html.escape(str(error))
        else:
            if label is None:  # the input check refuses it
                said = f"{report.NOT_AN_XRAY_HEADLINE}, says the input check: no result."
            elif truth in predictor.classes and label != truth:
                said = f"The model says {label}: it misses {truth}. <i>Try: explain {truth}.</i>"
            else:
                said = f"The model says {label}" + (" (correct)." if truth == label else ".")
        captions.append(f"<b>{html.escape(row.get('caption') or row['why'])}</b><br>{said}")
    return captions


def file_path(file) -> Path:
    """The path of an uploaded file (a path, or Gradio's file object); refused when there is none."""
    if not file:
        raise gr.Error("Upload a chest X-ray (PNG, JPEG or DICOM) or click an example first.", print_exception=False)
    return Path(file if isinstance(file, (str, Path)) else file.name)


def digest(path: Path) -> str:
    """The file's bytes as a key: the same X-ray uploaded again (a new temp path) is found again."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def delete_upload(path: Path) -> None:
    """Delete a refused upload from the app's temp folder at once (never an example or a file
    elsewhere: the API also takes paths the app itself handed out)."""
    folder = os.environ.get("GRADIO_TEMP_DIR")
    try:
        if folder and path.resolve().is_relative_to(Path(folder).resolve()):
            path.unlink(missing_ok=True)
            if not any(path.parent.iterdir()):
                path.parent.rmdir()
    except OSError:
        pass


def quoted(value) -> str:
    text = repr(value)
    return text if len(text) <= 30 else text[:30] + "..."
