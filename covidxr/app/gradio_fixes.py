"""The three places where the app changes what a Gradio component does, each for a reason
Gradio's own options do not cover. They patch one component instance's `preprocess` or
`postprocess` (a component subclass would do it too, but Gradio writes a .pyi stub beside the
module of any component subclass at import time). Gradio is pinned to the minor version these
were written against (pyproject.toml); tests/test_gradio_internals.py fails at once if any
internal named here moves.

- `decided_label`: a gr.Label names the most probable class; ours names the class the
  checkpoint's rule decided (under a threshold, not always the top one).
- `upload_path`: a gr.File hands its handler the upload's path without the empty temp file
  Gradio 6.31 also creates for each request.
- `saved_once`: a returned image is written under a temporary name and renamed into place,
  never rewritten in place while another request downloads it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gradio import processing_utils
from gradio.components.label import LabelConfidence, LabelData
from gradio.data_classes import ListFiles
from gradio.utils import NamedString
from PIL import Image

from .. import report


def label_data(verdict: report.Verdict) -> LabelData:
    """The label output of a verdict (report.label_output): the decided class with every class's
    probability, or the refusal or "no result" with no bars."""
    value = report.label_output(verdict)
    return LabelData(label=value["label"], confidences=[LabelConfidence(**item) for item in value["confidences"]])


def decided_label(component):
    """gr.Label's postprocess names the most probable class; a `LabelData` built by
    `label_data` passes through unchanged, so the decision is what both the page and the API say."""
    postprocess = component.postprocess

    def keep_decided(value):
        return value if isinstance(value, LabelData) else postprocess(value)

    component.postprocess = keep_decided
    return component


def upload_path(component):
    """The upload's path, as gr.File(type="filepath") hands it to a handler, without the empty
    temp file Gradio 6.31 also creates in the app's temp folder each time (File.
    _process_single_file opens a NamedTemporaryFile(delete=False) and never uses it): two per
    analysis (the validator's preprocessing and the handler's), 1,224 empty files after 600."""
    def path_only(payload):
        if payload is None:
            return None
        if isinstance(payload, ListFiles):
            payload = payload[0]
        return NamedString(payload.path)

    component.preprocess = path_only
    return component


def saved_once(component):
    """gr.Image's postprocess, with a PIL image first saved where Gradio would save it (a folder
    named by the hash of its encoded bytes, in the app's temp folder), but written under a
    temporary name and renamed into place, and not written at all when it is already there.
    Gradio 6.31 rewrites the file in place (`Path.write_bytes`) each time the same image comes
    back: two users analysing the same X-ray (an example), or one changing the method (the
    input image is the same), truncated a download of that file in progress ("peer closed
    connection": 9 of 300 /predict calls from 4 threads with the same X-ray)."""
    postprocess = component.postprocess

    def save_then_postprocess(value):
        # (Other modes go to Gradio as they are: it falls back to PNG where JPEG cannot hold them.)
        if isinstance(value, Image.Image) and value.mode in ("L", "RGB"):
            data = processing_utils.encode_pil_to_bytes(value, component.format)
            folder = Path(component.GRADIO_CACHE) / processing_utils.hash_bytes(data)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"image.{component.format}"
            if path.exists():  # the same bytes (same hash): touched, so the hourly clean-up keeps it
                os.utime(path)
            else:
                staged = tempfile.NamedTemporaryFile(dir=folder, prefix=".image.", delete=False)
                with staged:
                    staged.write(data)
                os.replace(staged.name, path)
            value = str(path.resolve())
        return postprocess(value)

    component.postprocess = save_then_postprocess
    return component
