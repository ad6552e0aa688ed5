"""The Gradio app: its handler called directly, the launched app through gradio_client, and a
real browser counting the requests each action sends."""

import os
import shutil
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from conftest import MANIFEST, REPO, real_image
from gradio_client import Client, handle_file
from PIL import Image

from benchmarks.common import shared_ssl_context
from covidxr import Predictor
from covidxr.examples import FETCH_COMMAND
from covidxr.not_xrays import non_xray_images
from covidxr.report import ERROR_HEADLINE, NO_RESULT
from covidxr.app import analysis, deletion, eraser, file_test, layout, map_test, model_card
from covidxr.app.analysis import DISPLAY_SIDE, PAGE_OUTPUTS
from covidxr.app.handlers import Handlers
from covidxr.app.map_test import LUNG_READER_MAP_TEST
from covidxr.app.model_card import method_choices, model_facts, notice_facts
from covidxr.app.state import PREDICTED, XrayApp
from covidxr.report import NOT_AN_XRAY, NOT_AN_XRAY_HEADLINE

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def xray_app(examples_dir, predictor):
    return XrayApp(predictor, examples_dir)


@pytest.fixture(scope="module")
def built_page(xray_app):
    """The page built once (building it predicts every example for its caption)."""
    return layout.build(xray_app)


def test_handler_on_a_real_xray(xray_app, manifest_frame):
    path = real_image(manifest_frame, "pneumonia", "kermany")
    label, original, overlay, summary = analysis.predict_api(xray_app, str(path))
    probabilities = {c.label: c.confidence for c in label.confidences}
    assert set(probabilities) == {"covid", "normal", "pneumonia"}
    assert sum(probabilities.values()) == pytest.approx(1, abs=1e-5)
    assert original.size == overlay.size == Image.open(path).size
    decided = xray_app.predictor.predict(path).label
    assert label.label == decided
    assert summary.startswith(f"### Prediction: {decided}\nDecided by the model's rule: "
                              f"{xray_app.predictor.decision_rule}.")
    assert "**Lung focus " in summary and "top strip" in summary
    _, _, covid_overlay, covid_summary = analysis.predict_api(xray_app, str(path), "gradcam++", "covid", 0.6)
    assert "evidence for **covid**" in covid_summary
    assert covid_overlay.tobytes() != overlay.tobytes()


def test_handler_returns_display_sized_images(xray_app, manifest_frame, tmp_path):
    image = Image.open(real_image(manifest_frame, "normal", "nih14")).convert("L")
    path = tmp_path / "scanner-size.png"
    image.resize((2400, 2400), Image.Resampling.BICUBIC).save(path)
    _, original, overlay, _ = analysis.predict_api(xray_app, str(path))
    assert original.size == overlay.size == (DISPLAY_SIDE, DISPLAY_SIDE)


@pytest.mark.parametrize("content, message", [
    (b"", "upload.png: the file is empty"),
    (b"%PDF-1.4 not an x-ray", "upload.png: not an image we can read"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "upload.png: not an image we can read"),
])
def test_handler_refuses_bad_files_clearly(xray_app, tmp_path, content, message, caplog):
    path = tmp_path / "upload.png"
    path.write_bytes(content)
    with caplog.at_level("INFO", logger="covidxr.serve"), pytest.raises(gr.Error, match=message) as refused:
        analysis.predict_api(xray_app, str(path))
    assert refused.value.message.count("upload.png") == 1 and refused.value.print_exception is False
    assert [record.getMessage() for record in caplog.records] == [f"refused an upload: {refused.value.message}"]


def test_a_damaged_real_xray_is_refused_in_plain_words(xray_app, manifest_frame, tmp_path):
    original = real_image(manifest_frame, "normal", "nih14").read_bytes()
    path = tmp_path / "corrupt.png"
    path.write_bytes(original[:200] + b"\x00" * 5000 + original[5200:])
    with pytest.raises(gr.Error) as refused:
        analysis.predict_api(xray_app, str(path))
    # The decoder's own words ("broken data stream ...") are not the user's.
    assert refused.value.message == "corrupt.png: the image is damaged or truncated"


def test_handler_refuses_enormous_images(xray_app, tmp_path):
    path = tmp_path / "enormous.png"
    Image.new("1", (9000, 8000)).save(path)  # 72 megapixels, tiny on disk
    with pytest.raises(gr.Error, match="megapixels"):
        analysis.predict_api(xray_app, str(path))


@pytest.mark.parametrize("name", ["skimage:chelsea", "generated:gradient"])
def test_handler_refuses_what_is_no_chest_xray(xray_app, built_page, tmp_path, name):
    """A cat photo (colour) and a gray gradient: the check flags them, so no class is called, no
    lungs outlined, no lung focus given; the probabilities only as greyed detail."""
    path = tmp_path / "input.png"
    Image.fromarray(np.asarray(dict(non_xray_images())[name]).astype("uint8")).save(path)
    page = dict(zip(PAGE_OUTPUTS, analysis.show(xray_app, str(path))))
    label, original, overlay, summary = page["probabilities"], page["original"], page["overlay"], page["summary"]
    prediction = xray_app.predictor.predict(path)
    assert prediction.not_an_xray and set(prediction.probabilities) == set(xray_app.predictor.classes)
    assert label.label == NOT_AN_XRAY and label.label not in xray_app.predictor.classes and not label.confidences
    assert summary.startswith(f"### {NOT_AN_XRAY_HEADLINE}\n")
    assert "Prediction:" not in summary and "Lung focus" not in summary and "outside the lungs" not in summary
    assert all(warning in summary for warning in prediction.warnings)
    greyed = summary[summary.index('<span class="secondary">'):]
    assert all(f"{c} {p:.0%}" in greyed for c, p in prediction.probabilities.items())
    assert xray_app.kept.get(page["kept"]["keys"][0]).lung_mask is None and overlay.size == original.size
    shown_label = next(b for b in built_page.blocks.values() if isinstance(b, gr.Label)).postprocess(label)
    assert shown_label.label == NOT_AN_XRAY and not shown_label.confidences  # no probability bars


def test_an_unusual_xray_keeps_its_prediction_with_the_warning(xray_app, manifest_frame):
    """No lungs found (framing.py) is a warning on an X-ray, not a refusal."""
    import dataclasses

    from covidxr.framing import NO_LUNGS_WARNING

    from covidxr import report

    explanation = xray_app.predictor.explain(real_image(manifest_frame, "normal", "nih14"))
    unusual = dataclasses.replace(explanation, prediction=dataclasses.replace(
        explanation.prediction, warnings=[NO_LUNGS_WARNING]))
    summary = report.markdown(unusual.verdict)
    assert summary.startswith(f"### Prediction: {explanation.prediction.label}\n")
    assert NO_LUNGS_WARNING in summary and "Lung focus" not in summary


def test_the_api_keeps_no_map(xray_app, manifest_frame):
    """/predict never re-blends: it keeps nothing that would hold memory for KEPT_FOR_S and push
    page visitors' maps out of the shared table; the page's analyses still keep theirs."""
    path = str(real_image(manifest_frame, "covid", "ieee8023"))
    before = len(xray_app.kept)
    for _ in range(3):
        analysis.predict_api(xray_app, path, "gradcam", PREDICTED, 0.4)
    assert len(xray_app.kept) == before
    kept = analysis.show(xray_app, path, "gradcam", PREDICTED, 0.4, session="a page")[4]
    assert xray_app.kept.get(kept["keys"][0]) is not None and len(xray_app.kept) == min(before + 1, xray_app.kept.most)


