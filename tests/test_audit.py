"""The shortcut audit on a small real subset writes every table, the plot and the sanity check."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import MANIFEST, real_image
from covidxr.audit import GROUPS, main, occlusion_summary, randomisation_check
from covidxr.occlusion import OCCLUSIONS, occluded_views
from covidxr.predictor import SHIPPED_CHECKPOINT, SHIPPED_SPLIT
from covidxr.segment import evidence_shares


@pytest.mark.slow
def test_audit_command_on_a_small_subset(tmp_path, predictor):
    result = main(["--manifest", str(MANIFEST), "--split-csv", str(SHIPPED_SPLIT), "--filter",
                   "source_dataset=kermany,nih14", "--limit", "10", "--sanity-images", "3", "--out", str(tmp_path)])
    for name in ("audit.md", "audit.json", "audit.csv", "lung_focus.png", "lowest_focus.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = (tmp_path / "audit.md").read_text()
    for title in GROUPS:
        assert f"## By {title}" in report
    assert "Randomised-weights sanity check" in report
    tables = json.loads((tmp_path / "audit.json").read_text())["tables"]
    assert set(tables) == set(GROUPS) | {"all"}
    assert tables["all"][0]["images"] == 10
    # The tables summarise the per-image rows...
    rows = pd.read_csv(tmp_path / "audit.csv")
    assert set(rows["source_dataset"]) <= {"kermany", "nih14"}  # the filter held
    by_source = {row["source_dataset"]: row["lung focus, mean"] for row in tables["source"]}
    assert by_source == pytest.approx(rows.groupby("source_dataset")["lung_focus"].mean().to_dict())
    # ...and each row's lung focus is the share of its heatmap on its lungs, recomputed here.
    first = rows.iloc[0]
    explanation = predictor.explain(MANIFEST.parent / first["filename"])
    assert first["predicted"] == explanation.prediction.label
    assert first["lung_focus"] == pytest.approx(explanation.lung_focus, abs=1e-6)  # one scoring size
    assert first["lung_focus"] == pytest.approx(
        evidence_shares(explanation.scored_map, explanation.scored_lungs)["lung_focus"], abs=1e-6)
    # The sanity check in the report is the function's, on the same seeded sample.
    assert result["sanity"]["images"] == 3 and result["sanity"]["spearman_mean"] < 0.8


def test_randomised_weights_change_the_maps(manifest_frame, predictor):
    paths = [str(real_image(manifest_frame, "covid", "ieee8023", i)) for i in range(3)]
    check = randomisation_check(predictor, paths, progress=False)
    assert check["images"] == 3 and check["explained_class"] == predictor.classes[0]
    # A map that ignored the weights would correlate near 1 with the random model's.
    assert check["spearman_mean"] < 0.8
    assert check["spearman_abs_mean"] >= abs(check["spearman_mean"])
    # Seeded: the same random network, the same answer.
    assert randomisation_check(predictor, paths, progress=False) == check


@pytest.mark.slow
def test_store_notice_measures_the_chance_rule_on_validation_xrays(tmp_path):
    """`--store-notice`: how often the chance rule fires on the val rows (and the former
    percentile rule, for comparison), written into the checkpoint's description; the weights stay
    as they were; the app reads it."""
    import shutil

    import torch

    from covidxr.checkpoint import load_checkpoint, read_config
    from covidxr.app.model_card import notice_facts
    from covidxr.report import notice_rule

    checkpoint = tmp_path / "model.safetensors"
    shutil.copy(SHIPPED_CHECKPOINT, checkpoint)
    with pytest.raises(SystemExit):  # which X-rays are the validation ones is the split's to say
        main(["--checkpoint", str(checkpoint), "--manifest", str(MANIFEST), "--store-notice"])
    result = main(["--checkpoint", str(checkpoint), "--manifest", str(MANIFEST), "--split-csv", str(SHIPPED_SPLIT),
                   "--store-notice", "--limit", "12"])
    table = result["table"]
    split = pd.read_csv(SHIPPED_SPLIT)
    assert set(table["filename"]) <= set(split.loc[split["split"] == "val", "filename"]) and len(table) == 12
    assert ((table["chance_focus"] > 0) & (table["chance_focus"] < 1)).all()
    correct = table[table["correct"] == "yes"]
    stored = read_config(checkpoint)["lung_focus_notice"]
    assert stored == result["notice"] and stored["split"] == "val" and stored["images"] == len(correct) > 0
    assert stored["rule"] == "chance"
    assert stored["fires_on_all"] == pytest.approx((table["lung_focus"] <= table["chance_focus"]).mean())
    assert stored["fires_on_correct"] == pytest.approx((correct["lung_focus"] <= correct["chance_focus"]).mean())
    former = stored["former_percentile_rule"]
    assert former["threshold"] == pytest.approx(np.percentile(correct["lung_focus"], 10))
    assert former["fires_on_correct"] == pytest.approx((correct["lung_focus"] < former["threshold"]).mean())
    before, _ = load_checkpoint(SHIPPED_CHECKPOINT)
    after, config = load_checkpoint(checkpoint)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert notice_rule(config) == stored
    assert f"of this model's 12 val X-rays" in notice_facts(config)


@pytest.mark.slow
def test_hand_drawn_focus_is_stored_in_the_checkpoint_it_measured(tmp_path):
    """--store-focus writes the hand-drawn-mask lung focus into the checkpoint's description (the
    app's model card shows it), weights untouched; it needs --hand-masks and --checkpoint."""
    import shutil

    from covidxr.checkpoint import read_config

    checkpoint = tmp_path / "model.safetensors"
    shutil.copy(SHIPPED_CHECKPOINT, checkpoint)
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoint), "--manifest", str(MANIFEST), "--store-focus"])
    result = main(["--checkpoint", str(checkpoint), "--manifest", str(MANIFEST), "--split-csv", str(SHIPPED_SPLIT),
                   "--hand-masks", "--store-focus", "--limit", "30", "--out", str(tmp_path / "audit")])
    measured = result["hand_drawn"]
    assert len(measured) > 0
    stored = read_config(checkpoint)["lung_focus"]
    assert stored["images"] == len(measured) and stored["target"] == "covid"
    assert stored["mean"] == pytest.approx(measured["lung_focus"].mean())
    assert 0 < stored["chance"] < 1 and stored["chance"] == pytest.approx(measured["chance"].mean())
    assert SHIPPED_CHECKPOINT.read_bytes() != checkpoint.read_bytes()


