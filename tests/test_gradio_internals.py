"""What the app relies on inside Gradio, beyond its documented API: each test fails at once, and
says what moved, when a Gradio release changes it. Gradio is pinned to the minor version these
were checked with (pyproject.toml); before moving the pin, these tell what to revisit.

- covidxr/app/jobs.py counts places from Gradio's queue and refuses at `Queue.push`.
- covidxr/app/gradio_fixes.py patches three components (gr.Label, gr.File, gr.Image).
- covidxr/app/layout.py relies on `api_open=False` keeping queued handlers off `/run/`.
"""

import inspect
import re
import tomllib

import gradio as gr
from gradio import processing_utils, queueing, route_utils, routes
from gradio.components.label import LabelConfidence, LabelData
from gradio.data_classes import ListFiles, PredictBodyInternal
from gradio.utils import NamedString
from packaging.specifiers import SpecifierSet

from conftest import REPO


def test_the_installed_gradio_is_the_pinned_minor_version():
    app = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["app"]
    pin = next(spec for spec in app if spec.startswith("gradio"))
    assert re.fullmatch(r"gradio~=\d+\.\d+\.0", pin), f"pin Gradio to one minor version, not {pin!r}"
    assert gr.__version__ in SpecifierSet(pin.removeprefix("gradio")), (gr.__version__, pin)


def test_the_queue_the_places_are_counted_from():
    """jobs.AnalysisPlaces: Queue.push(body, request, username), its waiting lines and running
    jobs, the events' request, group and liveness, and get_fn by a body's fn_index."""
    assert list(inspect.signature(queueing.Queue.push).parameters) == ["self", "body", "request", "username"]
    assert inspect.iscoroutinefunction(queueing.Queue.push)
    event_fields = inspect.signature(queueing.Event.__init__).parameters
    assert list(event_fields) == ["self", "session_hash", "fn", "request", "username"]
    source = inspect.getsource(queueing.Event.__init__)
    for attribute in ("self.concurrency_id = fn.concurrency_id", "self.alive = True", "self.closed = False",
                      "self.request = request"):
        assert attribute in source, attribute
    queue_source = inspect.getsource(queueing.Queue)
    for attribute in ("self.event_queue_per_concurrency_id", "self.active_jobs", "self.event_ids_to_events",
                      "async def remove_from_queue"):
        assert attribute in queue_source, attribute
    assert list(inspect.signature(route_utils.get_fn).parameters) == ["blocks", "api_name", "body"]
    assert {"session_hash", "fn_index", "request"} <= set(PredictBodyInternal.model_fields)
    # Every route that queues an event goes through push, and an HTTPException raised there is
    # the client's answer (its 429).
    routes_source = inspect.getsource(routes)
    assert routes_source.count("await blocks._queue.push(") == 1
    assert "return await queue_join_helper(" in routes_source


def test_api_open_false_keeps_queued_handlers_off_the_direct_route():
    source = inspect.getsource(routes)
    assert "if not app.get_blocks().api_open and fn.queue:" in source


def test_the_three_component_patches_are_still_needed():
    """gradio_fixes.py: each patch works around what these still show."""
    # gr.Label names the most probable class: a LabelData for another class is not taken as is.
    label = gr.Label()
    decided = LabelData(label="normal", confidences=[LabelConfidence(label="covid", confidence=0.6),
                                                      LabelConfidence(label="normal", confidence=0.4)])
    try:
        unpatched = label.postprocess(decided)
    except ValueError:
        unpatched = None
    assert unpatched is None or unpatched.label != "normal"
    # gr.File's preprocess makes a temp file for each path it hands over (upload_path avoids it).
    assert "NamedTemporaryFile" in inspect.getsource(gr.File._process_single_file)
    assert issubclass(NamedString, str) and hasattr(ListFiles, "__getitem__")  # what upload_path builds on
    # gr.Image saves a returned image by the hash of its bytes, and rewrites it in place.
    assert {"encode_pil_to_bytes", "hash_bytes"} <= set(dir(processing_utils))
    assert "GRADIO_CACHE" in dir(gr.Image()) and hasattr(gr.Image(format="jpeg"), "format")
    assert ".write_bytes(bytes_data)" in inspect.getsource(processing_utils.save_pil_to_cache)