def test_opacity_reblends_the_kept_map_without_a_forward_pass(xray_app, manifest_frame, monkeypatch):
    path = str(real_image(manifest_frame, "covid", "ieee8023"))
    shown = analysis.show(xray_app, path, "gradcam", PREDICTED, 0.4)[4]
    strong = analysis.predict_api(xray_app, path, "gradcam", PREDICTED, 0.8)[2]
    calls = []
    for name in ("explain", "predict", "probabilities_and_features"):
        monkeypatch.setattr(xray_app.predictor, name, lambda *args, **kw: calls.append(name))
    reblended = analysis.reblend(xray_app, shown, 0.8)
    assert calls == [] and reblended.tobytes() == strong.tobytes()
    assert isinstance(analysis.reblend(xray_app, None, 0.8), type(gr.skip()))  # nothing analysed yet: nothing to do


def test_lungs_outside_notice_fires_at_chance(xray_app, manifest_frame, tmp_path, monkeypatch):
    """The notice fires when the map of the predicted class (Grad-CAM and its twins) is no more on
    the lungs than an even spread; the About panel states the rule and, when measured, how often
    it fires."""
    import covidxr.report

    config = {k: v for k, v in xray_app.predictor.config.items() if k != "lung_focus_notice"}
    assert "an even spread" not in notice_facts(config) and "evenly over what the network read" in notice_facts(config)
    path = real_image(manifest_frame, "normal", "nih14")
    explanation = xray_app.predictor.explain(path)
    assert 0 < explanation.chance_focus < 1
    assert explanation.chance_focus == pytest.approx(explanation.scored_lungs.mean())  # a whole-image model
    measured = {"rule": "chance", "method": "gradcam", "images": 150, "fires_on_correct": 0.1, "fires_on_all": 0.12,
                "all_images": 180, "split": "val"}
    app = XrayApp(Predictor(xray_app.predictor.model, dict(config, lung_focus_notice=measured)), tmp_path)
    assert "it fires on 12% of this model's 180 val X-rays (10% of the 150" in notice_facts(app.predictor.config)
    # Where this map stands against chance decides; make it fall under chance by raising chance.
    focus = explanation.lung_focus
    monkeypatch.setattr(covidxr.report, "notice_fires", lambda lung_focus, chance: lung_focus <= focus + 0.01)
    for method, fires in (("gradcam", True), ("hirescam", True), ("xgradcam", True), ("gradcam++", False)):
        assert ("not on the lungs" in analysis.predict_api(app, str(path), method)[3]) is fires, method
    assert "not on the lungs" not in analysis.predict_api(app, str(path), "gradcam", "covid" if explanation.prediction.label != "covid"
                                                 else "normal")[3]
    monkeypatch.setattr(covidxr.report, "notice_fires", lambda lung_focus, chance: lung_focus <= focus - 0.01)
    assert "not on the lungs" not in analysis.predict_api(app, str(path))[3]


def test_label_names_the_class_the_threshold_decided(xray_app, manifest_frame, tmp_path):
    """Under a threshold rule the decided class can be a less probable one: the label output
    (page and `/predict`) names it, not the top class, and the summary says why."""
    path = real_image(manifest_frame, "normal", "nih14")
    probabilities = xray_app.predictor.predict(path).probabilities
    below_top = sorted(probabilities, key=probabilities.get)[1]  # neither the top class nor the last
    rule = {"rule": "threshold", "class": below_top, "threshold": probabilities[below_top] / 2}
    app = XrayApp(Predictor(xray_app.predictor.model, dict(xray_app.predictor.config, decision=rule)), tmp_path)
    label, *_, summary = analysis.predict_api(app, str(path))
    assert label.label == below_top != max(probabilities, key=probabilities.get)
    assert [c.label for c in label.confidences] == sorted(probabilities, key=probabilities.get, reverse=True)
    assert summary.startswith(f"### Prediction: {below_top}") and "though another class is more probable" in summary
    # Gradio's own postprocess would name the top class; the app's Label keeps the decision.
    component = next(block for block in layout.build(app).blocks.values() if isinstance(block, gr.Label))
    assert component.postprocess(label).label == below_top
    assert component.postprocess(probabilities).label == max(probabilities, key=probabilities.get)


def test_method_menu_has_one_entry_per_map(xray_app):
    choices = method_choices(xray_app.predictor.config)
    assert [key for _, key in choices] == ["gradcam", "gradcam++", "layercam", "eigencam", "scorecam"]
    assert dict((key, label) for label, key in choices)["gradcam"] == "Grad-CAM = HiResCAM = XGrad-CAM"
    # The API still takes every name.
    assert analysis.problems(xray_app, "hirescam", PREDICTED, 0.4) == analysis.problems(xray_app, "xgradcam", PREDICTED, 0.4) == {}


def test_the_page_shows_an_error_in_place_of_the_previous_verdict(xray_app, manifest_frame, tmp_path):
    """After a result, a file that cannot be read: the result area says why, and nothing of the
    previous verdict (its label, images or text) is left (the API still raises the error)."""
    good = analysis.show(xray_app, str(real_image(manifest_frame, "covid", "ieee8023")))
    assert good[0].label in xray_app.predictor.classes and good[1] is not None
    bad = tmp_path / "notes.png"
    bad.write_text("definitely not an X-ray")
    page = dict(zip(PAGE_OUTPUTS, analysis.show(xray_app, str(bad))))
    label, summary = page["probabilities"], page["summary"]
    assert label.label == NO_RESULT and not label.confidences
    assert page["original"] is None and page["overlay"] is None and page["kept"] is None
    assert (page["occlusion_result"], page["occluded"], page["eraser"]) == ("", None, None)  # the map test goes too
    assert summary.startswith(f"### {ERROR_HEADLINE}\nnotes.png: not an image we can read")
    with pytest.raises(gr.Error, match="notes.png: not an image we can read"):
        analysis.predict_api(xray_app, str(bad))
    # An unexpected failure clears the result too, with a general message.
    assert analysis.failed(xray_app)[0].label == NO_RESULT and analysis.failed(xray_app)[3].startswith(f"### {ERROR_HEADLINE}")


