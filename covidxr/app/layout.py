"""The page: its components, and which handler (handlers.py) each event runs. No logic lives
here: what a handler returns is decided by the views, what the page says by words.py, report.py
and model_card.py.

One request per user action: the upload, each change of model, method or class, each example
click, each test button; a new opacity only re-blends the kept map (tests/test_app.py counts
the requests in Chromium). Handlers that run a model join the queue's model group (one at a time,
a few places per client); the others are not queued at all.
"""

from __future__ import annotations

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
    on = Handlers(app)
    config = app.predictor.config
    names, default = app.names, app.models.default
    with gr.Blocks(title=words.TITLE, analytics_enabled=False,
                   delete_cache=(FILE_LIFETIME_S, FILE_LIFETIME_S)) as demo:
        gr.Markdown(words.HEADER)
        gr.Markdown(words.NOTICE, elem_id="notice")
        kept = gr.State(None, time_to_live=KEPT_FOR_S)  # this session's analyses: keys into app.kept
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                upload = upload_path(gr.File(label="Chest X-ray (PNG, JPEG or DICOM)", file_count="single",
                                             elem_id="upload", height=140))
                another = upload_path(gr.UploadButton("Choose another X-ray", file_count="single", size="sm",
                                                      elem_id="another", elem_classes=["test-button"]))
                if app.examples:
                    examples = gr.Dataset(
                        components=[gr.Image(visible=False), gr.HTML(visible=False)],
                        samples=[[str(path), caption] for (path, _), caption in
                                 zip(app.examples, analysis.example_captions(app))],
                        headers=["", "What it is, and what the model says"], type="index", layout="table",
                        samples_per_page=len(app.examples), label="Or click an example", elem_id="examples")
                else:
                    gr.Markdown(words.NO_EXAMPLES.format(command=FETCH_COMMAND))
            with gr.Column(scale=2, elem_id="result"):
                view = gr.Radio([(app.title(name), name) for name in names]
                                + ([("Compare all", COMPARE)] if app.several else []), value=default,
                                label="Model", visible=app.several, elem_id="model")
                with gr.Row():
                    method = gr.Dropdown(model_card.method_choices(config), value="gradcam",
                                         label="Explanation method", info=model_card.method_info(config), scale=5,
                                         min_width=300, elem_id="method")
                    explain_class = gr.Radio([PREDICTED, *app.classes], value=PREDICTED, scale=4, min_width=260,
                                             label="Explain the evidence for", elem_id="explain-class")
                    opacity = gr.Slider(0.0, 1.0, value=0.4, step=0.05, label="Heatmap opacity", scale=2,
                                        min_width=160, elem_id="opacity")
                with gr.Column(elem_id="single-view") as single_view:  # one model: its result in full
                    with gr.Row(equal_height=False):
                        with gr.Column(min_width=260):
                            gr.Markdown(words.INPUT_CAPTION, elem_classes=["caption"])
                            original = saved_once(result_image("original"))
                        with gr.Column(min_width=260):
                            gr.Markdown(words.OVERLAY_CAPTION, elem_classes=["caption"])
                            overlay = saved_once(result_image("overlay"))
                            gr.HTML(LEGEND_HTML, elem_id="legend")
                    with gr.Row():
                        with gr.Column(scale=3, min_width=300):
                            summary = gr.Markdown(elem_id="summary", min_height=60)
                        # The heading is off: the label comes from the decision rule, not always the top class.
                        probabilities = decided_label(gr.Label(label="Probabilities", num_top_classes=len(app.classes),
                                                               show_heading=False, scale=2, min_width=220,
                                                               elem_id="prediction"))
                # The compare view: every model's verdict, probabilities and map, side by side.
                compare_outputs, compare_maps = [], []
                with gr.Column(visible=False, elem_id="compare-view") as compare_view:
                    with gr.Row(equal_height=False):
                        for name in names if app.several else []:
                            with gr.Column(min_width=200):
                                said = gr.Markdown(elem_classes=["compare-text"])
                                bars = decided_label(gr.Label(num_top_classes=len(app.classes), show_heading=False,
                                                              show_label=False, elem_classes=["compare-label"]))
                                mapped = saved_once(gr.Image(show_label=False, type="pil", format="jpeg", height=300,
                                                             buttons=[], elem_classes=["compare-map"]))
                                compare_outputs += [said, bars, mapped]
                                compare_maps.append(mapped)
                    gr.HTML(LEGEND_HTML)
                # What the picked model is (or what the comparison shows), under its result.
                card = gr.Markdown(model_card.card(app, default), visible=app.several, elem_id="model-card")
                with gr.Accordion("Test the map on this image", open=True, elem_id="map-test"):
                    gr.Markdown(words.MAP_TEST_INTRO)
                    with gr.Row():
                        blank_lungs = test_button("Blank the lungs, predict again", "blank-lungs")
                        blank_outside = test_button("Blank all but the lungs, predict again", "blank-outside")
                    occlusion_result = gr.Markdown(elem_id="occlusion-result")
                    # Shown once a test has drawn what the model read: no empty box before.
                    with gr.Column(visible=False, elem_id="occluded-box") as occluded_box:
                        gr.Markdown("**What the model read**", elem_classes=["caption"])
                        occluded = saved_once(gr.Image(show_label=False, type="pil", format="jpeg", height=260,
                                                       buttons=[], elem_id="occluded"))
                    # Closed until wanted: in the browser, an image editor handed each new result
                    # redraws its canvas and held up every result by 1-1.5 s (BENCHMARKS.md).
                    with gr.Accordion("Eraser: paint over a marker, a label or a tube, and predict again",
                                      open=False, elem_id="eraser-box") as eraser_box:
                        eraser = gr.ImageEditor(
                            label="Paint over what to blank (a side marker, a text label, a tube)", type="numpy",
                            sources=(), transforms=(), layers=False, format="png", height=380, elem_id="eraser",
                            brush=gr.Brush(colors=["#ff00ff"], default_color="#ff00ff", color_mode="fixed",
                                           default_size=24), buttons=[])
                        erase = test_button("Blank what I painted, predict again", "erase")
                    gr.Markdown(words.DELETION_INTRO)
                    deletion = test_button("Remove the map's hottest pixels first (a few seconds a model)", "deletion")
                    deletion_result = gr.Markdown(elem_id="deletion-result")
                    with gr.Column(visible=False, elem_id="deletion-box") as deletion_box:
                        deletion_plot = saved_once(gr.Image(show_label=False, type="pil", format="png", buttons=[],
                                                            elem_id="deletion-plot"))
                    gr.Markdown(words.FILE_TEST_INTRO)
                    file_test = test_button("Compress, shrink and blur it, predict again", "file-test")
                    file_test_result = gr.Markdown(elem_id="file-test-result")
        with gr.Accordion("About this model", open=False):
            facts = gr.Markdown(model_card.facts(app, default))
        with gr.Accordion("Model card: every model's measured numbers, the shortcut audits, what did not pay "
                          "(MODEL_CARD.md)", open=False, elem_id="model-card-full") as card_box:
            card_text = gr.Markdown(elem_id="model-card-text")

        # The API's own inputs (the page never shows them): taken as sent, checked by the handlers.
        api = gr.Button(visible=False)
        api_method = gr.Textbox("gradcam", visible=False, label="method")
        api_class = gr.Textbox(PREDICTED, visible=False, label="explain_class")
        api_opacity = gr.JSON("0.4", visible=False, label="opacity")  # JSON: parsed to 0.4, any value taken as sent
        api_model = gr.Textbox(default, visible=False, label="model")
        blanked = gr.Textbox("lungs", visible=False, label="blanked")
        painted = upload_path(gr.File(visible=False, label="painted: a mask image, white where to blank"))
        numbers = gr.JSON(visible=False)

        inputs = [upload, method, explain_class, opacity, view]
        # In PAGE_OUTPUTS's order: the single view and the compare view, the one shown filled and
        # the other emptied; each new result clears the tests, which belonged to the last image.
        outputs = [probabilities, original, overlay, summary, kept, occlusion_result, occluded, occluded_box, eraser,
                   eraser_box, deletion_result, deletion_plot, deletion_box, file_test_result, card, facts, single_view,
                   compare_view, *compare_outputs]
        page = [explain_class, *outputs]  # a new image also resets the explained class
        analysis_event = dict(concurrency_id=MODEL_GROUP, validator=on.admit, show_progress="minimal")
        test_event = dict(concurrency_id=MODEL_GROUP, show_progress="minimal")
        no_model = dict(queue=False, api_visibility="private")

        uploaded = upload.upload(on.upload, inputs, page, api_name="show_new", api_visibility="private",
                                 **analysis_event)
        # Another file over the one shown, without clearing it first: it takes the upload box's place.
        replaced = another.upload(on.another, [another, *inputs[1:]], [upload, *page], api_name="show_another",
                                  api_visibility="private", **analysis_event)
        for event in (uploaded, replaced):
            event.success(None, js=words.SHOW_RESULT_JS, **no_model)
            # An unexpected failure (the views show the expected ones) still clears the previous
            # verdict: no result on the page may belong to another file.
            event.failure(on.failed, None, outputs, **no_model)
        upload.clear(on.cleared, view, page, **no_model)
        # The dropdown's `input` event fired twice per choice (Gradio 6.31, Chromium); `select` once.
        for control, event in ((method, "select"), (explain_class, "input"), (view, "input")):
            getattr(control, event)(on.reanalyse, inputs, outputs, api_name="reanalyse", api_visibility="private",
                                    trigger_mode="always_last", **analysis_event)
        opacity.release(on.reblend, [kept, opacity], [overlay, *compare_maps], trigger_mode="always_last",
                        **no_model)
        if app.examples:
            clicked = examples.click(on.example, [examples, method, explain_class, opacity, view], [upload, *page],
                                     api_name="analyse_example", api_visibility="private", **analysis_event)
            clicked.success(None, js=words.SHOW_RESULT_JS, **no_model)
            clicked.failure(on.failed, None, outputs, **no_model)

        map_test_out = [occlusion_result, occluded, occluded_box]
        blank_lungs.click(on.blank_lungs, [upload, view], map_test_out, api_name="blank_lungs",
                          api_visibility="private", validator=on.admit_map_test, **test_event)
        blank_outside.click(on.blank_outside, [upload, view], map_test_out, api_name="blank_outside",
                            api_visibility="private", validator=on.admit_map_test, **test_event)
        eraser_box.expand(on.eraser_opened, kept, eraser, **no_model)
        erase.click(on.erase, [upload, eraser, view], map_test_out, api_name="erase", api_visibility="private",
                    **test_event)
        deletion.click(on.deletion, [upload, method, explain_class, view], [deletion_result, deletion_plot, deletion_box],
                       api_name="deletion", api_visibility="private", validator=on.admit_settings, **test_event)
        file_test.click(on.file_test, [upload, view], file_test_result, api_name="file_test", api_visibility="private",
                        validator=on.admit_map_test, **test_event)
        card_box.expand(on.model_card_text, None, card_text, **no_model)

        # The API: plain values, no page updates.
        api.click(on.predict, [upload, api_method, api_class, api_opacity, api_model], outputs[:4],
                  api_name="predict", **analysis_event)
        api.click(on.occlusion, [upload, blanked, api_model, painted], [occlusion_result, occluded, numbers],
                  api_name="occlusion", validator=on.admit_map_test, **test_event)
        api.click(on.quality, [upload, api_model], [file_test_result, numbers], api_name="quality",
                  validator=on.admit_map_test, **test_event)
        api.click(on.deletion_curve, [upload, api_method, api_class, api_model], [deletion_result, deletion_plot, numbers],
                  api_name="deletion_curve", validator=on.admit_settings, **test_event)
    # One analysis at a time: the explainers' hooks are not thread-safe, and two CPU-bound
    # analyses would only slow each other down. api_open=False: a queued handler is reached only
    # through the queue (the page, /call/NAME, gradio_client), never run directly by /run/NAME,
    # which would pass both the one-at-a-time rule and the places per client.
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE, api_open=False)
    app.places.attach(demo._queue)
    return demo


def result_image(elem_id: str) -> gr.Image:
    """One of the result's images: no label or toolbar over its top strip (words.CSS)."""
    return gr.Image(show_label=False, type="pil", format="jpeg", height=IMAGE_HEIGHT, buttons=[], elem_id=elem_id)


def test_button(text: str, elem_id: str) -> gr.Button:
    return gr.Button(text, size="md", variant="secondary", elem_id=elem_id, elem_classes=["test-button"])
