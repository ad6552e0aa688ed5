"""The verdict (report.py): one text for the app, the command line, the API and the CSV."""

import pytest

from covidxr import report

PROBABILITIES = {"covid": 0.2, "normal": 0.7, "pneumonia": 0.1}
THRESHOLD = {"rule": "threshold", "class": "covid", "threshold": 0.15, "method": "youden"}


def test_a_result_names_the_decided_class_and_its_rule():
    v = report.verdict("normal", PROBABILITIES, target="normal", method="hirescam",
                       shares={"lung_focus": 0.8, "border_share": 0.05, "top_share": 0.02},
                       same_methods={"gradcam": ("hirescam", "xgradcam")})
    assert (v.status, v.label, v.shown_label) == (report.RESULT, "normal", "normal")
    text = report.markdown(v)
    assert text.startswith("### Prediction: normal\nDecided by the model's rule: the most probable class.")
    assert "HiResCAM, here the same map as Grad-CAM and XGrad-CAM" in text and "blue = weakest" in text
    assert "**Lung focus 80%**" in text and not v.notice
    assert report.label_output(v) == {"label": "normal", "confidences": [
        {"label": "normal", "confidence": 0.7}, {"label": "covid", "confidence": 0.2},
        {"label": "pneumonia", "confidence": 0.1}]}


def test_a_threshold_decision_says_why_it_is_not_the_top_class():
    v = report.verdict("covid", PROBABILITIES, decision=THRESHOLD)
    assert v.label == "covid" and "though another class is more probable" in v.why
    assert v.rule.startswith("covid whenever its probability is at least 0.15 (youden)")
    assert report.label_output(v)["label"] == "covid"


def test_the_notice_fires_only_on_the_map_it_was_measured_on():
    low = {"lung_focus": 0.1, "chance_focus": 0.3, "border_share": 0.5, "top_share": 0.3}
    rule = {"rule": "chance", "method": "gradcam"}
    same = {"gradcam": ("hirescam", "xgradcam")}
    fires = report.verdict("normal", PROBABILITIES, target="normal", method="xgradcam", shares=low, notice=rule,
                           same_methods=same)
    assert fires.notice.startswith("The evidence is not on the lungs. This map puts 10% of its mass on the lungs, "
                                   "no more than the 30% a map spread evenly over the image would.")
    assert "**The evidence is not on the lungs.**" in report.markdown(fires)
    assert "(an even spread: 30%)" in report.markdown(fires) and report.csv_fields(fires, [])["chance_focus"] == "0.300"
    for target, method in (("covid", "gradcam"), ("normal", "gradcam++")):
        assert not report.verdict("normal", PROBABILITIES, target=target, method=method, shares=low,
                                  notice=rule, same_methods=same).notice
    # Better than an even spread: no notice, however low the focus; a crop's chance names the box.
    assert not report.verdict("normal", PROBABILITIES, target="normal", method="gradcam", notice=rule,
                              shares=dict(low, chance_focus=0.09)).notice
    cropped = report.verdict("normal", PROBABILITIES, target="normal", method="gradcam", notice=rule,
                             shares=dict(low, lung_focus=0.5, chance_focus=0.55, cropped=True))
    assert "than the 55% a map spread evenly over the lungs' box would" in cropped.notice
    # An X-ray read with a warning gets no lung focus or notice: its "lungs" may be none.
    warned = report.verdict("normal", PROBABILITIES, warnings=["No lungs were found"], target="normal",
                            method="gradcam", shares=low, notice=rule)
    assert warned.lung_focus is None and not warned.notice and "Check the input.** No lungs" in report.markdown(warned)


