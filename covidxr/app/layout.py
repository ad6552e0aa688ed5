"""The page: its components, section by section, and which handler (handlers.py) each event runs.
No logic lives here: what a handler returns is decided by the views, what the page says by
words.py, report.py and model_card.py.

One request per user action: the upload, each change of model, method or class, each example
click, each test button; a new opacity only re-blends the kept map (tests/test_app.py counts
the requests in Chromium). Handlers that run a model join the queue's model group (one at a time,
a few places per client); the others are not queued at all.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ..examples import FETCH_COMMAND
from ..legend import LEGEND_HTML
from . import analysis, model_card, words
from .gradio_fixes import decided_label, saved_once, upload_path
from .handlers import Handlers
from .sessions import KEPT_FOR_S
from .state import COMPARE, MODEL_GROUP, PREDICTED, XrayApp

# Uploads and results are deleted this long after they were made; the check runs as often.
FILE_LIFETIME_S = 3600
QUEUE_SIZE = 64  # analyses waiting or running, all clients together
IMAGE_HEIGHT = 320  # the result's two images: both in sight under the controls at 1280 x 800


def build(app: XrayApp) -> gr.Blocks:
    page = SimpleNamespace()  # every component, by name, as the sections below make them
    with gr.Blocks(title=words.TITLE, analytics_enabled=False,
                   delete_cache=(FILE_LIFETIME_S, FILE_LIFETIME_S)) as demo:
        gr.Markdown(words.HEADER)
        gr.Markdown(words.NOTICE, elem_id="notice")
        page.kept = gr.State(None, time_to_live=KEPT_FOR_S)  # this session's analyses: keys into app.kept
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                inputs(app, page)
            with gr.Column(scale=2, elem_id="result"):
                controls(app, page)
                single_view(app, page)
                compare_view(app, page)
                page.card = gr.Markdown(model_card.card(app, app.models.default), visible=app.several,
                                        elem_id="model-card")
                tests(page)
        about(app, page)
        api_inputs(app, page)
        wire(app, Handlers(app), page)
    # One analysis at a time: the explainers' hooks are not thread-safe, and two CPU-bound
    # analyses would only slow each other down. api_open=False: a queued handler is reached only
    # through the queue (the page, /call/NAME, gradio_client), never run directly by /run/NAME,
    # which would pass both the one-at-a-time rule and the places per client.
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE, api_open=False)
    app.places.attach(demo._queue)
    return demo


def inputs(app: XrayApp, page) -> None:
    """The upload, another file over it, and the examples with their captions."""
    page.upload = upload_path(gr.File(label="Chest X-ray (PNG, JPEG or DICOM)", file_count="single",
                                      elem_id="upload", height=140))
    page.another = upload_path(gr.UploadButton("Choose another X-ray", file_count="single", size="sm",
                                               elem_id="another", elem_classes=["test-button"]))
    page.examples = None
    if app.examples:
        page.examples = gr.Dataset(
            components=[gr.Image(visible=False), gr.HTML(visible=False)],
            samples=[[str(path), caption] for (path, _), caption in zip(app.examples, analysis.example_captions(app))],
            headers=["", "What it is, and what the model says"], type="index", layout="table",
            samples_per_page=len(app.examples), label="Or click an example", elem_id="examples")
    else:
        gr.Markdown(words.NO_EXAMPLES.format(command=FETCH_COMMAND))


def controls(app: XrayApp, page) -> None:
    """The model (or every model), the explanation method, the explained class, the opacity."""
    config = app.predictor.config
    page.view = gr.Radio([(app.title(name), name) for name in app.names]
                         + ([("Compare all", COMPARE)] if app.several else []), value=app.models.default,
                         label="Model", visible=app.several, elem_id="model")
    with gr.Row():
        page.method = gr.Dropdown(model_card.method_choices(config), value="gradcam", label="Explanation method",
                                  info=model_card.method_info(config), scale=5, min_width=300, elem_id="method")
        page.explain_class = gr.Radio([PREDICTED, *app.classes], value=PREDICTED, scale=4, min_width=260,
                                      label="Explain the evidence for", elem_id="explain-class")
        page.opacity = gr.Slider(0.0, 1.0, value=0.4, step=0.05, label="Heatmap opacity", scale=2, min_width=160,
                                 elem_id="opacity")


def single_view(app: XrayApp, page) -> None:
    """One model's result in full: the input and the heatmap first, then the verdict and the bars."""
    with gr.Column(elem_id="single-view") as page.single_view:
        with gr.Row(equal_height=False):
            with gr.Column(min_width=260):
                gr.Markdown(words.INPUT_CAPTION, elem_classes=["caption"])
                page.original = saved_once(result_image("original"))
            with gr.Column(min_width=260):
                gr.Markdown(words.OVERLAY_CAPTION, elem_classes=["caption"])
                page.overlay = saved_once(result_image("overlay"))
                gr.HTML(LEGEND_HTML, elem_id="legend")
        with gr.Row():
            with gr.Column(scale=3, min_width=300):
                page.summary = gr.Markdown(elem_id="summary", min_height=60)
            # The heading is off: the label comes from the decision rule, not always the top class.
            page.probabilities = decided_label(gr.Label(label="Probabilities", num_top_classes=len(app.classes),
                                                        show_heading=False, scale=2, min_width=220,
                                                        elem_id="prediction"))


