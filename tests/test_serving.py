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


# -- the loopback probe: places for analyses, not for clicks, on every route ----------------------

def _post(url: str, payload: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except ValueError:
            return error.code, {"detail": body.decode(errors="replace")}


def _functions(url: str) -> dict[str, int]:
    """The page's events by name (each a fn_index), as the page reads them from /config."""
    with urllib.request.urlopen(url + "config", timeout=30) as response:
        config = json.load(response)
    return {dependency["api_name"]: dependency["id"] for dependency in config["dependencies"]}


def _result_of_call(url: str, api_name: str, event_id: str) -> str:
    """The event stream of a REST /call, read to its end: its last event's name."""
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=300) as response:
        events = [line.decode().split(":", 1)[1].strip() for line in response if line.startswith(b"event:")]
    return events[-1]


def test_clicks_that_run_no_model_take_no_place(served_app, examples_dir):
    """Twelve clicks that run no model from one page session (clear, the model card, the eraser,
    a new opacity), then an analysis from the same address: it is accepted and completes. They are
    not queued at all, so they never wait behind an analysis either."""
    functions = _functions(served_app)
    session = "probe-page-session"
    clicks = [("cleared", ["whole-image"]), ("model_card_text", []), ("eraser_opened", [None]),
              ("reblend", [None, 0.5])] * 3
    for name, data in clicks:
        status, answer = _post(f"{served_app}gradio_api/run/predict",
                               {"data": data, "fn_index": functions[name], "session_hash": session})
        assert status == 200, (name, answer)
    xray = next(p for p in sorted(examples_dir.iterdir()) if p.suffix.lower() in (".png", ".jpg"))
    client = Client(served_app, verbose=False)
    label, *_ = client.predict(handle_file(str(xray)), api_name="/predict")
    assert label["label"] in ("covid", "normal", "pneumonia")
    # Nor do they wait behind one: while a Score-CAM analysis runs, a click that runs no model is
    # answered, and the analysis is still running when it is.
    slow = client.submit(handle_file(str(xray)), "scorecam", "predicted class", 0.4, api_name="/predict")
    deadline = time.monotonic() + 60
    while slow.status().code.name != "PROCESSING" and time.monotonic() < deadline:
        time.sleep(0.02)
    status, _ = _post(f"{served_app}gradio_api/run/predict",
                      {"data": [], "fn_index": functions["model_card_text"], "session_hash": session})
    assert status == 200 and not slow.done(), "a click that runs no model waited for the analysis"
    assert slow.result(timeout=300)[0]["label"] in ("covid", "normal", "pneumonia")
    # A handler that runs a model cannot be run directly by /run/, around the queue and its places.
    status, answer = _post(f"{served_app}gradio_api/run/predict",
                           {"data": [None, "gradcam", "predicted class", 0.4, "whole-image"],
                            "fn_index": functions["predict"], "session_hash": session})
    assert status == 404 and "join the queue" in answer["detail"]


def test_a_burst_of_rest_calls_gets_at_most_the_places(served_app, examples_dir):
    """30 Score-CAM jobs at once from one client through the REST route the README documents
    (POST /gradio_api/call/predict): at most 8 accepted, the rest refused with 429 as they ask;
    the accepted ones complete, and then the client has its places back."""
    from covidxr.app.state import MAX_ANALYSES_PER_CLIENT

    import httpx

    xray = next(p for p in sorted(examples_dir.iterdir()) if p.suffix.lower() in (".png", ".jpg"))
    with open(xray, "rb") as handle:  # uploaded once, as a REST client does before its calls
        uploaded = httpx.post(f"{served_app}gradio_api/upload", files={"files": handle}, timeout=60).json()[0]
    data = {"data": [{"path": uploaded, "meta": {"_type": "gradio.FileData"}}, "scorecam", "predicted class", 0.4,
                     "whole-image"]}
    answers = [None] * 30

    def call(index):
        answers[index] = _post(f"{served_app}gradio_api/call/predict", data)

    threads = [threading.Thread(target=call, args=(index,)) for index in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    accepted = [answer["event_id"] for status, answer in answers if status == 200]
    refused = [answer["detail"] for status, answer in answers if status == 429]
    assert 1 <= len(accepted) <= MAX_ANALYSES_PER_CLIENT and len(accepted) + len(refused) == 30, answers
    assert f"{MAX_ANALYSES_PER_CLIENT} analyses waiting or running" in refused[0]
    # The newer wire format of the same call is counted the same way while they wait.
    status, _ = _post(f"{served_app}gradio_api/call/v2/predict", {"file": data["data"][0], "method": "scorecam"})
    assert status in (200, 429)
    assert all(_result_of_call(served_app, "predict", event) == "complete" for event in accepted)
    status, answer = _post(f"{served_app}gradio_api/call/predict", data)
    assert status == 200 and _result_of_call(served_app, "predict", answer["event_id"]) == "complete"


def _raw_post(url: str, path: str, headers: bytes, chunks: list[bytes]) -> str:
    """Send a request by hand (headers, then the body's chunks, stopping when the server has
    answered and closed) and return the answer's first bytes."""
    import socket

    host, port = url.split("//")[1].strip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        try:
            for chunk in chunks:
                connection.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered before the whole body was sent: what is being tested
        answer = b""
        while b"}" not in answer:  # the headers, then the JSON body
            more = connection.recv(4096)
            if not more:
                break
            answer += more
        return answer.decode(errors="replace")


def test_request_bodies_are_bounded(served_app):
    """A request body over its stated size gets a clear 413: read no further than the limit when
    it streams (chunked), not read at all when its Content-Length says so."""
    chunk = b"100000\r\n" + b" " * 0x100000 + b"\r\n"  # 1 MiB a chunk, no length declared
    reply = _raw_post(served_app, "/gradio_api/queue/join",
                      b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n", [chunk] * 3)
    assert reply.startswith("HTTP/1.1 413") and "A request may be at most 1 MiB" in reply
    reply = _raw_post(served_app, "/gradio_api/upload", b"Content-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 60000000\r\n", [])  # claims 60 MB, sends none
    assert reply.startswith("HTTP/1.1 413") and "An upload may be at most" in reply
