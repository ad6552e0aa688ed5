"""Class activation maps on real X-rays, for every method, from the shipped model."""

import resource

import numpy as np
import pytest
from PIL import Image

from conftest import DATA_DIR, real_image
from covidxr import Predictor
from covidxr.explain import METHODS


@pytest.fixture(scope="module")
def covid_xray(manifest_frame):
    return real_image(manifest_frame, "covid", "ieee8023", 3)


# Score-CAM runs the network once per activation channel: seconds, not milliseconds.
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m == "scorecam" else m
                                    for m in sorted(METHODS)])
def test_every_method_gives_a_heatmap_at_image_size(predictor, covid_xray, method):
    width, height = Image.open(covid_xray).size
    explanation = predictor.explain(covid_xray, method=method)
    heatmap = explanation.heatmap
    assert heatmap.shape == (height, width) and heatmap.dtype == np.float32
    assert heatmap.min() >= 0 and heatmap.max() <= 1
    assert heatmap.std() > 0.02, "heatmap is (nearly) constant"
    assert explanation.overlay.mode == "RGB" and explanation.overlay.size == (width, height)
    assert explanation.method == method
    assert explanation.target == explanation.prediction.label


def test_prediction_matches_predict(predictor, covid_xray):
    explanation = predictor.explain(covid_xray)
    prediction = predictor.predict(covid_xray)
    assert explanation.prediction.label == prediction.label
    for name in predictor.classes:
        assert explanation.prediction.probabilities[name] == pytest.approx(prediction.probabilities[name], abs=1e-4)


def test_max_side_shrinks_what_is_shown_not_what_is_predicted(predictor, covid_xray, tmp_path):
    # A real X-ray enlarged to 1,500 px high, as a scanner would send it.
    image = Image.open(covid_xray).convert("L")
    large = image.resize((round(image.width * 1500 / image.height), 1500), Image.Resampling.BICUBIC)
    path = tmp_path / "large.png"
    large.save(path)
    full = predictor.explain(path)
    shown = predictor.explain(path, max_side=400)
    assert max(shown.heatmap.shape) == 400 and shown.heatmap.shape == shown.image.shape == shown.lung_mask.shape
    assert shown.overlay.size == (shown.image.shape[1], shown.image.shape[0])
    assert shown.image.shape[0] / shown.image.shape[1] == pytest.approx(large.height / large.width, rel=0.01)
    assert shown.prediction == full.prediction
    assert shown.lung_focus == pytest.approx(full.lung_focus, abs=0.03)
    # Smaller than max_side already: returned at its own size.
    assert predictor.explain(covid_xray, max_side=5000).heatmap.shape == (image.height, image.width)


def test_any_class_can_be_explained(predictor, covid_xray):
    for_covid = predictor.explain(covid_xray, target="covid")
    for_normal = predictor.explain(covid_xray, target="normal")
    assert (for_covid.target, for_normal.target) == ("covid", "normal")
    assert np.abs(for_covid.heatmap - for_normal.heatmap).mean() > 0.05
    # The prediction does not depend on which class is explained.
    assert for_covid.prediction == for_normal.prediction


def test_opacity_changes_the_overlay_only(predictor, covid_xray):
    faint = predictor.explain(covid_xray, opacity=0.1)
    strong = predictor.explain(covid_xray, opacity=0.8)
    np.testing.assert_array_equal(faint.heatmap, strong.heatmap)
    assert np.abs(np.asarray(faint.overlay, float) - np.asarray(strong.overlay, float)).mean() > 5


def test_bad_requests_are_refused(predictor, covid_xray):
    with pytest.raises(ValueError, match="unknown CAM method"):
        predictor.explain(covid_xray, method="magic")
    with pytest.raises(ValueError, match="unknown class"):
        predictor.explain(covid_xray, target="flu")


