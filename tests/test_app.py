"""The Gradio app: its handler called directly, the launched app through gradio_client, and a
real browser clicking an example."""

from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from benchmarks.common import shared_ssl_context
from conftest import real_image
from covidxr.examples import FETCH_COMMAND
from covidxr.not_xrays import non_xray_images
from covidxr.serve import DISPLAY_SIDE, PREDICTED, XrayApp, model_facts

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def xray_app(examples_dir, predictor):
    return XrayApp(predictor, examples_dir)


def test_handler_on_a_real_xray(xray_app, manifest_frame):
    path = real_image(manifest_frame, "pneumonia", "kermany")
    probabilities, original, overlay, summary = xray_app.analyse(str(path))
    assert set(probabilities) == {"covid", "normal", "pneumonia"}
    assert sum(probabilities.values()) == pytest.approx(1, abs=1e-5)
    assert original.size == overlay.size == Image.open(path).size
    decided = xray_app.predictor.predict(path).label
    assert summary.startswith(f"### Prediction: {decided}")
    assert "**Lung focus " in summary and "top strip" in summary
    _, _, covid_overlay, covid_summary = xray_app.analyse(str(path), "gradcam++", "covid", 0.6)
    assert "evidence for **covid**" in covid_summary
    assert covid_overlay.tobytes() != overlay.tobytes()


def test_handler_returns_display_sized_images(xray_app, manifest_frame, tmp_path):
    image = Image.open(real_image(manifest_frame, "normal", "nih14")).convert("L")
    path = tmp_path / "scanner-size.png"
    image.resize((2400, 2400), Image.Resampling.BICUBIC).save(path)
    _, original, overlay, _ = xray_app.analyse(str(path))
    assert original.size == overlay.size == (DISPLAY_SIDE, DISPLAY_SIDE)


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"%PDF-1.4 not an x-ray", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "Cannot read"),
])
def test_handler_refuses_bad_files_clearly(xray_app, tmp_path, content, message):
    path = tmp_path / "upload.png"
    path.write_bytes(content)
    with pytest.raises(gr.Error, match=message):
        xray_app.analyse(str(path))


def test_handler_refuses_enormous_images(xray_app, tmp_path):
    path = tmp_path / "enormous.png"
    Image.new("1", (9000, 8000)).save(path)  # 72 megapixels, tiny on disk
    with pytest.raises(gr.Error, match="megapixels"):
        xray_app.analyse(str(path))


def test_handler_warns_on_a_photo_and_still_predicts(xray_app, tmp_path):
    path = tmp_path / "cat.png"
    Image.fromarray(dict(non_xray_images())["skimage:chelsea"]).save(path)
    probabilities, original, overlay, summary = xray_app.analyse(str(path))
    assert summary.startswith("> ⚠️ **Check the input.**")
    assert "in colour" in summary and "unlike the frontal chest X-rays" in summary
    assert "### Prediction:" in summary and set(probabilities) == {"covid", "normal", "pneumonia"}
    assert "Lung focus" not in summary  # lungs "found" on a cat would mean nothing


def test_handler_needs_a_file(xray_app):
    with pytest.raises(gr.Error, match="Upload a chest X-ray"):
        xray_app.analyse(None)


def test_the_predicted_class_choice_explains_the_decided_label(xray_app, manifest_frame):
    path = real_image(manifest_frame, "covid", "ieee8023", 1)
    label = xray_app.predictor.predict(path).label
    *_, summary = xray_app.analyse(str(path), "gradcam", PREDICTED)
    assert f"evidence for **{label}**" in summary and "not for the prediction" not in summary
    other = next(c for c in xray_app.predictor.classes if c != label)
    *_, summary = xray_app.analyse(str(path), "gradcam", other)
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
    texts = [block.value for block in bare.build().blocks.values() if isinstance(block, gr.Markdown)]
    assert any(FETCH_COMMAND in (text or "") for text in texts)


@pytest.mark.app
def test_launched_app_through_gradio_client(served_app, examples_dir, tmp_path):
    client = Client(served_app, verbose=False, ssl_verify=shared_ssl_context())
    example = next(p for p in sorted(examples_dir.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    label, original, overlay, summary = client.predict(handle_file(str(example)), api_name="/predict")
    assert {c["label"] for c in label["confidences"]} == {"covid", "normal", "pneumonia"}
    assert Image.open(overlay).size == Image.open(example).size
    # A bad file gets a clear error, and the next good request is served.
    bad = tmp_path / "notes.png"
    bad.write_text("definitely not an X-ray")
    with pytest.raises(Exception, match="Cannot read notes.png"):
        client.predict(handle_file(str(bad)), api_name="/predict")
    label_again, *_ = client.predict(handle_file(str(example)), "eigencam", "covid", 0.5, api_name="/predict")
    assert label_again["label"] in ("covid", "normal", "pneumonia")
    # A document through the API: the prediction comes with the warning.
    document = tmp_path / "letter.png"
    Image.fromarray(dict(non_xray_images())["generated:document0"]).save(document)
    *_, summary = client.predict(handle_file(str(document)), api_name="/predict")
    assert "Check the input" in summary and "### Prediction:" in summary


@pytest.mark.browser
def test_browser_clicks_an_example(served_app, tmp_path):
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: apt-get install chromium (see README)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(served_app)
        page.get_by_text("not a medical device").wait_for(timeout=30_000)
        page.locator("#examples img").first.wait_for(timeout=30_000)
        page.locator("#examples button.thumbnail-item").first.click()
        page.locator("#overlay img").wait_for(timeout=60_000)
        page.locator("#prediction").get_by_text("%").first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000
