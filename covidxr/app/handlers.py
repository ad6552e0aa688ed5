"""What Gradio calls: one function per page event and per API endpoint, each a line that hands
the request's values to a view (analysis.py, map_test.py, eraser.py, deletion.py, model_card.py).

Two kinds, and the difference is the point:

- **They run a model** (async, `model=True` in layout.py): each is one job of Gradio's queue in
  the model's concurrency group, so it takes one of its client's places (jobs.AnalysisPlaces) and
  runs through `XrayApp.analyses`: on a worker thread, one analysis at a time, stopped at its next
  forward pass if cancelled. The API endpoints spell out their parameters, with defaults, because
  `gradio_client` and the API page name them from these signatures.
- **They run none** (plain functions): clearing, re-blending, opening the eraser or the model
  card, the page after an unexpected failure. They are not queued, hold no lock and take no place,
  so they never wait behind an analysis.
"""

from __future__ import annotations

import gradio as gr

from . import analysis, deletion, eraser, file_test, map_test, model_card
from .state import PREDICTED, XrayApp


def session(request) -> str | None:
    """The page session a request comes from (what kept analyses are keyed by); None without one:
    such a request keeps nothing another request could find."""
    return getattr(request, "session_hash", None) or None


class Handlers:
    def __init__(self, app: XrayApp):
        self.app = app

    async def job(self, view, *values):
        """`view(app, *values)` as one analysis (jobs.OneAtATime)."""
        return await self.app.analyses.run(view, self.app, *values)

    # -- the page's events that run a model ------------------------------------------------------
    async def upload(self, file, method, explain_class, opacity, view, request: gr.Request):
        return await self.job(analysis.show_new, file, method, explain_class, opacity, view, session(request))

    async def another(self, file, method, explain_class, opacity, view, request: gr.Request):
        return await self.job(analysis.show_another, file, method, explain_class, opacity, view, session(request))

    async def example(self, index, method, explain_class, opacity, view, request: gr.Request):
        return await self.job(analysis.show_example, index, method, explain_class, opacity, view, session(request))

    async def reanalyse(self, file, method, explain_class, opacity, view, request: gr.Request):
        return await self.job(analysis.reanalyse, file, method, explain_class, opacity, view, session(request))

    async def blank_lungs(self, file, view):
        return await self.job(map_test.blank, file, view, "lungs")

    async def blank_outside(self, file, view):
        return await self.job(map_test.blank, file, view, "outside")

    async def erase(self, file, edited, view):
        return await self.job(eraser.erase, file, edited, view)

    async def deletion(self, file, method, explain_class, view):
        return await self.job(deletion.deletion, file, method, explain_class, view)

    async def file_test(self, file, view):
        return await self.job(file_test.file_test, file, view)

    # -- the API (gradio_client and REST name the parameters from these signatures) -------------
    async def predict(self, file, method="gradcam", explain_class=PREDICTED, opacity=0.4, model=None):
        return await self.job(analysis.predict_api, file, method, explain_class, opacity, model)

    async def occlusion(self, file, blanked="lungs", model=None, painted=None):
        return await self.job(map_test.occlusion_api, file, blanked, model, painted)

    async def deletion_curve(self, file, method="gradcam", explain_class=PREDICTED, model=None):
        return await self.job(deletion.deletion_api, file, method, explain_class, model)

    async def quality(self, file, model=None):
        return await self.job(file_test.quality_api, file, model)

    # -- the page's events that run no model -----------------------------------------------------
    def cleared(self, view):
        return analysis.cleared(self.app, view)

    def reblend(self, kept, opacity):
        return analysis.reblend(self.app, kept, opacity)

    def eraser_opened(self, kept):
        return eraser.opened(self.app, kept)

    def failed(self):
        return analysis.failed(self.app)

    def model_card_text(self):
        return model_card.model_card_text()

    # -- validators: run before a request may join the queue, so refused settings take no place --
    def admit(self, file, method, explain_class, opacity, view=None):
        """The analysis's settings (for an example click, `file` is the example's number)."""
        found = analysis.problems(self.app, method, explain_class, opacity, view)
        return [gr.validate(name not in found, escaped(found.get(name, "")))
                for name in ("file", "method", "explain_class", "opacity", "model")]

    def admit_map_test(self, file, *settings):
        """One check per input: the page's (file, view), or the API's (file, blanked, model, painted)."""
        side = None
        if len(settings) == 3:
            blanked, model, _ = settings
            side = "" if blanked in ("lungs", "outside", "painted") else \
                f"Blank 'lungs', 'outside' or 'painted', not {analysis.quoted(blanked)}."
        else:
            (model,) = settings
        problem = analysis.problems(self.app, "gradcam", PREDICTED, 0.4, model).get("model", "")
        checks = [gr.validate(True, "")]
        if side is not None:
            checks.append(gr.validate(not side, escaped(side)))
        checks.append(gr.validate(not problem, escaped(problem)))
        return checks + ([gr.validate(True, "")] if side is not None else [])

    def admit_settings(self, file, method, explain_class, view):
        """The deletion curve's method, class and model."""
        found = analysis.problems(self.app, method, explain_class, 0.4, view)
        return [gr.validate(True, "")] + [gr.validate(name not in found, escaped(found.get(name, "")))
                                          for name in ("method", "explain_class", "model")]


def escaped(text: str) -> str:
    import html

    return html.escape(text, quote=False)
