"""A tiny real training run writes a complete run folder whose checkpoint loads and predicts."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import real_image
from covidxr import Predictor
from covidxr.checkpoint import read_config
from covidxr.predictor import decide

pytestmark = pytest.mark.slow  # every test here trains


def test_run_folder_is_complete(tiny_run):
    for name in ("model.safetensors", "split.csv", "args.json", "history.csv", "curves.png",
                 "metrics.json", "report.md", "confusion_matrix.png", "roc.png", "predictions.csv",
                 "covid_gallery.png"):
        assert (tiny_run / name).stat().st_size > 0, name
    args = json.loads((tiny_run / "args.json").read_text())
    assert args["epochs"] == 1 and args["input_size"] == 64
    history = pd.read_csv(tiny_run / "history.csv")
    assert list(history["epoch"]) == [1]
    # Mean cross-entropy per image over 3 classes after one epoch: near ln 3 = 1.1, not a sum.
    assert 0.3 < history["train_loss"].iloc[0] < 3.0


def test_the_run_does_not_print_its_test_numbers(tiny_run):
    """A run is chosen on validation before its test split is looked at: the end of a run names
    the kept epoch and its validation AUROC, and where the test evaluation is, not what it says."""
    said = (tiny_run / "run.log").read_text()
    history = pd.read_csv(tiny_run / "history.csv")
    assert f"kept epoch 1 of 1 (validation macro AUROC {history['val_macro_auroc'].iloc[0]:.3f})" in said
    assert str(tiny_run / "report.md") in said
    assert "sensitivity" not in said and "specificity" not in said and "auroc\"" not in said


def test_the_run_judges_the_hospitals_it_left_out(tiny_run):
    """Every hospital not trained on, judged at the end under the checkpoint's rule (the other
    training tests skip it: --no-hospitals)."""
    judged = json.loads((tiny_run / "hospitals.json").read_text())
    assert set(judged) == {"shenzhen", "montgomery"} and all(0 <= h["called_covid"] <= 1 for h in judged.values())
    config = read_config(tiny_run / "model.safetensors")
    assert config["metrics"]["hospitals_left_out"] == judged
    assert config["metrics"]["measured_on"]["images"] == config["metrics"]["n"]


def test_split_file_is_patient_disjoint(tiny_run):
    split = pd.read_csv(tiny_run / "split.csv", dtype=str, keep_default_na=False)
    used = split[split["split"] != "eval_only"]
    assert used.groupby("patient_id")["split"].nunique().max() == 1
    assert {"train", "val", "test"} <= set(used["split"])


def test_checkpoint_describes_itself(tiny_run):
    config = read_config(tiny_run / "model.safetensors")
    assert config["classes"] == ["covid", "normal", "pneumonia"]
    assert config["input_size"] == 64 and config["arch"] == "cxrnet"
    assert config["gradcam_layer"] == "stage4"
    assert set(config["normalisation"]) >= {"mean", "std"}
    assert len(config["data"]["train_data_sha256"]) == 64
    assert config["decision"]["rule"] in ("threshold", "argmax")
    assert config["created"] and config["code_version"]


def test_checkpoint_metrics_are_those_of_the_test_predictions(tiny_run):
    """The accuracy a checkpoint states of itself, recomputed from the run's predictions.csv."""
    config = read_config(tiny_run / "model.safetensors")
    classes = config["classes"]
    predictions = pd.read_csv(tiny_run / "predictions.csv", dtype=str, keep_default_na=False)
    scored = predictions[predictions["target"].isin(classes)]
    split = pd.read_csv(tiny_run / "split.csv", dtype=str, keep_default_na=False)
    assert config["metrics"]["n"] == len(scored) == (split["split"] == "test").sum()
    probabilities = scored[[f"p_{c}" for c in classes]].astype(float).to_numpy()
    labels = np.asarray(classes)[decide(probabilities, classes, config["decision"])]
    assert config["metrics"]["accuracy"] == pytest.approx(float((labels == scored["target"]).mean()))