def test_occluded_views_blank_one_side_of_the_dilated_lungs():
    gray = np.random.default_rng(0).random((200, 160)).astype(np.float32)
    lungs = np.zeros(gray.shape, bool)
    lungs[60:140, 30:70] = True
    views = occluded_views(gray, lungs)
    assert list(views) == list(OCCLUSIONS)
    assert np.array_equal(views["as is"], gray)
    fill = np.float32(np.median(gray))
    outside, inside = views["only the outside left"], views["only the lungs left"]
    assert (outside[lungs] == fill).all() and (inside[lungs] == gray[lungs]).all()
    assert inside[0, 0] == fill and outside[0, 0] == gray[0, 0]
    # The blank reaches past the lung edge (dilated by 4% of the longer side: 8 px here).
    assert outside[100, 75] == fill and outside[100, 85] == gray[100, 85]


@pytest.mark.slow
def test_occlusion_command_on_real_xrays(tmp_path, predictor, small_manifest):
    """`--occlusion` on adult COVID, pneumonia, SARS and normal X-rays: per image, the COVID
    probability as is is the model's own; the AUROCs are recomputed from the per-image rows,
    on labelled images only (SARS has no class)."""
    from sklearn.metrics import roc_auc_score

    result = main(["--manifest", str(small_manifest), "--filter", "source_dataset=ieee8023,nih14",
                   "--occlusion", "--all-patients", "--out", str(tmp_path)])
    rows = pd.read_csv(tmp_path / "occlusion.csv", keep_default_na=False)
    assert set(rows["target"]) == {"covid", "normal", "pneumonia", ""}
    assert json.loads((tmp_path / "occlusion.json").read_text())["all"]["images"] == (rows["target"] != "").sum()
    first = rows.iloc[0]
    assert first["as is"] == pytest.approx(predictor.predict(first["filename"]).probabilities["covid"], abs=1e-6)
    assert not np.allclose(rows["as is"], rows["only the outside left"])
    labelled = rows[rows["target"] != ""]
    for name in OCCLUSIONS:
        assert result["summary"].loc["all", name] == pytest.approx(
            roc_auc_score(labelled["target"] == "covid", labelled[name]))