def test_another_file_takes_the_upload_box_and_an_unreadable_one_empties_it(xray_app, manifest_frame, tmp_path,
                                                                           monkeypatch):
    """'Choose another X-ray': the file goes into the upload box and is analysed in one request; a
    file that cannot be read is deleted at once, so the box is emptied and the result says why."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    good = tmp_path / "good.png"
    shutil.copy(real_image(manifest_frame, "normal", "nih14"), good)
    shown, explained, label, *_ = analysis.show_another(xray_app, str(good), "gradcam", "covid", 0.4)
    assert shown == str(good) and explained == PREDICTED and label.label in xray_app.predictor.classes
    bad = tmp_path / "upload" / "notes.png"
    bad.parent.mkdir()
    bad.write_text("definitely not an X-ray")
    shown, _, label, *rest = analysis.show_another(xray_app, str(bad), "gradcam", PREDICTED, 0.4)
    assert shown is None and not bad.exists() and label.label == NO_RESULT


def test_clearing_or_a_new_image_resets_the_page(xray_app, manifest_frame):
    # PAGE_OUTPUTS up to the eraser: no result, no test, the test's image box hidden
    empty = (None, None, None, "", None, "", None, gr.update(visible=False), None)
    assert analysis.cleared(xray_app)[0] == PREDICTED and analysis.cleared(xray_app)[1:10] == empty
    # A class chosen before any upload: no update of the label (Gradio would swap in a fresh copy of
    # the component for the session, and every later result failed to show).
    assert analysis.reanalyse(xray_app, None, "gradcam", "covid", 0.4)[:9] == empty
    path = str(real_image(manifest_frame, "normal", "nih14"))
    decided = xray_app.predictor.predict(path).label
    other = next(c for c in xray_app.predictor.classes if c != decided)
    explained, label, _, _, summary, *_ = analysis.show_new(xray_app, path, "gradcam", other, 0.4)
    assert explained == PREDICTED and label.label == decided
    assert f"evidence for **{decided}**" in summary and "not for the prediction" not in summary


def test_the_overlay_has_a_colour_scale(built_page):
    legends = [block for block in built_page.blocks.values()
               if isinstance(block, gr.HTML) and block.elem_id == "legend"]
    assert len(legends) == 1 and "linear-gradient" in legends[0].value and "strongest" in legends[0].value


def test_handler_needs_a_file(xray_app):
    with pytest.raises(gr.Error, match="Upload a chest X-ray"):
        analysis.predict_api(xray_app, None)


def test_the_predicted_class_choice_explains_the_decided_label(xray_app, manifest_frame):
    path = real_image(manifest_frame, "covid", "ieee8023", 1)
    label = xray_app.predictor.predict(path).label
    *_, summary = analysis.predict_api(xray_app, str(path), "gradcam", PREDICTED)
    assert f"evidence for **{label}**" in summary and "not for the prediction" not in summary
    other = next(c for c in xray_app.predictor.classes if c != label)
    *_, summary = analysis.predict_api(xray_app, str(path), "gradcam", other)
    assert f"evidence for **{other}**" in summary and "not for the prediction" in summary


def test_model_facts_come_from_the_checkpoint(xray_app):
    config = xray_app.predictor.config
    facts = model_facts(config)
    assert config["arch"] in facts and str(config["input_size"]) in facts
    assert f"{config['metrics']['accuracy']:.3f}" in facts


def test_examples_are_fetched_and_listed(xray_app, examples_dir):
    assert 6 <= len(xray_app.examples) <= 10
    labels = {row["label"] for _, row in xray_app.examples}
    assert {"covid", "normal", "pneumonia", "sars"} <= labels


def test_without_examples_the_app_says_how_to_fetch_them(xray_app, tmp_path):
    bare = XrayApp(xray_app.predictor, tmp_path)
    assert bare.examples == []
    texts = [block.value for block in layout.build(bare).blocks.values() if isinstance(block, gr.Markdown)]
    assert any(FETCH_COMMAND in (text or "") for text in texts)


@pytest.mark.app
def test_launched_app_through_gradio_client(served_app, examples_dir, tmp_path):
    client = Client(served_app, verbose=False, ssl_verify=shared_ssl_context())
    example = next(p for p in sorted(examples_dir.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    label, original, overlay, summary = client.predict(handle_file(str(example)), api_name="/predict")
    assert {c["label"] for c in label["confidences"]} == {"covid", "normal", "pneumonia"}
    assert summary.startswith(f"### Prediction: {label['label']}")
    assert Image.open(overlay).size == Image.open(example).size
    # A bad file gets a clear error naming it once, and the next good request is served.
    bad = tmp_path / "notes.png"
    bad.write_text("definitely not an X-ray")
    with pytest.raises(Exception, match="notes.png: not an image we can read") as refused:
        client.predict(handle_file(str(bad)), api_name="/predict")
    assert str(refused.value).count("notes.png") == 1
    label_again, *_ = client.predict(handle_file(str(example)), "eigencam", "covid", 0.5, api_name="/predict")
    assert label_again["label"] in ("covid", "normal", "pneumonia")
    # The map test through the API: the numbers before and after, the words, the image read.
    text, image, numbers = client.predict(handle_file(str(example)), "lungs", api_name="/occlusion")
    assert text.startswith("**With the lungs blanked**") and Image.open(image).size == Image.open(example).size
    assert set(numbers["as_is"]) == set(numbers["blanked_probabilities"]) == {"covid", "normal", "pneumonia"}
    with pytest.raises(Exception, match="not 'middle'"):
        client.predict(handle_file(str(example)), "middle", api_name="/occlusion")
    # The eraser through the API: a mask image (any size, white where to blank), for a named model.
    mask = np.zeros((100, 100), np.uint8)
    mask[:20, :35] = 255  # the top-left corner, where markers sit
    Image.fromarray(mask).save(tmp_path / "mask.png")
    text, _, numbers = client.predict(handle_file(str(example)), "painted", "recipe-2020",
                                      handle_file(str(tmp_path / "mask.png")), api_name="/occlusion")
    assert text.startswith("**With what you painted over blanked**") and set(numbers["as_is"]) == {"covid", "normal"}
    with pytest.raises(Exception, match="needs the mask"):
        client.predict(handle_file(str(example)), "painted", api_name="/occlusion")
    # Every model by name; the deletion curve with its numbers.
    read, *_ = client.predict(handle_file(str(example)), "gradcam", "predicted class", 0.4, "recipe-2020",
                              api_name="/predict")
    assert {c["label"] for c in read["confidences"]} == {"covid", "normal"}
    with pytest.raises(Exception, match="Unknown model"):
        client.predict(handle_file(str(example)), "gradcam", "predicted class", 0.4, "compare", api_name="/predict")
    text, plot, numbers = client.predict(handle_file(str(example)), "gradcam", "predicted class", "whole-image",
                                         api_name="/deletion_curve")
    assert "when chance does" in text and len(numbers["by_map"]) == len(numbers["removed"]) and Image.open(plot)
    # The file test through the API: each copy's label, and whether it held.
    said, numbers = client.predict(handle_file(str(example)), "whole-image", api_name="/quality")
    assert isinstance(numbers["label_held"], bool) and len(numbers["copies"]) == 4 and "|" in said
    # Every method name is still accepted, including those the page folds into Grad-CAM.
    hires, *_ = client.predict(handle_file(str(example)), "hirescam", "predicted class", 0.4, api_name="/predict")
    assert hires == label
    # A colour photo and a document: refused, with no class name as the label.
    for name in ("skimage:coffee", "generated:document0"):
        image = tmp_path / f"{name.split(':')[1]}.png"
        Image.fromarray(dict(non_xray_images())[name]).save(image)
        label, *_, summary = client.predict(handle_file(str(image)), api_name="/predict")
        assert label["label"] == NOT_AN_XRAY and not label.get("confidences"), name
        assert summary.startswith(f"### {NOT_AN_XRAY_HEADLINE}") and "Prediction:" not in summary


def _open_counting_requests(page, url):
    """Open the app in `page`; returns act(action, done): runs `action`, waits for `done`, and
    gives the names of the handlers the action's requests ran (in order): queued ones (they run a
    model) and direct ones (they run none), told apart by `act.queued`."""
    joined, queued = [], []  # the function each request runs; those that went through the queue

    def seen(request):
        if "/queue/join" in request.url or "/gradio_api/run/" in request.url:
            joined.append(request.post_data_json["fn_index"])
            if "/queue/join" in request.url:
                queued.append(joined[-1])
    page.on("request", seen)
    page.goto(url)
    page.get_by_text("not a medical device").wait_for(timeout=30_000)
    functions = {dependency["id"]: dependency["api_name"]
                 for dependency in page.evaluate("() => window.gradio_config.dependencies")}

    def act(action, done):
        joined.clear()
        queued.clear()
        action()
        done()
        page.wait_for_timeout(1500)  # time for any second request to show up
        act.queued = [functions[index] for index in queued]
        return [functions[index] for index in joined]
    return act


@pytest.mark.browser
def test_browser_one_request_per_action_and_readable_examples(served_app, examples_dir, tmp_path):
    """In Chromium: every user action sends exactly one request to the queue (the dropdown's
    `input` once sent two), a new opacity runs no analysis, the map test's buttons and the
    eraser round trip each send one, the examples' captions are whole, a
    new upload resets the explained class, and an unreadable file after a result replaces that
    result with its error (no stale label, no console error)."""
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: apt-get install chromium (see README)"
    from playwright.sync_api import sync_playwright

    from covidxr.examples import read_examples

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"])
        page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
        console_errors = []
        page.on("console", lambda message: console_errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: console_errors.append(str(error)))
        act = _open_counting_requests(page, served_app)

        summary = page.locator("#summary")
        rows = page.locator("#examples tbody tr")
        rows.first.wait_for(timeout=30_000)
        # The table can appear a moment before its cells are filled (seen once in a full-suite run).
        deadline = time.monotonic() + 30
        captions = rows.locator("td:nth-child(2)").all_inner_texts()
        while not all(caption.strip() for caption in captions) and time.monotonic() < deadline:
            page.wait_for_timeout(250)
            captions = rows.locator("td:nth-child(2)").all_inner_texts()
        examples = read_examples()
        missed = examples.loc[examples["why"].str.contains("misses"), "caption"].iloc[0]
        assert len(captions) == len(examples) and any(missed in caption for caption in captions)
        assert not any(caption.rstrip().endswith("...") for caption in captions), captions
        first_caption = captions[0].split("\n")[0]
        assert act(lambda: rows.first.click(), lambda: summary.get_by_text("Prediction:").wait_for(timeout=60_000)) \
            == ["analyse_example"]
        # The result is brought into view on the phone, above the examples it was picked from.
        page.wait_for_function("() => document.getElementById('result').getBoundingClientRect().top < innerHeight")

        def pick_method():
            page.locator("#method input").click()
            page.get_by_role("option", name="Grad-CAM++").click()
        assert act(pick_method, lambda: summary.get_by_text("Grad-CAM++").wait_for(timeout=60_000)) == ["reanalyse"]
        assert act(lambda: page.get_by_role("radio", name="pneumonia").check(),
                   lambda: summary.get_by_text("evidence for pneumonia").first.wait_for(timeout=60_000)) \
            == ["reanalyse_1"]
        before = page.locator("#overlay img").get_attribute("src")
        slider = page.locator("#opacity input[type=range]").bounding_box()
        assert act(lambda: page.mouse.click(slider["x"] + slider["width"] * 0.9, slider["y"] + slider["height"] / 2),
                   lambda: page.wait_for_function(f"() => document.querySelector('#overlay img').src != {before!r}",
                                                  timeout=60_000)) == ["reblend"]
        assert act.queued == []  # no model: not queued, no place taken
        # The map test: one request, its result in words beside the image the model read.
        assert act(lambda: page.locator("#blank-lungs").click(),
                   lambda: page.locator("#occlusion-result").get_by_text("With the lungs blanked").wait_for(
                       timeout=60_000)) == ["blank_lungs"]
        assert page.locator("#occluded img").count() == 1
        # On this example (the first) the shipped model's answer flips without the lungs: the
        # shown probabilities changed, and the words say so.
        assert "now says" in page.locator("#occlusion-result").inner_text()
        # The eraser: opened (one request: the image from what the page keeps), a stroke painted
        # across the image, then one request, and its result in words.
        assert act(lambda: page.locator("#eraser-box").get_by_text("Eraser:").click(),
                   lambda: page.locator("#eraser canvas").first.wait_for(timeout=60_000)) == ["eraser_opened"]
        assert act.queued == []
        canvas = page.locator("#eraser canvas").first
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()

        def paint_and_erase():
            x, y = box["x"] + box["width"] * 0.42, box["y"] + box["height"] * 0.3
            page.mouse.move(x, y)
            page.mouse.down()
            for step in range(1, 15):
                page.mouse.move(x + step * box["width"] * 0.01, y, steps=2)
            page.mouse.up()
            page.locator("#erase").click()
        assert act(paint_and_erase, lambda: page.locator("#occlusion-result").get_by_text(
            "With what you painted over blanked").wait_for(timeout=60_000)) == ["erase"]
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        bars = page.locator("#prediction dt")  # the probability bars (the heading is off: the summary names the class)
        assert sorted(bars.all_inner_texts()) == ["covid", "normal", "pneumonia"]
        assert page.locator("#legend").get_by_text("strongest", exact=True).is_visible()

        # Clearing the upload clears the result.
        clear = page.locator("#upload button[aria-label='Clear']").first
        clear.click()
        page.wait_for_function("() => !document.querySelector('#summary').innerText.includes('Prediction:')",
                               timeout=30_000)
        assert page.locator("#original img").count() == 0 and page.locator("#overlay img").count() == 0
        assert bars.count() == 0

        # A new upload resets the class explained (pneumonia above) to the predicted one. Picking a
        # class with no image still sends its (empty) request: counted here, so that it cannot land
        # in the next action's count.
        assert act(lambda: page.get_by_role("radio", name="pneumonia").check(), lambda: None) == ["reanalyse_1"]
        example = next(p for p in sorted(examples_dir.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        upload = page.locator("#upload input[type=file]")
        assert act(lambda: upload.set_input_files(str(example)),
                   lambda: summary.get_by_text("Prediction:").wait_for(timeout=60_000)) == ["show_new"]
        page.wait_for_function("() => !document.querySelector('#summary').innerText.includes('not for the prediction')",
                               timeout=60_000)
        assert page.get_by_role("radio", name="predicted class").is_checked()
        assert bars.count() == 3
        assert "With the lungs blanked" not in page.locator("#occlusion-result").inner_text()  # the old image's

        # Then a text file named .png: the error takes the result's place, readable there, and
        # nothing of the previous verdict stays (no label, no images, no console error).
        notes = tmp_path / "notes.png"
        notes.write_text("definitely not an X-ray")
        clear.click()
        upload.set_input_files(str(notes))
        summary.get_by_text("notes.png: not an image we can read").wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        assert summary.get_by_text("No result").is_visible() and "Prediction:" not in summary.inner_text()
        assert bars.count() == 0
        assert page.locator("#original img").count() == 0 and page.locator("#overlay img").count() == 0
        page.screenshot(path=str(tmp_path / "error.png"), full_page=True)
        if os.environ.get("COVIDXR_SCREENSHOTS"):  # to look at by eye
            for name in ("app.png", "error.png"):
                shutil.copy(tmp_path / name, Path(os.environ["COVIDXR_SCREENSHOTS"]) / name)
        browser.close()
    assert not [message for message in console_errors if "Cannot read properties" in message], console_errors
    assert first_caption and (tmp_path / "app.png").stat().st_size > 10_000


@pytest.mark.app
def test_banner_names_the_share_flag(tmp_path, capfd, monkeypatch):
    """Gradio's own banner says "set `share=True` in `launch()`"; a user of app.py needs `--share`."""
    import socket

    from covidxr.app.server import launch

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "temp"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo = launch(None, "127.0.0.1", port, block=False, examples_dir=tmp_path)
    try:
        printed = capfd.readouterr().out
    finally:
        demo.close()
    assert f"covidxr app running on http://127.0.0.1:{port}/" in printed
    assert "--share" in printed and "share=True" not in printed