@pytest.mark.slow
def test_cams_are_reused_and_memory_stays_flat(predictor, manifest_frame):
    image = np.asarray(Image.open(real_image(manifest_frame, "normal", "nih14")))
    for _ in range(5):  # warm-up: allocator pools, the CAM objects themselves
        predictor.explain(image)
        predictor.predict(image)
    cam = predictor._explainer.cams["gradcam"]
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(40):
        predictor.explain(image)
        predictor.predict(image)
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert predictor._explainer.cams["gradcam"] is cam
    # Plain predictions run on another copy of the network: no hook holds their activations.
    assert predictor._explainer.hooks.activations == []
    assert (peak_after - peak_before) / 1024 < 30, f"peak RSS grew by {(peak_after - peak_before) / 1024:.0f} MB"


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam"])
def test_frozen_explainer_gives_the_plain_library_map(method, manifest_frame, predictor):
    """The explainer freezes the weights and starts the graph at the CAM layer; the map must equal
    pytorch-grad-cam's own, on the untouched network."""
    import copy

    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from covidxr.data import load_grayscale
    from covidxr.framing import to_image_frame

    gray = load_grayscale(real_image(manifest_frame, "covid", "ieee8023", 2))
    ours = predictor.explain(gray, method=method, target="covid")
    model = copy.deepcopy(predictor.model)
    tensor, framed = predictor.view(gray)
    inputs = predictor.model_input(tensor[None])
    with METHODS[method](model=model, target_layers=[model.get_submodule(predictor.config["gradcam_layer"])]) as cam:
        plain = cam(input_tensor=inputs, targets=[ClassifierOutputTarget(predictor.classes.index("covid"))])[0]
    np.testing.assert_allclose(ours.heatmap, to_image_frame(plain, framed, gray.shape), atol=1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "efficientnet_b0"])
def test_every_architecture_can_be_explained(arch, predictor):
    """In-place layers after the CAM layer (densenet's final ReLU) must not break the frozen explainer."""
    from covidxr.model import build_model, gradcam_layer_name

    config = dict(predictor.config, arch=arch, gradcam_layer=gradcam_layer_name(arch), input_size=64)
    untrained = Predictor(build_model(arch, 3), config, "cpu")
    untrained.lungs_checkpoint = False
    explanation = untrained.explain(np.random.default_rng(0).random((80, 70)).astype(np.float32))
    assert explanation.heatmap.shape == (80, 70) and np.isfinite(explanation.heatmap).all()
    assert explanation.lung_focus is None


def test_lung_mask_and_overlay_are_computed_when_first_read(predictor, covid_xray, monkeypatch):
    from covidxr.segment import LungSegmenter

    calls = []
    segment = LungSegmenter.segment
    monkeypatch.setattr(LungSegmenter, "segment", lambda self, image, shape=None: calls.append(1) or segment(self, image, shape))
    explanation = predictor.explain(covid_xray)
    assert explanation.heatmap.std() > 0.02 and calls == []  # the map alone: no lung mask drawn
    assert 0 <= explanation.lung_focus <= 1 and len(calls) == 1  # drawn at the scoring size
    assert explanation.overlay.mode == "RGB" and explanation.border_share is not None
    assert len(calls) == 2  # and at the display size, for the outline
    explanation.lung_focus, explanation.overlay
    assert len(calls) == 2  # each computed once, then kept


@pytest.fixture(scope="module")
def adult_normal_and_photo(manifest_frame, tmp_path_factory):
    """The adult-normal example (on which Score-CAM once warned "not a chest X-ray") and a photo."""
    from covidxr.examples import read_examples
    from covidxr.not_xrays import non_xray_images

    example = read_examples().set_index("file_name").loc["00003150_000.png"]
    xray = DATA_DIR / manifest_frame.set_index("sha256").loc[example["sha256"], "filename"]
    photo = tmp_path_factory.mktemp("photo") / "coffee.png"
    Image.fromarray(dict(non_xray_images())["skimage:coffee"]).save(photo)
    return xray, photo


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m == "scorecam" else m
                                    for m in sorted(METHODS)])
