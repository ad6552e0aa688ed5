"""The load test, short: 4 concurrent clients against the launched app, twice 20 requests."""

import pytest

from benchmarks.common import default_images
from benchmarks.loadtest import load_test, markdown
from conftest import DATA_DIR


@pytest.mark.app
def test_short_load_has_no_errors_and_no_memory_growth():
    images = default_images(DATA_DIR, count=8)
    assert len(images) == 8 and all(path.exists() for path in images)
    result = load_test(images, clients=4, requests=20, progress=False)
    assert result["errors"] == 0, result["error_messages"]
    assert result["ok"] == 20 and result["second_round"]["ok"] == 20
    assert result["throughput_per_s"] == pytest.approx(result["ok"] / result["wall_s"])
    # The app serves one request at a time, so a client waits for the others: its latency is
    # about clients / throughput (in milliseconds, within a factor of 3 on a noisy machine).
    expected_ms = 4 / result["throughput_per_s"] * 1000
    assert expected_ms / 3 < result["latency_ms"]["p50"] < 3 * expected_ms, (result["latency_ms"], expected_ms)
    # Memory samples are the server's own (a process with torch and a model: hundreds of MiB).
    assert result["memory_samples_mb"] and all(mb > 200 for _, mb in result["memory_samples_mb"])
    # The same work twice: the second round must not need much more memory than the first.
    assert result["memory_mb"]["growth_round_2"] < 150, result["memory_mb"]
    assert result["answers_afterwards"]
    assert "| latency p95 (ms) |" in markdown(result)