def test_the_map_test_blanks_one_side_and_says_what_changed(xray_app, manifest_frame, tmp_path):
    """The page's two buttons and `/occlusion`: the model again with the lungs (or all but them)
    blanked; the probabilities before and after, in words, with the image the model read."""
    from covidxr.occlusion import AS_IS, OUTSIDE_LEFT

    path = str(real_image(manifest_frame, "covid", "ieee8023"))
    test = xray_app.predictor.occlusion(path)
    text, image, numbers = map_test.occlusion_api(xray_app, path, "lungs")
    assert numbers["as_is"] == test.probabilities[AS_IS] and numbers["blanked_probabilities"] == \
        test.probabilities[OUTSIDE_LEFT]
    decided = test.decided[AS_IS]
    assert text.startswith(f"**With the lungs blanked**: {decided} {test.probabilities[OUTSIDE_LEFT][decided]:.0%} "
                           f"(as it is: {test.probabilities[AS_IS][decided]:.0%})")
    if decided == test.decided[OUTSIDE_LEFT] == "normal":  # nothing left to see: no shortcut implied
        assert "no disease left to see" in text and "shortcut" not in text
    else:
        assert ("without seeing the lungs" in text) is (test.decided[OUTSIDE_LEFT] == decided)
    assert max(image.size) <= DISPLAY_SIDE and image.mode == "L"
    text, _, numbers = map_test.occlusion_api(xray_app, path, "outside")
    assert text.startswith("**With only the lungs left**") and numbers["blanked"] == "outside"
    with pytest.raises(gr.Error, match="not 'middle'"):
        map_test.occlusion_api(xray_app, path, "middle")
    from skimage import data

    Image.fromarray(data.coffee()).save(tmp_path / "coffee.png")  # refused: no chest X-ray
    with pytest.raises(gr.Error, match="no lungs to blank"):
        map_test.occlusion_api(xray_app, str(tmp_path / "coffee.png"), "lungs")