def test_every_method_warns_exactly_as_predict(predictor, adult_normal_and_photo, method):
    """Gradient-free Score-CAM runs many masked forward passes: its warnings, label and
    probabilities must still be those of the image itself, as `predict` gives them."""
    for image in adult_normal_and_photo:
        expected = predictor.predict(image)
        prediction = predictor.explain(image, method=method).prediction
        assert prediction.warnings == expected.warnings, (image.name, method)
        assert prediction.not_an_xray == expected.not_an_xray and prediction.label == expected.label
        assert prediction.probabilities == pytest.approx(expected.probabilities, abs=1e-4)
    xray, photo = adult_normal_and_photo
    assert predictor.predict(xray).warnings == [] and predictor.predict(photo).not_an_xray


def test_methods_said_to_be_identical_give_the_same_map(predictor, manifest_frame):
    """What the app tells users ("Grad-CAM = HiResCAM = XGrad-CAM for this network") must hold on
    real X-rays, for the predicted class and another; Grad-CAM++ is not claimed and differs."""
    from covidxr.explain import identical_methods

    same = identical_methods(predictor.config)
    assert same == {"gradcam": ("hirescam", "xgradcam")}  # the shipped network: GAP + linear head
    for path in (real_image(manifest_frame, "covid", "ieee8023", 1), real_image(manifest_frame, "normal", "kermany")):
        for target in (None, "pneumonia"):
            reference = predictor.explain(path, method="gradcam", target=target).heatmap
            for method in same["gradcam"]:
                np.testing.assert_allclose(predictor.explain(path, method=method, target=target).heatmap,
                                           reference, atol=1e-3)
            assert np.abs(predictor.explain(path, method="gradcam++", target=target).heatmap - reference).max() > 0.01
    # densenet121 explains its last batch norm, before a ReLU: every method gives its own map.
    assert identical_methods(dict(predictor.config, arch="densenet121", gradcam_layer="features.norm5")) == {}


def test_the_explained_class_is_the_decided_class_under_temperature_and_threshold(predictor, covid_xray):
    # A checkpoint whose temperature and threshold decide otherwise than the raw softmax does:
    # the map must explain the class the label shows, not the raw softmax's choice.
    raw = predictor.predict(covid_xray).probabilities
    raw_choice = max(raw, key=raw.get)
    temperature = 8.0
    logits = np.log(np.clip([raw[c] for c in predictor.classes], 1e-12, 1)) * predictor.temperature
    tempered = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    chosen = predictor.classes.index(raw_choice)
    assert tempered[chosen] < raw[raw_choice] - 0.05, "the image is too uncertain for this test"
    # Threshold between the tempered and the raw probability of the raw choice: the raw softmax
    # calls that class, the checkpoint's rule (tempered probabilities) does not.
    threshold = float((tempered[chosen] + raw[raw_choice]) / 2)
    config = dict(predictor.config, calibration={"temperature": temperature},
                  decision={"rule": "threshold", "class": raw_choice, "threshold": threshold})
    calibrated = Predictor(predictor.model, config, predictor.device, predictor.ood)
    decided = calibrated.predict(covid_xray).label
    assert decided != raw_choice
    explanation = calibrated.explain(covid_xray)
    assert explanation.prediction.label == decided
    assert explanation.target == decided


@pytest.mark.slow  # seconds: kept out of the fast layer (README: under a minute)
def test_score_cam_draws_no_progress_bar(manifest_frame, capfd):
    """pytorch-grad-cam's Score-CAM drew a progress bar per map: in the app, one per request (and
    a deletion curve's many) in the server's log."""
    from covidxr import Predictor

    Predictor.load().explain(real_image(manifest_frame, "normal", "nih14"), method="scorecam", max_side=128)
    assert "it/s" not in capfd.readouterr().err
