"""The map test: the picked model (each, in the compare view) asked again with the lungs, or all
but them, filled with the image's median gray (occlusion.py); the `/occlusion` API. Does the
model need the evidence where its map puts it?

On the page a test's result, or why there is none, goes in the test's own result area with
the image the first model read, in place of the previous test's; the API raises the error.
"""

from __future__ import annotations

import html

import gradio as gr
import numpy as np
from PIL import Image

from ..data import ImageLoadError, load_image
from ..explain import shrink
from ..framing import uses_lungs
from ..occlusion import AS_IS, BLANKED, LUNGS_LEFT, OUTSIDE_LEFT, PAINTED_OVER
from .analysis import DISPLAY_SIDE, file_path, problems, quoted
from .state import COMPARE, PREDICTED, XrayApp

LUNG_READER_MAP_TEST = ("This model reads only the lungs' box, found by the lung model: with the lungs blanked there "
                        "is nothing left for it to read. Its map cannot stray outside the lungs; the eraser still "
                        "tests what lies inside the box.")
NO_LUNGS_TO_BLANK = "This does not look like a frontal chest X-ray: there are no lungs to blank."
TEST_FAILED = "### No test"  # the headline of a test that could not run, in its result area


def blank(app: XrayApp, file, view, blanked: str):
    """The page's two buttons: (text, image, image box) of the map test for the picked model, or
    for each in the compare view; why not, in the test's own area, when it cannot run."""
    return shown_on_page(lambda: map_test(app, file, tested_models(app, view), BLANKED[blanked], blanked))


def occlusion_api(app: XrayApp, file, blanked="lungs", model=None, painted=None):
    """(text, image, numbers) for one model: the `/occlusion` API. `blanked`: "lungs", "outside"
    (all but the lungs) or "painted" (what the mask image `painted` marks, white where to blank)."""
    if blanked not in (*BLANKED, "painted"):
        raise gr.Error(f"Blank the lungs, the outside or what is painted, not {quoted(blanked)}.", print_exception=False)
    model = model or app.models.default
    found = problems(app, "gradcam", PREDICTED, 0.4, model, views=app.names)
    if found:
        raise gr.Error(html.escape(found["model"], quote=False), print_exception=False)
    if blanked == "painted":
        text, image, numbers = map_test(app, file, [model], PAINTED_OVER, blanked, painted_file_mask(painted))
    else:
        text, image, numbers = map_test(app, file, [model], BLANKED[blanked], blanked)
    return text, image, numbers[model]


def map_test(app: XrayApp, file, names: list[str], view: str, blanked: str, painted=None):
    """The map test of `file` for each model named (Predictor.occlusion) as (text, the image
    `view` the first model read, the numbers by model). A model that reads only the lungs' box
    cannot have its lungs blanked: the text says so."""
    path = file_path(file)
    texts, numbers, shown = [], {}, None
    for name in names:
        predictor = app.models[name]
        if uses_lungs(predictor.framing_recipe) and painted is None:
            texts.append((name, LUNG_READER_MAP_TEST))
            continue
        try:
            test = predictor.occlusion(path, painted=painted)
        except ImageLoadError as error:
            raise gr.Error(html.escape(str(error), quote=False), print_exception=False) from error
        if test.not_an_xray:
            raise gr.Error(NO_LUNGS_TO_BLANK, print_exception=False)
        if shown is None:
            shown = (np.clip(shrink(test.views[view], DISPLAY_SIDE), 0, 1) * 255).round().astype(np.uint8)
        numbers[name] = {"blanked": blanked, "as_is": test.probabilities[AS_IS],
                         "blanked_probabilities": test.probabilities[view], "decided_as_is": test.decided[AS_IS],
                         "decided_blanked": test.decided[view]}
        texts.append((name, occlusion_text(test, view)))
    if len(names) == 1 and not numbers:
        raise gr.Error(LUNG_READER_MAP_TEST, print_exception=False)
    text = texts[0][1] if len(names) == 1 else "\n\n".join(
        f"#### {html.escape(app.title(name))}\n{said}" for name, said in texts)
    return text, None if shown is None else Image.fromarray(shown), numbers


def tested_models(app: XrayApp, view) -> list[str]:
    if view == COMPARE:
        return app.names
    if view not in (None, "") and view not in app.models:
        raise gr.Error(f"Unknown model {quoted(view)}.", print_exception=False)
    return [view or app.models.default]


def shown_on_page(test):
    """(text, image, the image's box update) of a test run on the page: its result, or why it
    could not run in the test's own area, where the previous test's result was."""
    try:
        text, image, _ = test()
    except gr.Error as error:
        return f"{TEST_FAILED}\n{error.message}", None, gr.update(visible=False)
    return text, image, gr.update(visible=image is not None)


def painted_file_mask(file) -> np.ndarray:
    """The mask of `/occlusion`'s "painted": an image file (any size; it is stretched over the
    X-ray), white or any bright pixel where to blank."""
    if not file:
        raise gr.Error("Blanking what is painted needs the mask: an image, white where to blank.",
                       print_exception=False)
    try:
        gray, _ = load_image(file_path(file))
    except ImageLoadError as error:
        raise gr.Error(html.escape(f"the mask: {error}", quote=False), print_exception=False) from error
    mask = gray > 0.5
    if not mask.any():
        raise gr.Error("The mask marks nothing: paint white where to blank.", print_exception=False)
    return mask


def occlusion_text(test, view: str) -> str:
    """The map test's result in words, for a student: the probabilities before and after, and
    what the change means for this image."""
    decided = test.decided[AS_IS]
    before, after = test.probabilities[AS_IS][decided], test.probabilities[view][decided]
    now = test.decided[view]
    what = {OUTSIDE_LEFT: "the lungs blanked", LUNGS_LEFT: "only the lungs left",
            PAINTED_OVER: "what you painted over blanked"}[view]
    says = f"still says **{now}**" if now == decided else f"now says **{now}**"
    text = (f"**With {what}**: {decided} {after:.0%} (as it is: {before:.0%}); the model {says}.\n\n"
            + ", ".join(f"{name} {p:.0%}" for name, p in test.probabilities[view].items()) + ".\n\n")
    if view == PAINTED_OVER:
        if now == decided:
            return text + f"It still says {decided}: on this image it did not need what you painted over."
        return text + (f"Without what you painted over it no longer says {decided}: that was part of its answer "
                       "(a shortcut, if it was not lung).")
    if view == OUTSIDE_LEFT:
        if now == decided and decided == "normal":
            # Nothing to see is what "normal" means: blank lungs show no disease, so staying
            # normal says nothing about a shortcut. A change away from normal would.
            return text + ("It still says normal: with the lungs blanked there is no disease left to see, so this "
                           "is what a model reading the lungs would say too. Try \"Blank all but the lungs\": a "
                           "model reading the lungs still says normal from them alone.")
        if now == decided:
            return text + (f"It still says {decided} without seeing the lungs: on this image its evidence for "
                           f"{decided} does not need them. It may be reading a border, a marker or the look of "
                           "the film (a shortcut).")
        return text + f"Without the lungs it no longer says {decided}: it needed them for that answer."
    if now == decided:
        return text + f"The lungs alone carry its answer: with everything else blanked it still says {decided}."
    return text + (f"With only the lungs it no longer says {decided}: what lies outside them was part of "
                   "its answer.")
