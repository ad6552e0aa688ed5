"""The launched app under concurrent, careless clients (the `app` layer: `python app.py` in its
own process). One client's cancelled jobs must not change another client's results."""

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from gradio_client import Client, handle_file


def _analysis(result) -> tuple:
    """What a /predict result is, byte for byte: label, both images' files, summary."""
    label, original, overlay, summary = result
    return json.dumps(label, sort_keys=True), Path(original).read_bytes(), Path(overlay).read_bytes(), summary


def test_cancel_storm_does_not_touch_another_clients_results(served_app, examples_dir):
    xray = handle_file(str(next(p for p in sorted(examples_dir.iterdir()) if p.suffix.lower() in (".png", ".jpg"))))
    quiet = Client(served_app, verbose=False)
    alone = _analysis(quiet.predict(xray, "gradcam", "predicted class", 0.4, api_name="/predict"))

    storm = Client(served_app, verbose=False)
    stop = threading.Event()
    cycles = []

    def submit_and_cancel():
        while not stop.is_set() and len(cycles) < 12:
            job = storm.submit(xray, "scorecam", "predicted class", 0.4, api_name="/predict")
            deadline = time.monotonic() + 30
            while job.status().code.name not in ("PROCESSING", "FINISHED") and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # well inside Score-CAM's many forward passes
            job.cancel()
            cycles.append(job)

    stormer = threading.Thread(target=submit_and_cancel)
    stormer.start()
    try:
        during = [_analysis(quiet.predict(xray, "gradcam", "predicted class", 0.4, api_name="/predict"))
                  for _ in range(4)]
    finally:
        stop.set()
        stormer.join(timeout=300)
    assert len(cycles) >= 2, "the storm ran alongside"
    for result in during:
        assert result[0] == alone[0] and result[3] == alone[3]
        assert result[1] == alone[1] and result[2] == alone[2], "images differ from the same request made alone"
    # The cancelled jobs freed their places: the storm's client may analyse again.
    assert _analysis(storm.predict(xray, "gradcam", "predicted class", 0.4, api_name="/predict")) == alone


def test_unknown_api_names_get_404_without_server_paths(served_app):
    for path in ("gradio_api/call/no_such_thing", "gradio_api/run/no_such_thing"):
        request = urllib.request.Request(served_app + path, data=b'{"data": []}',
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=30)
            raise AssertionError("accepted an unknown API name")
        except urllib.error.HTTPError as error:
            body = error.read().decode()
            assert error.code == 404, (error.code, body)
            assert "no_such_thing" in body and str(Path.cwd()) not in body and "/work" not in body