def compare_view(app: XrayApp, page) -> None:
    """Every model's verdict, probabilities and map, side by side (hidden until picked)."""
    page.compare_outputs, page.compare_maps = [], []
    with gr.Column(visible=False, elem_id="compare-view") as page.compare_view:
        with gr.Row(equal_height=False):
            for _ in app.names if app.several else []:
                with gr.Column(min_width=200):
                    said = gr.Markdown(elem_classes=["compare-text"])
                    bars = decided_label(gr.Label(num_top_classes=len(app.classes), show_heading=False,
                                                  show_label=False, elem_classes=["compare-label"]))
                    mapped = saved_once(gr.Image(show_label=False, type="pil", format="jpeg", height=300, buttons=[],
                                                 elem_classes=["compare-map"]))
                    page.compare_outputs += [said, bars, mapped]
                    page.compare_maps.append(mapped)
        gr.HTML(LEGEND_HTML)


def tests(page) -> None:
    """The tests of the result: the map test, the eraser, the deletion curve, the file test. Each
    result (or why there is none) in its own area; an image's box shown only once it has one."""
    with gr.Accordion("Test the map on this image", open=True, elem_id="map-test"):
        gr.Markdown(words.MAP_TEST_INTRO)
        with gr.Row():
            page.blank_lungs = test_button("Blank the lungs, predict again", "blank-lungs")
            page.blank_outside = test_button("Blank all but the lungs, predict again", "blank-outside")
        page.occlusion_result = gr.Markdown(elem_id="occlusion-result")
        with gr.Column(visible=False, elem_id="occluded-box") as page.occluded_box:
            gr.Markdown("**What the model read**", elem_classes=["caption"])
            page.occluded = saved_once(gr.Image(show_label=False, type="pil", format="jpeg", height=260, buttons=[],
                                                elem_id="occluded"))
        # Closed until wanted: in the browser, an image editor handed each new result redraws its
        # canvas and held up every result by 1-1.5 s (BENCHMARKS.md).
        with gr.Accordion("Eraser: paint over a marker, a label or a tube, and predict again", open=False,
                          elem_id="eraser-box") as page.eraser_box:
            page.eraser = gr.ImageEditor(
                label="Paint over what to blank (a side marker, a text label, a tube)", type="numpy", sources=(),
                transforms=(), layers=False, format="png", height=380, elem_id="eraser",
                brush=gr.Brush(colors=["#ff00ff"], default_color="#ff00ff", color_mode="fixed", default_size=24),
                buttons=[])
            page.erase = test_button("Blank what I painted, predict again", "erase")
        gr.Markdown(words.DELETION_INTRO)
        page.deletion = test_button("Remove the map's hottest pixels first (a few seconds a model)", "deletion")
        page.deletion_result = gr.Markdown(elem_id="deletion-result")
        with gr.Column(visible=False, elem_id="deletion-box") as page.deletion_box:
            page.deletion_plot = saved_once(gr.Image(show_label=False, type="pil", format="png", buttons=[],
                                                     elem_id="deletion-plot"))
        gr.Markdown(words.FILE_TEST_INTRO)
        page.file_test = test_button("Compress, shrink and blur it, predict again", "file-test")
        page.file_test_result = gr.Markdown(elem_id="file-test-result")


def about(app: XrayApp, page) -> None:
    """The About panel and the model card panel (MODEL_CARD.md, read when opened)."""
    with gr.Accordion("About this model", open=False):
        page.facts = gr.Markdown(model_card.facts(app, app.models.default))
    with gr.Accordion("Model card: every model's measured numbers, the shortcut audits, what did not pay "
                      "(MODEL_CARD.md)", open=False, elem_id="model-card-full") as page.card_box:
        page.card_text = gr.Markdown(elem_id="model-card-text")


def api_inputs(app: XrayApp, page) -> None:
    """The API's own inputs (the page never shows them): taken as sent, checked by the handlers."""
    page.api = gr.Button(visible=False)
    page.api_method = gr.Textbox("gradcam", visible=False, label="method")
    page.api_class = gr.Textbox(PREDICTED, visible=False, label="explain_class")
    page.api_opacity = gr.JSON("0.4", visible=False, label="opacity")  # JSON: parsed to 0.4, any value taken as sent
    page.api_model = gr.Textbox(app.models.default, visible=False, label="model")
    page.blanked = gr.Textbox("lungs", visible=False, label="blanked")
    page.painted = upload_path(gr.File(visible=False, label="painted: a mask image, white where to blank"))
    page.numbers = gr.JSON(visible=False)