def test_checkpoint_loads_and_predicts(tiny_run, manifest_frame):
    predictor = Predictor.load(tiny_run / "model.safetensors", device="cpu")
    image = real_image(manifest_frame, "covid", "ieee8023")
    prediction = predictor.predict(image)
    assert prediction.label in predictor.classes
    assert abs(sum(prediction.probabilities.values()) - 1) < 1e-5
    # The fp16 weights round-trip: the model in the run folder gives the same answer each time.
    assert predictor.predict(image).probabilities == prediction.probabilities


def test_torchrun_two_cpu_processes(tmp_path):
    """DistributedDataParallel under torchrun: 2 CPU processes (gloo), one tiny epoch."""
    import subprocess
    import sys

    from conftest import MANIFEST, REPO

    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "train.py", "--manifest", str(MANIFEST), "--limit", "6", "--epochs", "1",
               "--input-size", "64", "--batch-size", "8", "--threads", "1", "--device", "cpu",
               "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "distributed: 2 processes (gloo), 4 images per process per step" in result.stdout + result.stderr
    assert json.loads((out / "args.json").read_text())["processes"] == 2
    assert list(pd.read_csv(out / "history.csv")["epoch"]) == [1]
    predictor = Predictor.load(out / "model.safetensors")
    assert predictor.config["training"]["epochs_run"] == 1
    assert predictor.predict(np.zeros((80, 80), np.uint8)).decided in predictor.classes  # refused (blank), still decided


def test_progressive_resizing_trains_small_then_full_size(tmp_path):
    """--start-size: early epochs on downscaled images, the best model only from full-size epochs."""
    from conftest import MANIFEST
    from covidxr.training import main

    out = main(["--manifest", str(MANIFEST), "--limit", "6", "--epochs", "3", "--input-size", "64",
                "--start-size", "32", "--full-size-epochs", "1", "--batch-size", "8", "--no-hospitals",
                "--out", str(tmp_path / "run"),
                "--cache-dir", str(tmp_path / "cache")])
    history = pd.read_csv(out / "history.csv")
    assert list(history["size"]) == [32, 32, 64]
    config = read_config(out / "model.safetensors")
    assert config["input_size"] == 64 and config["training"]["start_size"] == 32
    assert config["training"]["kept_epoch"] == 3
    assert Predictor.load(out / "model.safetensors").predict(np.zeros((80, 80), np.uint8)).decided in config["classes"]


def test_the_2020_recipe_trains_a_binary_model(tmp_path):
    """The 2020 experiment's command (MODEL_CARD.md): two classes, PA COVID from ieee8023 against
    Kermany's normals. Validation AUROC must be computed for two classes too."""
    from conftest import MANIFEST
    from covidxr.training import main

    out = main(["--manifest", str(MANIFEST), "--classes", "covid", "normal", "--filter", "view=PA",
                "--filter", "source_dataset=ieee8023,kermany", "--limit", "8", "--epochs", "1", "--input-size", "64",
                "--batch-size", "8", "--no-gallery", "--no-hospitals", "--out", str(tmp_path / "run"),
                "--cache-dir", str(tmp_path / "cache")])
    history = pd.read_csv(out / "history.csv")
    assert 0 <= history["val_macro_auroc"].iloc[0] <= 1
    config = read_config(out / "model.safetensors")
    assert config["classes"] == ["covid", "normal"]
    split = pd.read_csv(out / "split.csv", dtype=str, keep_default_na=False)
    trained = split[split["split"] == "train"]
    assert set(trained["source_dataset"]) <= {"ieee8023", "kermany"} and set(trained["view"]) == {"PA"}


def test_macro_auroc_of_two_classes_is_the_positive_class_auroc():
    from sklearn.metrics import roc_auc_score

    from covidxr.training import macro_auroc

    targets = np.array([0, 1, 1, 0, 1, 0])
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9], [0.8, 0.2]])
    assert macro_auroc(targets, probabilities) == pytest.approx(roc_auc_score(targets, probabilities[:, 1]))
    assert macro_auroc(targets, probabilities) == pytest.approx(8 / 9)  # 8 of the 9 (COVID, normal) pairs ranked right