def test_staying_normal_without_lungs_is_not_called_a_shortcut():
    """Blanking the lungs leaves no disease to see: a model that still says normal is doing what a
    lung reader would; one that still says COVID is reading something else."""
    from types import SimpleNamespace

    from covidxr.occlusion import AS_IS, OUTSIDE_LEFT

    def test(decided):
        other = {"covid": 0.1, "normal": 0.8, "pneumonia": 0.1} if decided == "normal" else \
            {"covid": 0.8, "normal": 0.1, "pneumonia": 0.1}
        return SimpleNamespace(decided={AS_IS: decided, OUTSIDE_LEFT: decided},
                               probabilities={AS_IS: other, OUTSIDE_LEFT: other})
    normal, covid = map_test.occlusion_text(test("normal"), OUTSIDE_LEFT), map_test.occlusion_text(test("covid"), OUTSIDE_LEFT)
    assert "shortcut" not in normal and "no disease left to see" in normal
    assert "a shortcut" in covid and "without seeing the lungs" in covid


def test_the_eraser_blanks_what_was_painted(xray_app, manifest_frame):
    """The eraser: what a person paints on the image as read (display size) is blanked at the
    image's own size with the same fill, and the model asked again."""
    from covidxr.occlusion import AS_IS, PAINTED_OVER

    path = str(real_image(manifest_frame, "covid", "ieee8023"))
    page = _page(analysis.show(xray_app, path))
    assert page["eraser"] is None and page["eraser_box"] == gr.update(open=False)  # emptied, closed: no canvas work
    editor = eraser.opened(xray_app, page["kept"])  # opened: the image as read, from what the page keeps
    assert editor.size == page["original"].size and eraser.opened(xray_app, None) is None
    width, height = editor.size
    layer = np.zeros((height, width, 4), np.uint8)
    layer[: height // 5, : width // 3] = (255, 0, 255, 255)  # the top-left corner, where markers sit
    edited = {"background": np.asarray(editor), "layers": [layer], "composite": None}
    text, image, box = eraser.erase(xray_app, path, edited)
    assert box == gr.update(visible=True)
    test = xray_app.predictor.occlusion(path, painted=layer[..., 3] > 0)
    assert test.probabilities[PAINTED_OVER] != test.probabilities[AS_IS]
    assert text.startswith("**With what you painted over blanked**")
    assert ", ".join(f"{c} {p:.0%}" for c, p in test.probabilities[PAINTED_OVER].items()) in text
    read = np.asarray(image)
    assert read.shape == (height, width) and read[: height // 5 - 2, : width // 3 - 2].std() < 1  # flat fill
    # The same through `/occlusion`'s "painted": a mask image file (any size) stretched over the X-ray.
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        mask_file = Path(folder) / "mask.png"
        Image.fromarray((layer[..., 3] > 0).astype(np.uint8) * 255).save(mask_file)
        api_text, _, numbers = map_test.occlusion_api(xray_app, path, "painted", None, str(mask_file))
        assert numbers["blanked_probabilities"] == test.probabilities[PAINTED_OVER] and api_text == text
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(mask_file)
        with pytest.raises(gr.Error, match="marks nothing"):
            map_test.occlusion_api(xray_app, path, "painted", None, str(mask_file))
    # Nothing painted: why, in the test's own result area (in place of the previous test's words).
    text, image, box = eraser.erase(xray_app, path, {"background": np.asarray(editor), "layers": [np.zeros_like(layer)],
                                                     "composite": None})
    assert text == f"{map_test.TEST_FAILED}\n{eraser.NOTHING_PAINTED}" and image is None
    assert box == gr.update(visible=False)


# -- several models: the bundled ones, side by side ------------------------------------------------

@pytest.fixture(scope="module")
def shelf_app(examples_dir):
    from covidxr.predictor import ModelShelf

    return XrayApp(examples_dir=examples_dir, models=ModelShelf.bundled())


def _page(outputs) -> dict:
    return dict(zip(PAGE_OUTPUTS, outputs))


def _columns(app, outputs) -> list[tuple]:
    """The compare view's columns: (text, label, map) per model, after PAGE_OUTPUTS."""
    rest = list(outputs[len(PAGE_OUTPUTS):])
    assert len(rest) == 3 * len(app.models.names)
    return [tuple(rest[i:i + 3]) for i in range(0, len(rest), 3)]


def _count_runs(app, monkeypatch) -> list[str]:
    """Names of the models whose `explain` runs from now on."""
    runs = []
    for name in app.models.names:
        predictor = app.models[name]
        monkeypatch.setattr(predictor, "explain", lambda *a, _run=predictor.explain, _name=name, **k:
                            (runs.append(_name), _run(*a, **k))[1])
    return runs


def test_every_bundled_model_is_offered_with_its_card(shelf_app):
    from covidxr.checkpoint import BUNDLED

    assert shelf_app.models.names == list(BUNDLED) and shelf_app.views == [*BUNDLED, "compare"]
    for name in shelf_app.models.names:
        card = model_card.card(shelf_app, name)
        config = shelf_app.models.configs[name]
        assert config["card"]["name"] == name and config["card"]["title"] in card
        assert f"COVID AUROC {config['metrics']['covid']['auroc']:.3f}" in card
        assert f"**{config['lung_focus']['mean']:.0%}**" in card and "Known shortcut" in card
    assert shelf_app.classes == ["covid", "normal", "pneumonia"]
    # One lung model serves every classifier's check and outline (it keeps its last answers).
    assert len({id(shelf_app.models[name].segmenter) for name in shelf_app.models.names}) == 1


def test_the_compare_view_shows_every_model_and_keeps_what_it_ran(shelf_app, manifest_frame, monkeypatch):
    """One call fills a column per model (label, probabilities, map, lung focus against chance);
    the same file asked again in this session, in any view, runs no model; another session's
    request runs them again (nothing is shared between sessions)."""
    path = str(real_image(manifest_frame, "covid", "ieee8023", 3))
    runs = _count_runs(shelf_app, monkeypatch)
    outputs = analysis.show(shelf_app, path, "gradcam", PREDICTED, 0.4, "compare", "session one")
    page = _page(outputs)
    assert runs == shelf_app.models.names
    assert page["probabilities"] is None and page["overlay"] is None  # the single view is emptied
    assert page["single_view"]["visible"] is False and page["compare_view"]["visible"] is True
    for name, (text, label, mapped) in zip(shelf_app.models.names, _columns(shelf_app, outputs)):
        predicted = shelf_app.models[name].predict(path)
        assert label.label == predicted.label and text.startswith(f"#### {shelf_app.models.title(name)}")
        assert f"**Prediction: {predicted.label}**" in text and "Lung focus" in text and "even spread" in text
        assert mapped.size == _page(analysis.show(shelf_app, path, view=name))["overlay"].size
    runs.clear()
    for view in (*shelf_app.models.names, "compare"):
        single = _page(analysis.show(shelf_app, path, "gradcam", PREDICTED, 0.4, view, "session one"))
        if view != "compare":
            assert single["probabilities"].label == shelf_app.models[view].predict(path).label
            assert single["card"] == model_card.card(shelf_app, view) and single["single_view"]["visible"] is True
    assert runs == []
    analysis.show(shelf_app, path, "gradcam", PREDICTED, 0.4, "compare", "session two")
    assert runs == shelf_app.models.names


def test_a_class_a_model_lacks_is_explained_by_its_prediction(shelf_app, manifest_frame):
    """The 2020 recipe has no pneumonia class: asked for pneumonia evidence, its map is of its
    prediction, and it says so."""
    path = str(real_image(manifest_frame, "pneumonia", "ieee8023"))
    outputs = analysis.show(shelf_app, path, "gradcam", "pneumonia", 0.4, "compare")
    texts = {name: text for name, (text, _, _) in zip(shelf_app.models.names, _columns(shelf_app, outputs))}
    assert "No pneumonia class" in texts["recipe-2020"] and "evidence for pneumonia" not in texts["recipe-2020"]
    assert "evidence for pneumonia" in texts["whole-image"]
    single = _page(analysis.show(shelf_app, path, "gradcam", "pneumonia", 0.4, "recipe-2020"))
    assert "has no pneumonia class" in single["summary"]


def test_the_map_test_in_the_compare_view_tests_each_model(shelf_app, manifest_frame):
    from covidxr.occlusion import AS_IS, OUTSIDE_LEFT

    path = str(real_image(manifest_frame, "covid", "ieee8023"))
    text, image, _ = map_test.blank(shelf_app, path, "compare", "lungs")
    for name in shelf_app.models.names:
        assert f"#### {shelf_app.models.title(name)}" in text
    assert LUNG_READER_MAP_TEST in text  # it reads only the lungs' box: nothing to blank
    test = shelf_app.models["recipe-2020"].occlusion(path)
    decided = test.decided[AS_IS]
    assert f"{decided} {test.probabilities[OUTSIDE_LEFT][decided]:.0%} (as it is: " in text
    with pytest.raises(gr.Error, match="reads only the lungs' box"):
        map_test.occlusion_api(shelf_app, path, "lungs", "lung-reader")


def test_the_api_answers_for_the_model_named(shelf_app, manifest_frame):
    path = str(real_image(manifest_frame, "normal", "nih14"))
    for name in shelf_app.models.names:
        label, *_ = analysis.predict_api(shelf_app, path, "gradcam", PREDICTED, 0.4, name)
        assert label.label == shelf_app.models[name].predict(path).label
        assert {c.label for c in label.confidences} == set(shelf_app.models[name].classes)
    for wrong in ("compare", "densenet", 3):
        with pytest.raises(gr.Error, match="Unknown model"):
            analysis.predict_api(shelf_app, path, "gradcam", PREDICTED, 0.4, wrong)
    assert "model" in analysis.problems(shelf_app, "gradcam", PREDICTED, 0.4, "x" * 10_000)
    assert len(analysis.problems(shelf_app, "gradcam", PREDICTED, 0.4, "x" * 10_000)["model"]) < 200


def test_a_new_opacity_reblends_every_column(shelf_app, manifest_frame, monkeypatch):
    path = str(real_image(manifest_frame, "covid", "ieee8023"))
    kept = _page(analysis.show(shelf_app, path, "gradcam", PREDICTED, 0.4, "compare", "reblend"))["kept"]
    runs = _count_runs(shelf_app, monkeypatch)
    single, *columns = analysis.reblend(shelf_app, kept, 0.9)
    assert runs == [] and isinstance(single, type(gr.skip())) and len(columns) == len(shelf_app.models.names)
    strong = analysis.predict_api(shelf_app, path, "gradcam", PREDICTED, 0.9, "lung-reader")[2]
    assert columns[shelf_app.models.names.index("lung-reader")].tobytes() == strong.tobytes()


@pytest.mark.browser
@pytest.mark.parametrize("width, height", [(1280, 800), (390, 844)])
def test_browser_compare_view_one_request_per_action(served_app, width, height, tmp_path):
    """In Chromium, at a desktop's and a phone's size: with "Compare all" picked, an example
    click is one request and shows every model's label, probabilities, map and lung focus;
    picking one model, then the comparison again, is one request each; the map test covers
    every model; nothing is wider than the screen."""
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: apt-get install chromium (see README)"
    from playwright.sync_api import sync_playwright

    from covidxr.checkpoint import BUNDLED, read_config, checkpoint_path

    titles = [read_config(checkpoint_path(name))["card"]["title"] for name in BUNDLED]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": width, "height": height})
        act = _open_counting_requests(page, served_app)

        maps = page.locator("#compare-view .compare-map img")
        assert act(lambda: page.get_by_role("radio", name="Compare all").check(), lambda: None) == ["reanalyse_2"]
        rows = page.locator("#examples tbody tr")
        rows.first.wait_for(timeout=30_000)
        assert act(lambda: rows.nth(1).click(), lambda: page.wait_for_function(
            f"() => document.querySelectorAll('#compare-view .compare-map img').length == {len(BUNDLED)}",
            timeout=120_000)) == ["analyse_example"]
        # (Gradio puts the class on the block and on the text inside it: each column's text once.)
        texts = list(dict.fromkeys(page.locator("#compare-view .compare-text").all_inner_texts()))
        assert [text.split("\n")[0] for text in texts] == titles
        assert all("Prediction:" in text and "Lung focus" in text for text in texts), texts
        assert page.locator("#compare-view .compare-label dt").count() >= 2 * len(BUNDLED)  # bars in each column
        assert not page.locator("#single-view").is_visible()
        assert page.evaluate("() => document.documentElement.scrollWidth") <= width  # nothing cut off
        page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
        # One model, then the comparison again: one request each, served from what this session ran.
        summary = page.locator("#summary")
        assert act(lambda: page.get_by_role("radio", name=titles[1]).check(),
                   lambda: summary.get_by_text("Prediction:").wait_for(timeout=60_000)) == ["reanalyse_2"]
        assert page.locator("#model-card").get_by_text("Known shortcut").is_visible()
        # (The maps load lazily: on a phone the last one is far below, so it is scrolled to first.)
        assert act(lambda: page.get_by_role("radio", name="Compare all").check(),
                   lambda: (maps.nth(len(BUNDLED) - 1).scroll_into_view_if_needed(timeout=60_000),
                            maps.nth(len(BUNDLED) - 1).wait_for(timeout=60_000))) == ["reanalyse_2"]
        assert act(lambda: page.locator("#blank-lungs").click(),
                   lambda: page.locator("#occlusion-result").get_by_text(titles[-1]).wait_for(timeout=60_000)) \
            == ["blank_lungs"]
        result = page.locator("#occlusion-result").inner_text()
        assert all(title in result for title in titles) and "With the lungs blanked" in result
        page.screenshot(path=str(tmp_path / "map-test.png"), full_page=True)
        if os.environ.get("COVIDXR_SCREENSHOTS"):  # to look at by eye
            for name in ("compare.png", "map-test.png"):
                shutil.copy(tmp_path / name, Path(os.environ["COVIDXR_SCREENSHOTS"]) / f"{width}-{name}")
        browser.close()


_CONTRAST_JS = """(selector) => {
  const channel = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
  const luminance = (rgb) => { const [r, g, b] = rgb.match(/[\\d.]+/g).map(Number);
                               return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b); };
  const button = document.querySelector(selector);
  let back = button, colour = getComputedStyle(back).backgroundColor;
  while (colour === "rgba(0, 0, 0, 0)" && back.parentElement) { back = back.parentElement; colour = getComputedStyle(back).backgroundColor; }
  const [light, dark] = [luminance(getComputedStyle(button).color), luminance(colour)].sort((a, b) => b - a);
  return [(light + 0.05) / (dark + 0.05), parseFloat(getComputedStyle(button).fontSize)];
}"""
# What covers the top strip of an image (where text markers sit): the element on top at its corners.
_TOP_STRIP_JS = """(selector) => {
  const image = document.querySelector(selector);
  const box = image.getBoundingClientRect();
  return [[box.left + 6, box.top + 6], [box.right - 6, box.top + 6], [box.left + box.width / 2, box.top + 6]]
    .map(([x, y]) => document.elementFromPoint(x, y) === image);
}"""


@pytest.mark.browser
@pytest.mark.parametrize("width, height", [(1280, 800), (390, 844)])
def test_browser_walk_finds_none_of_the_page_defects(served_app, width, height, tmp_path):
    """At a desktop's and a phone's size: nothing lies over the X-ray's top strip; the test buttons
    read as buttons; no empty box waits where a test's result will go; the heatmap is in sight
    after an example click (desktop); the method menu's text stops before its arrow; another file
    replaces the shown one without clearing it first; a test's error takes the place of the
    previous test's words; the deletion curve refuses a photo at once, with the reason; a
    MODEL_CARD.md link opens the panel it points at."""
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: apt-get install chromium (see README)"
    from playwright.sync_api import sync_playwright
    from skimage import data

    photo = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(photo)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": width, "height": height})
        act = _open_counting_requests(page, served_app)
        # Before any test: no empty placeholder for its image or plot.
        assert not page.locator("#occluded-box").is_visible() and not page.locator("#deletion-box").is_visible()
        page.locator("#examples tbody tr").first.click()
        page.locator("#summary").get_by_text("Prediction:").wait_for(timeout=60_000)
        page.locator("#overlay img").wait_for(timeout=60_000)
        page.wait_for_timeout(800)  # the result's scroll into view, on a phone
        if width >= 1000:
            assert page.evaluate("() => document.querySelector('#overlay img').getBoundingClientRect().top") < height
        for image in ("#original img", "#overlay img"):
            page.locator(image).scroll_into_view_if_needed()
            assert page.evaluate(_TOP_STRIP_JS, image) == [True, True, True], image
        for button in ("#blank-lungs", "#deletion"):
            contrast, size = page.evaluate(_CONTRAST_JS, button)
            assert contrast >= 4.5 and size >= 14, (button, contrast, size)
        menu = page.locator("#method input")
        assert float(menu.evaluate("e => parseFloat(getComputedStyle(e).paddingRight)")) >= 28
        assert menu.evaluate("e => getComputedStyle(e).textOverflow") == "ellipsis"
        # A map test, then the eraser with nothing painted: its reason replaces the test's words.
        page.locator("#blank-lungs").click()
        result = page.locator("#occlusion-result")
        result.get_by_text("With the lungs blanked").wait_for(timeout=60_000)
        assert page.locator("#occluded-box").is_visible()
        page.locator("#eraser-box").get_by_text("Eraser:").click()
        page.locator("#eraser canvas").first.wait_for(timeout=60_000)
        page.locator("#erase").click()
        result.get_by_text("Paint over something").wait_for(timeout=60_000)
        assert "With the lungs blanked" not in result.inner_text() and not page.locator("#occluded-box").is_visible()
        assert page.locator("#map-test .error").count() == 0  # no Error badge over the words
        # The file test: one request, the copies' verdicts side by side.
        assert act(lambda: page.locator("#file-test").click(), lambda: page.locator("#file-test-result").get_by_text(
            "compressed (JPEG quality 30)").wait_for(timeout=60_000)) == ["file_test"]
        # Another file over the shown one, with no click on the upload's x first: a photo, refused.
        def choose_photo():
            with page.expect_file_chooser() as chooser:
                page.locator("#another").click()
            chooser.value.set_files(str(photo))
        assert act(choose_photo, lambda: page.locator("#summary").get_by_text(NOT_AN_XRAY_HEADLINE).wait_for(
            timeout=60_000)) == ["show_another"]
        assert "coffee" in page.locator("#upload").inner_text()  # the new file took the old one's place
        # The deletion curve refuses the photo at once, with the reason, where its result goes.
        started = page.evaluate("() => performance.now()")
        page.locator("#deletion").click()
        page.locator("#deletion-result").get_by_text("does not look like a frontal chest X-ray").wait_for(timeout=30_000)
        assert page.evaluate("() => performance.now()") - started < 5_000
        assert page.locator("#map-test .error").count() == 0
        page.screenshot(path=str(tmp_path / "walk.png"), full_page=True)
        # A link to the model card opens its panel.
        page.locator("#map-test").get_by_role("link", name="MODEL_CARD.md").first.click()
        page.locator("#model-card-text").get_by_text("Known limitations").first.wait_for(timeout=30_000)
        if os.environ.get("COVIDXR_SCREENSHOTS"):  # to look at by eye
            shutil.copy(tmp_path / "walk.png", Path(os.environ["COVIDXR_SCREENSHOTS"]) / f"{width}-walk.png")
        browser.close()


def test_the_file_test_compresses_shrinks_and_blurs(shelf_app, manifest_frame, tmp_path):
    """One button, one request: the same X-ray compressed, smaller and blurred, each model's
    verdict for each side by side, and what it means; `/quality` gives the numbers."""
    from covidxr import quality

    path = str(real_image(manifest_frame, "covid", "ieee8023", 2))
    text = file_test.file_test(shelf_app, path, "compare")
    header = text.splitlines()[0]
    assert all(copy in header for copy in (quality.AS_IS, *quality.APP_VARIANTS))
    for name in shelf_app.models.names:
        predictor = shelf_app.models[name]
        tested = quality.held(predictor, path)
        row = next(line for line in text.splitlines() if line.startswith(f"| {shelf_app.title(name)} |"))
        assert row.count("**") == 2 * len(tested.verdicts)  # a label in every copy's cell
        assert f"**{predictor.predict(path).label}**" in row.split(" | ")[1]
        said, numbers = file_test.quality_api(shelf_app, path, name)
        assert numbers["label_held"] is tested.label_held and numbers["changed_under"] == tested.changed
        assert set(numbers["copies"]) == set(tested.verdicts)
        assert ("The answer holds" in said) is tested.label_held
    # A photo gets no result as it is: there is nothing to hold, said in the test's own area.
    from skimage import data

    Image.fromarray(data.coffee()).save(tmp_path / "coffee.png")
    assert file_test.file_test(shelf_app, str(tmp_path / "coffee.png")).startswith(map_test.TEST_FAILED)
    with pytest.raises(gr.Error, match="Unknown model"):
        file_test.quality_api(shelf_app, path, "compare")


def test_a_label_that_changes_with_the_file_is_said_so():
    from covidxr import quality, report

    shown = {quality.AS_IS: report.verdict("normal", {"covid": 0.2, "normal": 0.8}),
             "compressed (JPEG quality 30)": report.verdict("covid", {"covid": 0.7, "normal": 0.3}),
             "blurred (sigma 1.5 px at 512 px)": report.verdict("normal", {"covid": 0.3, "normal": 0.7})}
    tested = quality.Held(shown, "covid")
    assert tested.changed == ["compressed (JPEG quality 30)"] and not tested.label_held
    assert tested.words().startswith("The answer changes when this image is compressed: ")


@pytest.mark.slow  # several seconds: kept out of the fast layer
def test_the_deletion_curve_removes_the_maps_hottest_pixels_first(shelf_app, manifest_frame, tmp_path):
    """Predictor.deletion_curve (pytorch-grad-cam's ROAD), the page's button and /deletion_curve:
    the explained class's probability as the map's hottest pixels go, against random pixels."""
    from covidxr.occlusion import DELETED

    path = str(real_image(manifest_frame, "covid", "ieee8023"))
    predictor = shelf_app.models["whole-image"]
    curve = predictor.deletion_curve(path)
    decided = predictor.predict(path)
    assert curve.target == decided.decided and curve.as_is == pytest.approx(decided.probabilities[decided.decided],
                                                                             abs=1e-4)
    assert curve.removed == DELETED and len(curve.by_map) == len(curve.at_random) == len(DELETED)
    assert all(0 <= p <= 1 for p in curve.by_map + curve.at_random)
    assert curve.by_map != curve.at_random and predictor.deletion_curve(path) == curve  # seeded: the same again
    assert curve.gap == pytest.approx(np.mean(curve.at_random) - np.mean(curve.by_map))
    text, plot, numbers = deletion.deletion_api(shelf_app, path, "gradcam", PREDICTED, "whole-image")
    assert numbers["by_map"] == curve.by_map and numbers["at_random"] == curve.at_random
    assert f"{curve.target} {curve.by_map[DELETED.index(0.2)]:.0%} (as it is: {curve.as_is:.0%}" in text
    assert f"on average {abs(curve.gap):.0%} {'lower' if curve.gap >= 0 else 'higher'}" in text
    assert plot.mode == "RGB" and plot.size[0] > 400
    # The compare view: one curve pair per model, named.
    text, plot, box = deletion.deletion(shelf_app, path, "gradcam", PREDICTED, "compare")
    assert box == gr.update(visible=True)
    assert all(f"#### {shelf_app.models.title(name)}" in text for name in shelf_app.models.names)
    assert text.count("when chance does") == len(shelf_app.models.names)
    with pytest.raises(gr.Error, match="Unknown model"):
        deletion.deletion_api(shelf_app, path, "gradcam", PREDICTED, "compare")
    # A photo: the curve carries the input check's refusal, and the page and the API refuse it.
    from skimage import data

    assert not curve.not_an_xray and curve.reasons == []
    Image.fromarray(data.coffee()).save(tmp_path / "coffee.png")
    photo = predictor.deletion_curve(tmp_path / "coffee.png")
    assert photo.not_an_xray and photo.reasons == predictor.predict(tmp_path / "coffee.png").reasons
    with pytest.raises(gr.Error, match="does not look like a frontal chest X-ray"):
        deletion.deletion_api(shelf_app, str(tmp_path / "coffee.png"), "gradcam", PREDICTED, "whole-image")


def test_the_apis_blank_the_lungs_rows_equal_the_audits(xray_app):
    """/occlusion's "lungs" on unseen test X-rays gives the very numbers `covidxr audit --occlusion`
    writes for them (same fill, same model)."""
    import pandas as pd

    from covidxr.audit import occlusion_frame
    from covidxr.data import select
    from covidxr.occlusion import OUTSIDE_LEFT
    from covidxr.predictor import SHIPPED_SPLIT

    from covidxr.data import read_manifest

    split = pd.read_csv(SHIPPED_SPLIT, dtype=str, keep_default_na=False)
    manifest = read_manifest(MANIFEST)  # with each image's path
    tested = manifest[manifest["filename"].isin(split.loc[split["split"] == "test", "filename"])]
    frame = select(tested, {}, {c: c for c in xray_app.predictor.classes}).groupby("label").head(1)
    frame = frame.reset_index(drop=True)
    rows = occlusion_frame(xray_app.predictor, frame, progress=False)
    for path, (_, row) in zip(frame["path"], rows.iterrows()):
        _, _, numbers = map_test.occlusion_api(xray_app, str(path), "lungs")
        assert numbers["blanked_probabilities"]["covid"] == pytest.approx(row[OUTSIDE_LEFT], abs=1e-6)
        assert numbers["as_is"]["covid"] == pytest.approx(row["as is"], abs=1e-6)


def test_no_request_reuses_anothers_lung_model_answers(shelf_app, manifest_frame):
    """Within one job the lung model answers an image once (the check, the outline, every model of
    the compare view); each job starts with none kept, so no request can time another's X-ray."""
    import asyncio

    path = str(real_image(manifest_frame, "normal", "nih14", 2))
    segmenter = shelf_app.predictor.segmenter
    analysis.show(shelf_app, path, view="compare")
    assert len(segmenter._kept) > 0
    seen = asyncio.run(shelf_app.analyses.run(lambda: len(segmenter._kept)))
    assert seen == 0


def test_the_map_tests_validator_checks_each_input_in_its_place(shelf_app):
    """One check per input, in the inputs' order: the page's (file, view); the API's (file,
    blanked, model, painted)."""
    page = Handlers(shelf_app).admit_map_test("x.png", "densenet")
    assert [check["is_valid"] for check in page] == [True, False] and "Unknown model" in page[1]["message"]
    api = Handlers(shelf_app).admit_map_test("x.png", "middle", "densenet", None)
    assert [check["is_valid"] for check in api] == [True, False, False, True]
    assert "not 'middle'" in api[1]["message"] and "Unknown model" in api[2]["message"]
    assert all(check["is_valid"] for check in Handlers(shelf_app).admit_map_test("x.png", "painted", "recipe-2020", None))


def test_the_model_card_is_linked_and_loads_in_its_panel_when_opened(built_page, monkeypatch, tmp_path):
    """The notes that send a student to MODEL_CARD.md link to the page's last panel, which reads
    the repository's file when opened (one request, no model run, not queued), or says where it is."""
    from covidxr.app import words

    demo = built_page
    assert words.CARD_LINK in words.COMPARE_INTRO and words.CARD_LINK in words.MAP_TEST_INTRO
    panel = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "model-card-full")
    assert panel.open is False
    expand = [d for d in demo.fns.values() if any(t[0] == panel._id and t[1] == "expand" for t in d.targets)]
    assert len(expand) == 1 and expand[0].queue is False
    text = expand[0].fn()
    assert text == (REPO / "MODEL_CARD.md").read_text(encoding="utf-8") and "## Known limitations" in text
    monkeypatch.setattr(model_card, "MODEL_CARD", tmp_path / "absent.md")
    assert "covidxr repository" in expand[0].fn()
