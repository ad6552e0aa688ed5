"""The load test, short: 4 concurrent clients against the launched app, twice 20 requests."""

from conftest import DATA_DIR
from covidxr.loadtest import default_images, load_test, markdown


def test_short_load_has_no_errors_and_no_memory_growth():
    images = default_images(DATA_DIR, count=8)
    assert len(images) == 8 and all(path.exists() for path in images)
    result = load_test(images, clients=4, requests=20, progress=False)
    assert result["errors"] == 0, result["error_messages"]
    assert result["ok"] == 20 and result["second_round"]["ok"] == 20
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p95"] <= result["latency_ms"]["max"]
    # The same work twice: the second round must not need much more memory than the first.
    assert result["memory_mb"]["growth_round_2"] < 150, result["memory_mb"]
    assert result["answers_afterwards"]
    assert "| latency p95 (ms) |" in markdown(result)