def wire(app: XrayApp, on: Handlers, p) -> None:
    """Which handler each event runs, with what in and out."""
    inputs = [p.upload, p.method, p.explain_class, p.opacity, p.view]
    # In analysis.PAGE_OUTPUTS's order: the single view and the compare view, the one shown filled
    # and the other emptied; each new result clears the tests, which belonged to the last image.
    outputs = [p.probabilities, p.original, p.overlay, p.summary, p.kept, p.occlusion_result, p.occluded,
               p.occluded_box, p.eraser, p.eraser_box, p.deletion_result, p.deletion_plot, p.deletion_box,
               p.file_test_result, p.card, p.facts, p.single_view, p.compare_view, *p.compare_outputs]
    page = [p.explain_class, *outputs]  # a new image also resets the explained class
    analysis_event = dict(concurrency_id=MODEL_GROUP, validator=on.admit, show_progress="minimal")
    test_event = dict(concurrency_id=MODEL_GROUP, show_progress="minimal")
    no_model = dict(queue=False, api_visibility="private")

    uploaded = p.upload.upload(on.upload, inputs, page, api_name="show_new", api_visibility="private",
                               **analysis_event)
    # Another file over the one shown, without clearing it first: it takes the upload box's place.
    replaced = p.another.upload(on.another, [p.another, *inputs[1:]], [p.upload, *page], api_name="show_another",
                                api_visibility="private", **analysis_event)
    events = [uploaded, replaced]
    if p.examples is not None:
        events.append(p.examples.click(on.example, [p.examples, *inputs[1:]], [p.upload, *page],
                                       api_name="analyse_example", api_visibility="private", **analysis_event))
    for event in events:
        event.success(None, js=words.SHOW_RESULT_JS, **no_model)
        # An unexpected failure (the views show the expected ones) still clears the previous
        # verdict: no result on the page may belong to another file.
        event.failure(on.failed, None, outputs, **no_model)
    p.upload.clear(on.cleared, p.view, page, **no_model)
    # The dropdown's `input` event fired twice per choice (Gradio 6.31, Chromium); `select` once.
    for control, event in ((p.method, "select"), (p.explain_class, "input"), (p.view, "input")):
        getattr(control, event)(on.reanalyse, inputs, outputs, api_name="reanalyse", api_visibility="private",
                                trigger_mode="always_last", **analysis_event)
    p.opacity.release(on.reblend, [p.kept, p.opacity], [p.overlay, *p.compare_maps], trigger_mode="always_last",
                      **no_model)

    map_test = [p.occlusion_result, p.occluded, p.occluded_box]
    p.blank_lungs.click(on.blank_lungs, [p.upload, p.view], map_test, api_name="blank_lungs", api_visibility="private",
                        validator=on.admit_map_test, **test_event)
    p.blank_outside.click(on.blank_outside, [p.upload, p.view], map_test, api_name="blank_outside",
                          api_visibility="private", validator=on.admit_map_test, **test_event)
    p.eraser_box.expand(on.eraser_opened, p.kept, p.eraser, **no_model)
    p.erase.click(on.erase, [p.upload, p.eraser, p.view], map_test, api_name="erase", api_visibility="private",
                  **test_event)
    p.deletion.click(on.deletion, [p.upload, p.method, p.explain_class, p.view],
                     [p.deletion_result, p.deletion_plot, p.deletion_box], api_name="deletion",
                     api_visibility="private", validator=on.admit_settings, **test_event)
    p.file_test.click(on.file_test, [p.upload, p.view], p.file_test_result, api_name="file_test",
                      api_visibility="private", validator=on.admit_map_test, **test_event)
    p.card_box.expand(on.model_card_text, None, p.card_text, **no_model)

    # The API: plain values, no page updates.
    p.api.click(on.predict, [p.upload, p.api_method, p.api_class, p.api_opacity, p.api_model], outputs[:4],
                api_name="predict", **analysis_event)
    p.api.click(on.occlusion, [p.upload, p.blanked, p.api_model, p.painted], [p.occlusion_result, p.occluded, p.numbers],
                api_name="occlusion", validator=on.admit_map_test, **test_event)
    p.api.click(on.quality, [p.upload, p.api_model], [p.file_test_result, p.numbers], api_name="quality",
                validator=on.admit_map_test, **test_event)
    p.api.click(on.deletion_curve, [p.upload, p.api_method, p.api_class, p.api_model],
                [p.deletion_result, p.deletion_plot, p.numbers], api_name="deletion_curve",
                validator=on.admit_settings, **test_event)


def result_image(elem_id: str) -> gr.Image:
    """One of the result's images: no label or toolbar over its top strip (words.CSS)."""
    return gr.Image(show_label=False, type="pil", format="jpeg", height=IMAGE_HEIGHT, buttons=[], elem_id=elem_id)


def test_button(text: str, elem_id: str) -> gr.Button:
    return gr.Button(text, size="md", variant="secondary", elem_id=elem_id, elem_classes=["test-button"])