def test_occlusion_check_refuses_a_lung_reading_checkpoint(predictor):
    from covidxr import Predictor
    from covidxr.audit import occlusion_frame
    from covidxr.framing import LUNG_CROP

    reads_lungs = Predictor(predictor.model, dict(predictor.config, framing=LUNG_CROP))
    with pytest.raises(ValueError, match="whole-image checkpoints"):
        occlusion_frame(reads_lungs, pd.DataFrame(columns=["path"]))


def test_store_notice_never_rewrites_the_packaged_weights_by_default(capsys):
    before = SHIPPED_CHECKPOINT.read_bytes()
    with pytest.raises(SystemExit):
        main(["--store-notice", "--limit", "2"])
    assert "--checkpoint" in capsys.readouterr().err
    assert SHIPPED_CHECKPOINT.read_bytes() == before


def test_the_occlusion_test_of_one_image_blanks_each_side(predictor, manifest_frame):
    """`Predictor.occlusion`: the views `audit --occlusion` scores, for one image, each predicted."""
    from covidxr.data import load_grayscale
    from covidxr.occlusion import AS_IS, LUNGS_LEFT, OUTSIDE_LEFT

    path = real_image(manifest_frame, "covid", "ieee8023")
    test = predictor.occlusion(path)
    gray = load_grayscale(path)
    assert list(test.views) == list(OCCLUSIONS) and np.array_equal(test.views[AS_IS], gray)
    assert test.probabilities[AS_IS] == pytest.approx(predictor.predict(gray).probabilities)
    for view in (OUTSIDE_LEFT, LUNGS_LEFT):
        assert not np.array_equal(test.views[view], gray)
        assert test.probabilities[view] == pytest.approx(predictor.predict(test.views[view]).probabilities)
        assert test.change(view, "covid") == pytest.approx(test.probabilities[view]["covid"]
                                                           - test.probabilities[AS_IS]["covid"])
    # Blanking either side changes what the network sees, so its answer moves.
    assert test.probabilities[OUTSIDE_LEFT] != test.probabilities[AS_IS] != test.probabilities[LUNGS_LEFT]


@pytest.mark.slow  # several seconds: kept out of the fast layer
def test_one_scoring_size_gives_one_answer_on_every_path(manifest_frame, tmp_path):
    """The same X-ray at several file sizes, through the app (shown at 768 px), the CLI (heatmaps
    written up to 2,048 px, or none), the API (Predictor.explain at full size) and the audit:
    one lung focus and one notice for each file, and nearly one across its sizes."""
    import pandas as pd

    from PIL import Image

    from covidxr import Predictor
    from covidxr.app import analysis
    from covidxr.app.state import XrayApp
    from covidxr.audit import audit_frame
    from covidxr.cli import main as covidxr

    predictor = Predictor.load()
    xray = Image.open(real_image(manifest_frame, "covid", "ieee8023", 3)).convert("L")
    app = XrayApp(predictor, tmp_path)
    by_size = {}
    for side in (600, 1400, 2400):
        path = tmp_path / f"xray-{side}.png"
        xray.resize((side, round(side * xray.height / xray.width))).save(path)
        api = predictor.explain(path)
        shown = analysis.analysed(app, str(path), "model")
        frame = pd.DataFrame([{"path": str(path), "filename": path.name, "label": "covid", "target": "covid",
                               "source_dataset": "x", "age_group": "adult"}])
        audited = audit_frame(predictor, frame, progress=False).iloc[0]
        assert covidxr(["predict", str(path), "--csv", str(tmp_path / "plain.csv")]) == 0
        assert covidxr(["predict", str(path), "--csv", str(tmp_path / "drawn.csv"), "--cam-dir", str(tmp_path / "cams")]) == 0
        cli = [pd.read_csv(tmp_path / name).iloc[0] for name in ("plain.csv", "drawn.csv")]
        focus = {"api": api.lung_focus, "app": shown.verdict.lung_focus, "audit": audited["lung_focus"],
                 "cli": cli[0]["lung_focus"], "cli with heatmaps": cli[1]["lung_focus"]}
        assert max(focus.values()) - min(focus.values()) < 1e-3, (side, focus)  # the CSV has 3 decimals
        notices = [bool(api.verdict.notice), bool(shown.verdict.notice),
                   *[isinstance(row["notice"], str) and bool(row["notice"]) for row in cli]]
        assert len(set(notices)) == 1, (side, notices)
        by_size[side] = api.lung_focus
    assert max(by_size.values()) - min(by_size.values()) < 0.02, by_size