def test_a_stored_percentile_rule_is_read_as_the_chance_rule():
    """Checkpoints from before the chance rule carry a threshold at a percentile of their own
    maps' lung focus: the notice follows the chance rule for them, with their method."""
    former = {"threshold": 0.3, "percentile": 10.0, "method": "hirescam", "split": "val"}
    assert report.notice_rule({"lung_focus_notice": former}) == {"rule": "chance", "method": "hirescam"}
    assert report.notice_rule({}) == report.DEFAULT_NOTICE == {"rule": "chance", "method": "gradcam"}
    stored = {"rule": "chance", "method": "gradcam", "fires_on_all": 0.2}
    assert report.notice_rule({"lung_focus_notice": stored}) == stored


def test_a_refusal_names_no_class_anywhere():
    v = report.verdict("covid", PROBABILITIES, reasons=["This image is in colour."], target="covid", method="gradcam",
                       shares={"lung_focus": 0.1, "border_share": 0, "top_share": 0})
    assert (v.status, v.label, v.shown_label) == (report.REFUSED, None, report.NOT_AN_XRAY)
    assert v.lung_focus is None and not v.notice
    text = report.markdown(v)
    assert text.startswith(f"### {report.NOT_AN_XRAY_HEADLINE}\n") and "Prediction:" not in text
    assert "This image is in colour." in text and "covid 20%" in text[text.index('class="secondary"'):]
    assert report.label_output(v) == {"label": report.NOT_AN_XRAY, "confidences": []}
    row = report.csv_fields(v, ["covid", "normal", "pneumonia"])
    assert row["label"] == report.NOT_AN_XRAY and row["label"] not in PROBABILITIES
    assert row["warning"] == "This image is in colour." and row["p_covid"] == "0.2000" and row["lung_focus"] == ""
    assert report.caption(v).startswith("NOT A FRONTAL CHEST X-RAY: no result.")


def test_an_error_is_a_verdict_too():
    v = report.failure("notes.png: not an image we can read")
    assert (v.status, v.label, v.shown_label) == (report.ERROR, None, report.NO_RESULT)
    assert report.markdown(v) == f"### {report.ERROR_HEADLINE}\nnotes.png: not an image we can read"
    assert report.label_output(v) == {"label": report.NO_RESULT, "confidences": []}
    row = report.csv_fields(v, ["covid"])
    assert row == {"label": "", "p_covid": "", "lung_focus": "", "chance_focus": "", "notice": "", "warning": "",
                   "error": "notes.png: not an image we can read"}
    # A file name is text, not markup.
    assert "\\*" in report.markdown(report.failure("a*b_c.png: empty"))


def test_csv_fields_and_caption_of_a_result():
    v = report.verdict("normal", PROBABILITIES, target="covid", method="gradcam",
                       shares={"lung_focus": 0.42, "chance_focus": 0.3, "border_share": 0.1, "top_share": 0.1})
    row = report.csv_fields(v, ["covid", "normal", "pneumonia"])
    assert row == {"label": "normal", "p_covid": "0.2000", "p_normal": "0.7000", "p_pneumonia": "0.1000",
                   "lung_focus": "0.420", "chance_focus": "0.300", "notice": "", "warning": "", "error": ""}
    assert report.caption(v) == "Grad-CAM evidence for covid (p = 0.20); prediction: normal (p = 0.70); lung focus 42% (even spread 30%)"
    assert report.caption(report.verdict("normal", PROBABILITIES, target="normal", method="eigencam")) == \
        "Eigen-CAM evidence for normal (p = 0.70): the prediction"


@pytest.mark.parametrize("field", ["label", "probabilities", "warnings", "reasons"])
def test_prediction_and_its_verdict_agree(predictor, manifest_frame, field):
    from conftest import real_image
    from covidxr.not_xrays import non_xray_images

    for image in (real_image(manifest_frame, "normal", "nih14"), dict(non_xray_images())["skimage:coffee"]):
        prediction = predictor.predict(image)
        verdict = prediction.verdict
        if field == "label":
            assert prediction.label == verdict.label
        elif field == "probabilities":
            assert dict(verdict.probabilities) == prediction.probabilities
        elif field == "reasons":
            assert list(verdict.reasons) == prediction.reasons
        else:
            assert [*verdict.reasons, *verdict.warnings] == prediction.warnings
