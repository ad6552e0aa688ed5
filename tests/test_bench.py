"""The benchmark command: a quick run writes its table into BENCHMARKS.md-style files."""

import json

import pytest
import torch

from covidxr.bench import main, model_flops, timings, write_markdown
from covidxr.model import build_model


def test_flops_grow_with_the_input_area():
    model = build_model("cxrnet", 3)
    small, large = model_flops(model, 128), model_flops(model, 256)
    assert large == pytest.approx(4 * small, rel=0.05)
    assert 0.5e9 < model_flops(model, 224) < 3e9  # a compact network: about a gigaflop at 224 px


def test_timings_are_medians_of_the_runs():
    result = timings(lambda: torch.ones(100).sum(), repeats=7, warmup=1)
    assert result["runs"] == 7 and 0 < result["median"] <= result["p95"]


def test_markdown_section_is_replaced_and_notes_kept(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("# Benchmarks\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n\n## Notes\nkept\n")
    write_markdown("new table", path)
    text = path.read_text()
    assert "new table" in text and "old" not in text and "## Notes\nkept" in text


def test_quick_run_compares_architectures(tmp_path):
    results = main(["--quick", "--compare", "resnet18", "--markdown", str(tmp_path / "B.md"),
                    "--json", str(tmp_path / "r.json")])
    assert list(results["models"]) == ["cxrnet", "resnet18"]
    table = (tmp_path / "B.md").read_text()
    for row in ("decode+preprocess", "predict+gradcam", "cxrnet speed-up vs resnet18", "forward GFLOPs", "Floor for"):
        assert row in table
    stored = json.loads((tmp_path / "r.json").read_text())
    assert stored["models"]["resnet18"]["gflops"] > stored["models"]["cxrnet"]["gflops"]
