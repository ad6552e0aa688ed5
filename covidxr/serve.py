"""Serving stage: the Gradio app around `Predictor.predict` and `Predictor.explain`.

`main` is its command line (`python app.py`, `covidxr serve`). The one analysis function,
`XrayApp.analysed` (one model, one file), serves the upload, the examples, a change of model,
view, method or class and the programmatic endpoint `/predict` alike, one request per user
action; "Compare all" runs it for each bundled model (predictor.ModelShelf). What a page session
analysed is kept (sessions.py: the session holds only keys), so a view picked again runs no
model and a new opacity only re-blends. Every
handler runs through `XrayApp.served`: one analysis at a time, stoppable by a cancel
(limits.py). What the page says is the analysis's verdict (report.py), as in the CLI and the
API: this module only wires it into Gradio. An input the not-an-X-ray check refuses gets no
class, the probabilities are greyed detail; a file that cannot be read gets its error in the
result area (`XrayApp.show`), in place of the previous result. `XrayApp.admit` checks each
request before it may join the queue.

For a server others can reach: uploads and results live in the app's own temp folder and are
deleted an hour after they were made (and all of them when the app stops), usage analytics
are off, `--auth` / `--auth-file` ask for a login (logins.py: throttled, expiring), each address
may have only a few jobs waiting or running (limits.py), an unknown API name gets 404, responses
carry nosniff and frame headers, and `--public-url` builds result URLs from
the public address instead of the request's Host header.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import hashlib
import html
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
from gradio import processing_utils
from gradio.components.label import LabelConfidence, LabelData
from gradio.data_classes import ListFiles
from gradio.utils import NamedString
from PIL import Image
from starlette.middleware import Middleware

from . import report
from .checkpoint import checkpoint_path, current
from .data import ImageLoadError, load_image
from .examples import FETCH_COMMAND, available_examples
from .explain import METHODS, identical_methods, shrink
from .legend import LEGEND_HTML
from .limits import ClientLimits, OneAtATime, send_json, stop_if_cancelled
from .logins import LoginGuard, read_logins
from .occlusion import AS_IS, BLANKED, LUNGS_LEFT, OUTSIDE_LEFT, PAINTED_OVER, plot_deletion
from .predictor import ModelShelf, Predictor
from .report import DEFAULT_NOTICE, METHOD_LABELS, NOT_AN_XRAY, NOT_AN_XRAY_HEADLINE, notice_rule  # noqa: F401
from .sessions import KEPT_FOR_S, KeptMaps, Shown

PREDICTED = "predicted class"
# The repository's model card, shown in the page's last panel (opened, it loads the file) and
# linked from the notes that say "the rest is there". A pip-installed copy has no repository.
MODEL_CARD = Path(__file__).resolve().parents[1] / "MODEL_CARD.md"
CARD_LINK = "[MODEL_CARD.md](#model-card-full)"
COMPARE = "compare"  # the model choice that shows every model side by side
COMPARE_INTRO = ("**Every model on the same X-ray.** Each map shows where that model's evidence lies; lung focus "
                 "is the share of it on the lungs, against an even spread. A model can be right for the wrong "
                 "reason: compare where they look, then test it below. The model card "
                 f"({CARD_LINK}, at the foot of the page) has their measured numbers.")
# What the page's handlers return, in order (build's `outputs`), then three per compare column
# (its text, probabilities and map) when there are several models.
PAGE_OUTPUTS = ("probabilities", "original", "overlay", "summary", "kept", "occlusion_result", "occluded", "eraser",
                "eraser_box", "deletion_result", "deletion_plot", "card", "facts", "single_view", "compare_view")
LUNG_READER_MAP_TEST = ("This model reads only the lungs' box, found by the lung model: with the lungs blanked there "
                        "is nothing left for it to read. Its map cannot stray outside the lungs; the eraser still "
                        "tests what lies inside the box.")
NOTICE = ("**Research and teaching tool, not a medical device.** Not validated for clinical use: "
          "do not use it to diagnose, treat or triage anyone.")
# Uploads above this are refused by the server before they reach the model.
MAX_FILE_SIZE = "40mb"
# The two images go back at most this many pixels a side: twice the 380-px box they are shown
# in, and a 1-megapixel upload no longer pays for its colour mapping, JPEG encoding, transfer and
# drawing at full size (1024 cost 34 ms a result in the overlay alone). The model reads the full image.
DISPLAY_SIDE = 768
M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h
# Uploads and results are deleted this long after they were made; the check runs as often.
FILE_LIFETIME_S = 3600
QUEUE_SIZE = 64
# Jobs one address may have waiting or running: a user needs one or two, several users behind one
# address (an office, a proxy) share them, and a script cannot fill the queue for everyone.
MAX_JOBS_PER_CLIENT = 8
log = logging.getLogger("covidxr.serve")


def model_facts(config: dict) -> str:
    """The model's own description, read from its checkpoint."""
    # Metrics measured under an earlier decision rule or calibration are not this model's: not shown.
    metrics = current(config, "metrics") or {}
    stale = (config.get("stale") or {}).get("metrics")
    data = config.get("data", {})
    lines = [f"**Architecture** {config['arch']} ({config.get('parameters', 0) / 1e6:.1f}M parameters), "
             f"input {config['input_size']}x{config['input_size']} grayscale, "
             f"Grad-CAM layer `{config['gradcam_layer']}`.",
             f"**Classes** {', '.join(config['classes'])}."]
    decision = config.get("decision") or {}
    if decision.get("rule") == "threshold":
        lines.append(f"**Decision** `{decision['class']}` whenever its probability is at least "
                     f"{decision['threshold']:.2f} (chosen on validation data), else the likelier other class.")
    if metrics:
        lines.append(f"**Test results** ({metrics.get('n')} held-out images from patients never seen in "
                     f"training): accuracy {metrics['accuracy']:.3f}.")
        rows = ["| class | sensitivity | specificity | AUROC |", "|---|---|---|---|"]
        rows += [f"| {c} | {metrics[c]['sensitivity']:.3f} | {metrics[c]['specificity']:.3f} | "
                 f"{metrics[c]['auroc']:.3f} |" for c in config["classes"] if c in metrics]
        lines.append("\n".join(rows))
        if metrics.get("adult_normals_called_covid") is not None:
            lines.append(f"Adult normal X-rays called COVID: {metrics['adult_normals_called_covid']:.1%}. "
                         f"SARS images called COVID: {metrics['sars_called_covid']['k']} of "
                         f"{metrics['sars_called_covid']['n']}.")
    if stale:
        lines.append(f"**Test results** not shown: they were measured before the decision rule or calibration "
                     f"changed ({stale}) and no longer describe how this model decides.")
    if data:
        lines.append(f"**Training data** {data.get('images', {}).get('train', '?')} images "
                     f"(`{Path(str(data.get('manifest', ''))).name}`, fingerprint "
                     f"`{str(data.get('train_data_sha256', ''))[:12]}`).")
    lines.append(f"**Trained** {config.get('created', '?')}, code {config.get('code_version', '?')}.")
    return "\n\n".join(lines)


# CSS: what a refusal shows of the probabilities is secondary, greyed detail; the examples'
# captions wrap, and the table fits a phone's width.
CSS = """
.secondary { color: var(--body-text-color-subdued); font-size: var(--text-sm); }
#examples table { table-layout: fixed; width: 100%; }
#examples th:first-child, #examples td.image { width: 84px; }
#examples td, #examples th { white-space: normal; overflow-wrap: anywhere; }
"""
# After an analysis started from the inputs, bring the result into view when it lies out of sight
# (on a phone the result sits below the upload and the examples). Runs in the browser only.
SHOW_RESULT_JS = """() => {
  const result = document.getElementById("result");
  const top = result ? result.getBoundingClientRect().top : 0;
  if (top < 0 || top > window.innerHeight * 0.6) result.scrollIntoView({behavior: "smooth", block: "start"});
}"""


def model_card(config: dict) -> str:
    """What a model is, in a few lines for a student, from its checkpoint: its card (what it was
    trained on and the shortcut it is known to take), its test numbers and its lung focus."""
    card = config.get("card") or {}
    lines = [f"**{card.get('title', config['arch'])}.** {card.get('summary', '')}".strip()]
    metrics = current(config, "metrics") or {}
    if "covid" in metrics:
        covid = metrics["covid"]
        numbers = (f"Test ({metrics['n']} unseen X-rays): COVID AUROC {covid['auroc']:.3f}, "
                   f"sensitivity {covid['sensitivity']:.2f}, specificity {covid['specificity']:.2f}")
        if metrics.get("adult_normals_called_covid") is not None:
            numbers += f"; adult normals called COVID {metrics['adult_normals_called_covid']:.0%}"
        lines.append(numbers + ".")
    focus = config.get("lung_focus")
    if focus:
        lines.append(f"Lung focus of its COVID maps: **{focus['mean']:.0%}** against hand-drawn lung masks "
                     f"(an even spread: {focus['chance']:.0%}; {focus['images']} unseen X-rays).")
    if card.get("shortcut"):
        lines.append(f"*Known shortcut:* {card['shortcut']}")
    return "  \n".join(lines)


def method_choices(config: dict) -> list[tuple[str, str]]:
    """(label, method) for the method menu: methods that draw the very same map on this network
    (explain.identical_methods) are one entry, named for all of them."""
    same = identical_methods(config)
    folded = {other for others in same.values() for other in others}
    return [(_menu_name(key, same), key) for key in METHOD_LABELS if key not in folded]


def _menu_name(method: str, same: dict[str, tuple[str, ...]]) -> str:
    """The method's entry in the menu: one entry, named for all, where methods draw the same map."""
    return " = ".join([METHOD_LABELS[method], *(METHOD_LABELS[m] for m in same.get(method, ()))])


def method_info(config: dict) -> str:
    """The method menu's help line."""
    same = identical_methods(config)
    return "; ".join(f"{_names(key, others)} draw the same map for this network: one entry"
                     for key, others in same.items()) or "Each method draws its own map."


def method_facts(config: dict) -> str:
    """The methods in words, for the About panel."""
    same = identical_methods(config)
    text = ("**Explanation methods** Grad-CAM++ and LayerCAM weigh only positive evidence (close to Grad-CAM "
            "at this layer); Eigen-CAM shows the layer's main pattern, whatever the class; Score-CAM scores "
            "masked copies of the input (slow).")
    for key, others in same.items():
        text += (f" {_names(key, others)} give one and the same map here: a global average pool and one linear "
                 f"layer follow the explained layer `{config['gradcam_layer']}`, so each position of a channel "
                 "gets the same gradient and they weigh the channels alike. The API still accepts each name.")
    return text


def _names(key: str, others: tuple[str, ...]) -> str:
    names = [METHOD_LABELS[key], *(METHOD_LABELS[m] for m in others)]
    return f"{', '.join(names[:-1])} and {names[-1]}"


def notice_facts(config: dict) -> str:
    """The notice's rule in words, for the About panel."""
    rule = notice_rule(config)
    method = METHOD_LABELS.get(rule["method"], rule["method"])
    text = (f"**Lungs-outside notice** shown when the {method} map of the predicted class puts no more of its "
            "mass on the lungs (lung focus) than a map spread evenly over what the network read would (the "
            "lungs' share of the image, or of the lungs' box for a model that reads only that box)")
    if "fires_on_all" in rule:
        return (text + f": it fires on {rule['fires_on_all']:.0%} of this model's {rule['all_images']} "
                f"{rule.get('split', 'val')} X-rays ({rule['fires_on_correct']:.0%} of the {rule['images']} "
                "it classifies correctly).")
    return text + "."


class XrayApp:
    def __init__(self, predictor: Predictor | None = None, examples_dir: Path | None = None,
                 models: ModelShelf | None = None):
        # One model (a Predictor given, as with a checkpoint of one's own) or a shelf of several
        # (the bundled ones): a visitor picks one, or compares them all (COMPARE).
        self.models = models or ModelShelf({"model": None}, loaded={"model": predictor})
        # A cancelled analysis stops at its next forward pass, whichever model runs it.
        self.models.on_each(lambda loaded: loaded.add_forward_check(stop_if_cancelled))
        self.predictor = self.models[self.models.default]  # the examples' captions; the API's default
        self.examples = available_examples(examples_dir) if examples_dir else available_examples()
        self.demo = None  # the Blocks, once built
        self.kept = KeptMaps()  # each page session's analyses, by key (sessions.py)
        self.one_at_a_time = OneAtATime(self.predictor.lock)
        self.limits = ClientLimits(MAX_JOBS_PER_CLIENT)

    @property
    def classes(self) -> list[str]:
        """Every class of the models offered, in order (the explained-class choices)."""
        return list(dict.fromkeys(c for name in self.models.names for c in self.models.configs[name]["classes"]))

    @property
    def views(self) -> list[str]:
        """What the model choice may name: a model, or COMPARE when there are several."""
        return self.models.names + ([COMPARE] if len(self.models.names) > 1 else [])

    def problems(self, method, explain_class, opacity, view=None, views=None) -> dict[str, str]:
        """What is wrong with a request's settings, by parameter name; empty when nothing is.
        The API accepts any JSON, so nothing is assumed of the types, and a refused value is
        quoted short: a 100,000-character one does not come back."""
        problems = {}
        if not isinstance(method, str) or method not in METHODS:
            problems["method"] = (f"Unknown explanation method {_quoted(method)}; choose one of "
                                  f"{', '.join(METHODS)}.")
        if not (explain_class in (None, "") or isinstance(explain_class, str)
                and explain_class in (PREDICTED, *self.classes)):
            problems["explain_class"] = (f"Unknown class {_quoted(explain_class)}; choose one of "
                                         f"{', '.join([PREDICTED, *self.classes])}.")
        if isinstance(opacity, bool) or not isinstance(opacity, (int, float)) or not 0 <= opacity <= 1 \
                or not math.isfinite(opacity):
            problems["opacity"] = f"Opacity must be a number from 0 to 1, not {_quoted(opacity)}."
        views = self.views if views is None else views
        if view not in (None, "") and not (isinstance(view, str) and view in views):
            problems["model"] = f"Unknown model {_quoted(view)}; choose one of {', '.join(views)}."
        return problems

    def admit(self, file, method, explain_class, opacity, view=None):
        """Gradio's validator, run before a request joins the queue: refused settings never take
        a place. (For an example click, `file` is the example's number.) The cap per client is
        counted as the job joins (limits.ClientLimits)."""
        problems = self.problems(method, explain_class, opacity, view)
        names = ("file", "method", "explain_class", "opacity", "model")[:5 if view is not None else 4]
        return [gr.validate(name not in problems, html.escape(problems.get(name, ""), quote=False))
                for name in names]

    def admit_occlusion(self, file, *settings):
        """The validator of a map test, one check per input: which side to blank and which model,
        checked before the job joins. `settings`: the page's (view,), or the API's (blanked,
        model, painted); the files are read, and refused, by the handler."""
        side = None
        if len(settings) == 3:
            blanked, model, _ = settings
            side = "" if blanked in (*BLANKED, "painted") else \
                f"Blank {', '.join(map(repr, BLANKED))} or 'painted', not {_quoted(blanked)}."
        else:
            (model,) = settings
        problem = self.problems("gradcam", PREDICTED, 0.4, model).get("model", "")
        checks = [gr.validate(True, "")]
        if side is not None:
            checks.append(gr.validate(not side, html.escape(side, quote=False)))
        checks.append(gr.validate(not problem, html.escape(problem, quote=False)))
        return checks + ([gr.validate(True, "")] if side is not None else [])

    def admit_settings(self, file, method, explain_class, view):
        """The validator of a deletion curve: method, class and model checked before the job joins."""
        problems = self.problems(method, explain_class, 0.4, view)
        return [gr.validate(True, "")] + [gr.validate(name not in problems, html.escape(problems.get(name, ""),
                                                                                        quote=False))
                                          for name in ("method", "explain_class", "model")]

    def admit_opacity(self, kept, opacity):
        """The validator of a re-blend: the opacity checked as for an analysis."""
        problem = self.problems("gradcam", PREDICTED, opacity).get("opacity", "")
        return [gr.validate(True, ""), gr.validate(not problem, html.escape(problem, quote=False))]

    async def served(self, request: gr.Request, work, *args):
        """`work(*args)` as one job of the queue: on a worker thread, one analysis at a time,
        stopped at its next stage if cancelled, and counted against its client until it ends."""
        client = _address(request)
        self.limits.started(client, getattr(request, "session_hash", None))
        try:
            return await self.one_at_a_time.run(self._on_its_own, work, *args)
        finally:
            self.limits.ended(client)

    def _on_its_own(self, work, *args):
        """`work(*args)` with nothing of another request's lung-model answers kept (segment.py
        keeps them within a job: an image's check and outline, or the compare view's models,
        share one pass), so no request can time whether another's X-ray was seen."""
        self.models.forget_lung_answers()
        return work(*args)

    # The page's and the API's handlers: each runs its plain method below through `served`.
    async def serve_analyse(self, file, method, explain_class, opacity, model, request: gr.Request):
        return await self.served(request, self.analyse, file, method, explain_class, opacity, model)

    async def serve_upload(self, file, method, explain_class, opacity, view, request: gr.Request):
        return await self.served(request, self.show_new, file, method, explain_class, opacity, view,
                                 _session(request))

    async def serve_reanalyse(self, file, method, explain_class, opacity, view, request: gr.Request):
        return await self.served(request, self.reanalyse, file, method, explain_class, opacity, view,
                                 _session(request))

    async def serve_example(self, index, method, explain_class, opacity, view, request: gr.Request):
        return await self.served(request, self.analyse_example, index, method, explain_class, opacity, view,
                                 _session(request))

    async def serve_reblend(self, kept, opacity, request: gr.Request):
        return await self.served(request, self.reblend, kept, opacity)

    def analyse(self, file, method: str = "gradcam", explain_class: str = PREDICTED, opacity: float = 0.4,
                model: str | None = None):
        """(label, original, overlay, summary) for an uploaded file path and one model (default:
        the default model): the `/predict` API.

        The label is the decided class (the checkpoint's rule, which under a threshold is not
        always the most probable class) with the probabilities by class; for an input the check
        calls no chest X-ray, it is the refusal, with no class name (the summary then gives the
        probabilities as detail)."""
        problems = self.problems(method, explain_class, opacity, model, views=self.models.names)
        if problems:
            raise gr.Error(html.escape(" ".join(problems.values()), quote=False), print_exception=False)
        # No map kept: the API never re-blends, and its calls would push page visitors' maps out
        # of the shared table (MOST_KEPT) and hold up to 48 of them in memory for KEPT_FOR_S.
        shown = self.analysed(file, model or self.models.default, method, explain_class, opacity)
        return label_data(shown.verdict), Image.fromarray(shown.image), shown.overlay(float(opacity)), \
            self.summary(shown.verdict, model or self.models.default, explain_class)

    def analysed(self, file, model: str, method: str = "gradcam", explain_class: str = PREDICTED,
                 opacity: float = 0.4, session: str | None = None) -> Shown:
        """One model's analysis of a file, as shown (sessions.Shown, with its verdict). With a
        `session`, kept for that page session: the same file, model, method and class asked again
        is not run again. What is said is the analysis's verdict (report.py), as everywhere else.
        A file that cannot be analysed raises `gr.Error` with the reason."""
        if not file:
            raise gr.Error("Upload a chest X-ray (PNG, JPEG or DICOM) or click an example first.",
                           print_exception=False)
        path = Path(file if isinstance(file, (str, Path)) else file.name)
        predictor = self.models[model]
        # A class this model does not have (the 2020 recipe has no pneumonia): its predicted class.
        target = explain_class if explain_class in predictor.classes else None
        key = None
        if session is not None and path.is_file():
            key = self.kept.key_for(session, _digest(path), model, method, target or PREDICTED)
            kept = self.kept.get(key)
            if kept is not None:
                return kept
        try:
            explanation = predictor.explain(path, method=method, target=target, opacity=float(opacity),
                                            max_side=DISPLAY_SIDE)
        except ImageLoadError as error:
            # An expected refusal: one line in the log, no traceback; the file named once. An
            # upload is deleted at once (nothing of it is kept or served back).
            message = str(error) if str(error).startswith(path.name) else f"{path.name}: {error}"
            log.info("refused an upload: %s", message)
            _delete_upload(path)
            raise gr.Error(html.escape(message, quote=False), print_exception=False) from error
        stop_if_cancelled()  # a stage boundary: the map is made; the verdict and the overlay follow
        verdict = explanation.verdict
        # Lungs outlined only for an X-ray read without warnings: lungs "found" on a photo or a
        # document would mean nothing.
        outlined = verdict.status == report.RESULT and not verdict.warnings
        shown = Shown.of(explanation.image, explanation.heatmap, explanation.lung_mask if outlined else None, verdict)
        stop_if_cancelled()
        if key is not None:
            shown.key = self.kept.keep(shown, key)
        return shown

    def summary(self, verdict, model: str, explain_class) -> str:
        """The verdict in words (report.markdown), with a word when the model lacks the class asked for."""
        text = report.markdown(verdict)
        if explain_class not in (None, "", PREDICTED) and explain_class not in self.models.configs[model]["classes"]:
            text += (f"\n\n*{html.escape(self.models.title(model))} has no {explain_class} class: the heatmap is "
                     "for its prediction.*")
        return text

    def show(self, file, method: str = "gradcam", explain_class: str = PREDICTED, opacity: float = 0.4,
             view: str | None = None, session: str | None = None):
        """The page's handler: the chosen model's analysis, or every model's (COMPARE), as the
        page's outputs (`page`). A file that cannot be analysed gets its reason in the result
        area, in place of the previous verdict (a toast alone goes after a few seconds, and the
        old result would stay on the page as if it were this file's)."""
        view = view or self.models.default
        try:
            problems = self.problems(method, explain_class, opacity, view)
            if problems:
                raise gr.Error(html.escape(" ".join(problems.values()), quote=False), print_exception=False)
            names = self.models.names if view == COMPARE else [view]
            # Without a session (an in-process call), nothing is looked up: each call runs the models.
            shown = [self.analysed(file, name, method, explain_class, opacity, session) for name in names]
            return self.page(view, shown, explain_class, opacity)
        except gr.Error as error:
            return self.failed(error.message, view)

    def page(self, view: str, shown: list[Shown], explain_class=PREDICTED, opacity: float = 0.4):
        """The page's outputs (`build`'s `outputs`) for the analyses `shown` (one per model in the
        compare view; one otherwise): the single view filled and the compare view empty, or the
        other way round. Every new result clears the map test and the deletion curve, and empties
        and closes the eraser (opened, it loads the new image: `eraser_image`)."""
        compare = view == COMPARE
        # What a re-blend needs: each analysis's key (one kept without a session gets a random one).
        kept = {"view": view, "keys": [item.key or self.kept.keep(item) for item in shown]} if shown else None
        single = [None, None, None, ""]
        if shown and not compare:
            item = shown[0]
            single = [label_data(item.verdict), Image.fromarray(item.image), item.overlay(float(opacity)),
                      self.summary(item.verdict, view, explain_class)]
        columns = []
        for index, name in enumerate(self.models.names if len(self.models.names) > 1 else []):
            item = shown[index] if compare and shown else None
            columns += [f"#### {html.escape(self.models.title(name))}\n" + (self.column_text(item, name, explain_class)
                                                                         if item else ""),
                        label_data(item.verdict) if item else None,
                        item.overlay(float(opacity)) if item else None]
        return (*single, kept, *NO_OCCLUSION, None, gr.update(open=False), *NO_OCCLUSION, self.card(view),
                self.facts(view),
                gr.update(visible=not compare), gr.update(visible=compare), *columns)

    def column_text(self, shown: Shown, name: str, explain_class) -> str:
        text = report.brief(shown.verdict)
        if explain_class not in (None, "", PREDICTED) and explain_class not in self.models.configs[name]["classes"]:
            text += f"  \n*No {explain_class} class: map of its prediction.*"
        return text

    def card(self, view: str) -> str:
        """What the picked model is (model_card), or the three side by side in a line each."""
        if len(self.models.names) == 1:
            return ""
        if view == COMPARE:
            return COMPARE_INTRO
        return model_card(self.models.configs[view])

    def facts(self, view: str) -> str:
        """The About panel: the picked model's description (the default's in the compare view)."""
        config = self.models.configs[self.models.default if view == COMPARE else view]
        return "\n\n".join([model_facts(config), notice_facts(config), method_facts(config)])

    def failed(self, message: str = "The analysis failed unexpectedly; try again, or try another file.",
               view: str | None = None):
        """The result area for an input that could not be analysed: the error's verdict, no images."""
        outputs = list(self.page(view if view in self.views and view != COMPARE else self.models.default, []))
        verdict = report.failure(message)
        outputs[0], outputs[3] = label_data(verdict), report.markdown(verdict)
        return tuple(outputs)

    def show_new(self, file, method: str = "gradcam", explain_class: str = PREDICTED, opacity: float = 0.4,
                 view: str | None = None, session: str | None = None):
        """A new image (an upload or an example): the explained class goes back to the predicted
        one, on the page too, so the evidence shown first is always for the prediction."""
        return (PREDICTED, *self.show(file, method, PREDICTED, opacity, view, session))

    def cleared(self, view: str | None = None):
        """The upload cleared: the result goes with it, and the explained class is reset."""
        view = view if view in self.views else self.models.default
        return (PREDICTED, *self.page(view, []))

    def occlusion(self, file, blanked: str = "lungs", model: str | None = None, painted=None):
        """(text, image, numbers) for the map test on this image (occlusion.py): the model again
        with its `blanked` ("lungs", or "outside": all but the lungs; "painted": what the mask
        image `painted` marks, as the page's eraser) filled with the image's median gray. The
        `/occlusion` API."""
        if blanked not in (*BLANKED, "painted"):
            raise gr.Error(f"Blank the lungs, the outside or what is painted, not {_quoted(blanked)}.",
                           print_exception=False)
        model = model or self.models.default
        problems = self.problems("gradcam", PREDICTED, 0.4, model, views=self.models.names)
        if problems:
            raise gr.Error(html.escape(problems["model"], quote=False), print_exception=False)
        if blanked == "painted":
            mask = painted_file_mask(painted)
            text, image, numbers = self.map_test(file, [model], PAINTED_OVER, blanked, mask)
        else:
            text, image, numbers = self.map_test(file, [model], BLANKED[blanked], blanked)
        return text, image, numbers[model]

    def blank(self, file, view: str | None, blanked: str):
        """The page's two buttons: the map test for the picked model, or for each in the compare view."""
        text, image, _ = self.map_test(file, self.tested_models(view), BLANKED[blanked], blanked)
        return text, image

    def erase(self, file, edited, view: str | None = None):
        """(text, image): the model (each, in the compare view) again with what the person painted
        on the eraser (a marker, a label, a tube) blanked with the same fill (occlusion.painted_test)."""
        painted = painted_mask(edited)
        if file and (painted is None or not painted.any()):
            raise gr.Error("Paint over something on the image first (the brush), then press the button.",
                           print_exception=False)
        text, image, _ = self.map_test(file, self.tested_models(view), PAINTED_OVER, "painted", painted)
        return text, image

    def eraser_image(self, kept: dict | None):
        """The eraser, opened: the image as the model read it, from this session's kept analysis."""
        shown = self.kept.get(kept["keys"][0]) if isinstance(kept, dict) and kept.get("keys") else None
        if shown is None:
            gr.Info("Analyse an X-ray first (upload one or click an example); then paint over it here.")
            return None
        return Image.fromarray(shown.image)

    def tested_models(self, view: str | None) -> list[str]:
        if view == COMPARE:
            return self.models.names
        if view not in (None, "") and view not in self.models:
            raise gr.Error(f"Unknown model {_quoted(view)}.", print_exception=False)
        return [view or self.models.default]

    def map_test(self, file, names: list[str], view: str, blanked: str, painted=None):
        """The map test of `file` for each model named (Predictor.occlusion) shown as (text, the
        image `view` the first model read, the numbers by model). A model that reads only the
        lungs' box cannot have its lungs blanked: the text says so."""
        if not file:
            raise gr.Error("Upload a chest X-ray or click an example first.", print_exception=False)
        path = Path(file if isinstance(file, (str, Path)) else file.name)
        texts, numbers, shown = [], {}, None
        for name in names:
            try:
                test = self.models[name].occlusion(path, painted=painted)
            except ImageLoadError as error:
                raise gr.Error(html.escape(str(error), quote=False), print_exception=False) from error
            except ValueError:  # a lung-reading checkpoint: no lungs left to find its crop by
                texts.append((name, LUNG_READER_MAP_TEST))
                continue
            if test.not_an_xray:
                raise gr.Error("This does not look like a frontal chest X-ray: there are no lungs to blank.",
                               print_exception=False)
            if shown is None:
                shown = (np.clip(shrink(test.views[view], DISPLAY_SIDE), 0, 1) * 255).round().astype(np.uint8)
            numbers[name] = {"blanked": blanked, "as_is": test.probabilities[AS_IS], "blanked_probabilities":
                             test.probabilities[view], "decided_as_is": test.decided[AS_IS],
                             "decided_blanked": test.decided[view]}
            texts.append((name, occlusion_text(test, view)))
        if len(names) == 1 and not numbers:
            raise gr.Error(LUNG_READER_MAP_TEST, print_exception=False)
        text = texts[0][1] if len(names) == 1 else "\n\n".join(
            f"#### {html.escape(self.models.title(name))}\n{said}" for name, said in texts)
        return text, None if shown is None else Image.fromarray(shown), numbers

    def deletion(self, file, method: str = "gradcam", explain_class: str = PREDICTED, view: str | None = None):
        """(text, plot): the deletion curve (occlusion.deletion_curve) of the picked model's map, or
        of each model's in the compare view, in words and as a plot."""
        text, table, _ = self.deletion_curves(file, self.tested_models(view), method, explain_class)
        return text, table

    def deletion_api(self, file, method: str = "gradcam", explain_class: str = PREDICTED, model: str | None = None):
        """(text, plot, numbers) for one model: the `/deletion_curve` API."""
        model = model or self.models.default
        problems = self.problems(method, explain_class, 0.4, model, views=self.models.names)
        if problems:
            raise gr.Error(html.escape(" ".join(problems.values()), quote=False), print_exception=False)
        text, table, numbers = self.deletion_curves(file, [model], method, explain_class)
        return text, table, numbers[model]

    def deletion_curves(self, file, names: list[str], method: str, explain_class):
        if not file:
            raise gr.Error("Upload a chest X-ray or click an example first.", print_exception=False)
        problems = self.problems(method, explain_class, 0.4)
        if problems:
            raise gr.Error(html.escape(" ".join(problems.values()), quote=False), print_exception=False)
        path = Path(file if isinstance(file, (str, Path)) else file.name)
        texts, curves, numbers = [], {}, {}
        for name in names:
            predictor = self.models[name]
            target = explain_class if explain_class in predictor.classes else None
            try:
                curve = predictor.deletion_curve(path, method, target)
            except ImageLoadError as error:
                raise gr.Error(html.escape(str(error), quote=False), print_exception=False) from error
            if curve.not_an_xray:
                raise gr.Error("This does not look like a frontal chest X-ray: its map means nothing to test.",
                               print_exception=False)
            stop_if_cancelled()
            numbers[name] = {"target": curve.target, "method": curve.method, "removed": list(curve.removed),
                             "as_is": curve.as_is, "by_map": curve.by_map, "at_random": curve.at_random,
                             "gap": curve.gap}
            curves[self.models.title(name)] = curve
            said = deletion_text(curve)
            texts.append(said if len(names) == 1 else f"#### {html.escape(self.models.title(name))}\n{said}")
        return "\n\n".join(texts), plot_deletion(curves), numbers

    async def serve_deletion(self, file, method, explain_class, view, request: gr.Request):
        return await self.served(request, self.deletion, file, method, explain_class, view)

    async def serve_deletion_api(self, file, method, explain_class, model, request: gr.Request):
        return await self.served(request, self.deletion_api, file, method, explain_class, model)

    async def serve_erase(self, file, edited, view, request: gr.Request):
        return await self.served(request, self.erase, file, edited, view)

    async def serve_blank_lungs(self, file, view, request: gr.Request):
        return await self.served(request, self.blank, file, view, "lungs")

    async def serve_blank_outside(self, file, view, request: gr.Request):
        return await self.served(request, self.blank, file, view, "outside")

    async def serve_occlusion(self, file, blanked, model, painted=None, request: gr.Request = None):
        # (`painted` defaults to None: so the API's clients may leave the mask out.)
        return await self.served(request, self.occlusion, file, blanked, model, painted)

    def reblend(self, kept: dict | None, opacity):
        """The overlays at a new opacity from the kept maps: no forward pass. A map no longer kept
        (KEPT_FOR_S after its last use, or dropped for newer ones) leaves its overlay as it is.
        Outputs: the single view's overlay, then each compare column's."""
        columns = len(self.models.names) if len(self.models.names) > 1 else 0
        skipped = [gr.skip()] * (1 + columns)
        if not isinstance(kept, dict):
            return tuple(skipped) if columns else skipped[0]
        shown = [self.kept.get(key) for key in kept.get("keys", [])]
        if any(item is None for item in shown) or not shown:
            gr.Info("This analysis is no longer kept: choose the method again to redo it.")
            return tuple(skipped) if columns else skipped[0]
        overlays = [item.overlay(float(opacity)) for item in shown]
        result = [*skipped[:1], *overlays] if kept.get("view") == COMPARE else [overlays[0], *skipped[1:]]
        return tuple(result) if columns else result[0]

    def reanalyse(self, file, method, explain_class, opacity, view=None, session=None):
        """A changed model, method or class: analyse again (what was analysed before for this
        session comes from the kept table); while no file is loaded, the result area stays
        empty. (Never `gr.skip()` here: Gradio answers an update with a fresh copy of the
        label component for the rest of the session, without `_decided_as_is`, and every later
        result then failed to show.)"""
        if not file:
            return self.cleared(view)[1:]
        return self.show(file, method, explain_class, opacity, view, session)

    def analyse_example(self, index, method, explain_class, opacity, view=None, session=None):
        """An example clicked: the file goes into the upload box and is analysed, in one request,
        the explained class reset to the predicted one."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.examples):
            raise gr.Error(f"There is no example {_quoted(index)}.", print_exception=False)
        path = str(self.examples[index][0])
        return (path, *self.show_new(path, method, explain_class, opacity, view, session))

    def example_captions(self) -> list[str]:
        """What each example is, what this model calls it, and what to try (HTML: Gradio shows
        text examples cut at 60 characters). From the model at hand, so the captions stay true
        when the checkpoint changes."""
        captions = []
        for path, row in self.examples:
            truth = row["label"]
            try:
                label = self.predictor.predict(path).label
            except ImageLoadError as error:  # a damaged copy: the app still starts, and says so
                said = html.escape(str(error))
            else:
                if label is None:  # the input check refuses it
                    said = f"{NOT_AN_XRAY_HEADLINE}, says the input check: no result."
                elif truth in self.predictor.classes and label != truth:
                    said = f"The model says {label}: it misses {truth}. <i>Try: explain {truth}.</i>"
                else:
                    said = f"The model says {label}" + (" (correct)." if truth == label else ".")
            captions.append(f"<b>{html.escape(row.get('caption') or row['why'])}</b><br>{said}")
        return captions

    def build(self) -> gr.Blocks:
        classes = self.classes
        config = self.predictor.config
        names, default = self.models.names, self.models.default
        several = len(names) > 1
        with gr.Blocks(title="covidxr: COVID-19 on chest X-rays", analytics_enabled=False,
                       delete_cache=(FILE_LIFETIME_S, FILE_LIFETIME_S)) as demo:
            gr.Markdown("# covidxr\nCOVID-19, normal or other pneumonia on a frontal chest X-ray, "
                        "with a heatmap of the regions that drove the decision.")
            gr.Markdown(NOTICE, elem_id="notice")
            shown = gr.State(None, time_to_live=KEPT_FOR_S)  # a key into self.kept (sessions.py)
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    upload = gr.File(label="Chest X-ray (PNG, JPEG or DICOM)", file_count="single", elem_id="upload",
                                     height=140)
                    upload.preprocess = _upload_path  # no empty temp file per analysis (_upload_path)
                    if self.examples:
                        examples = gr.Dataset(
                            components=[gr.Image(visible=False), gr.HTML(visible=False)],
                            samples=[[str(path), caption] for (path, _), caption in
                                     zip(self.examples, self.example_captions())],
                            headers=["", "What it is, and what the model says"], type="index", layout="table",
                            samples_per_page=len(self.examples), label="Or click an example", elem_id="examples")
                    else:
                        gr.Markdown(f"No example images here yet. Fetch them with `{FETCH_COMMAND}`.")
                with gr.Column(scale=2, elem_id="result"):
                    view = gr.Radio([(self.models.title(name), name) for name in names]
                                    + ([("Compare all", COMPARE)] if several else []), value=default,
                                    label="Model", visible=several, elem_id="model")
                    with gr.Row():
                        method = gr.Dropdown(method_choices(config), value="gradcam", label="Explanation method",
                                             info=method_info(config), scale=5, min_width=300, elem_id="method")
                        explain_class = gr.Radio([PREDICTED, *classes], value=PREDICTED, scale=4, min_width=260,
                                                 label="Explain the evidence for", elem_id="explain-class")
                        opacity = gr.Slider(0.0, 1.0, value=0.4, step=0.05, label="Heatmap opacity", scale=2,
                                            min_width=160, elem_id="opacity")
                    # Their values reach `admit` and `analyse` as sent: Gradio's own checks
                    # echo a refused value whole and let NaN through as an opacity.
                    for control in (method, explain_class, opacity, view):
                        control.preprocess = _as_sent
                    with gr.Column(elem_id="single-view") as single_view:  # one model: its result in full
                        with gr.Row():
                            with gr.Column(scale=3, min_width=300):
                                summary = gr.Markdown(elem_id="summary", min_height=60)
                            # The heading is off: the label comes from the decision rule, not always the top class.
                            probabilities = gr.Label(label="Probabilities", num_top_classes=len(classes),
                                                     show_heading=False, scale=2, min_width=220, elem_id="prediction")
                            probabilities.postprocess = _decided_as_is(probabilities.postprocess)
                        with gr.Row():
                            original = gr.Image(label="Input, as the model reads it", type="pil", format="jpeg",
                                                height=380, elem_id="original")
                            with gr.Column(min_width=160):
                                overlay_image = gr.Image(label="Heatmap overlay", type="pil", format="jpeg", height=380,
                                                         elem_id="overlay")
                                for image in (original, overlay_image):  # never rewritten while served (_saved_once)
                                    image.postprocess = _saved_once(image)
                                gr.HTML(LEGEND_HTML, elem_id="legend")
                    # The compare view: every model's verdict, probabilities and map, side by side.
                    compare_outputs, compare_images = [], []
                    with gr.Column(visible=False, elem_id="compare-view") as compare_view:
                        with gr.Row(equal_height=False):
                            for name in names if several else []:
                                with gr.Column(min_width=200):
                                    said = gr.Markdown(elem_classes=["compare-text"])
                                    bars = gr.Label(num_top_classes=len(classes), show_heading=False,
                                                    show_label=False, elem_classes=["compare-label"])
                                    bars.postprocess = _decided_as_is(bars.postprocess)
                                    mapped = gr.Image(label=f"Heatmap: {self.models.title(name)}", show_label=False,
                                                      type="pil", format="jpeg", height=300,
                                                      elem_classes=["compare-map"])
                                    mapped.postprocess = _saved_once(mapped)
                                    compare_outputs += [said, bars, mapped]
                                    compare_images.append(mapped)
                        gr.HTML(LEGEND_HTML)
                    # What the picked model is (or what the comparison shows), under its result.
                    card = gr.Markdown(self.card(default), visible=several, elem_id="model-card")
                    with gr.Accordion("Test the map on this image", open=True, elem_id="map-test"):
                        gr.Markdown(MAP_TEST_INTRO)
                        with gr.Row():
                            blank_lungs = gr.Button("Blank the lungs, predict again", size="sm",
                                                    elem_id="blank-lungs")
                            blank_outside = gr.Button("Blank all but the lungs, predict again", size="sm",
                                                      elem_id="blank-outside")
                        with gr.Row():  # side by side on a desktop, one above the other on a phone
                            with gr.Column(min_width=280):
                                occlusion_result = gr.Markdown(elem_id="occlusion-result")
                            with gr.Column(min_width=280):
                                occluded = gr.Image(label="What the model read", type="pil", format="jpeg",
                                                    height=260, elem_id="occluded")
                                occluded.postprocess = _saved_once(occluded)
                        # Closed until wanted: in the browser, an image editor handed each new result
                        # redraws its canvas and held up every result by 1-1.5 s (BENCHMARKS.md).
                        with gr.Accordion("Eraser: paint over a marker, a label or a tube, and predict again",
                                          open=False, elem_id="eraser-box") as eraser_box:
                            eraser = gr.ImageEditor(
                                label="Paint over what to blank (a side marker, a text label, a tube)", type="numpy",
                                sources=(), transforms=(), layers=False, format="png", height=380, elem_id="eraser",
                                brush=gr.Brush(colors=["#ff00ff"], default_color="#ff00ff", color_mode="fixed",
                                               default_size=24), buttons=[])
                            erase = gr.Button("Blank what I painted, predict again", size="sm", elem_id="erase")
                        gr.Markdown(DELETION_INTRO)
                        deletion = gr.Button("Remove the map's hottest pixels first (a few seconds a model)", size="sm",
                                             elem_id="deletion")
                        with gr.Row():
                            with gr.Column(min_width=280):
                                deletion_result = gr.Markdown(elem_id="deletion-result")
                            with gr.Column(min_width=280):
                                deletion_plot = gr.Image(label="Deletion curve", type="pil", format="png", height=300,
                                                         elem_id="deletion-plot")
                                deletion_plot.postprocess = _saved_once(deletion_plot)
            with gr.Accordion("About this model", open=False):
                facts = gr.Markdown(self.facts(default))
            with gr.Accordion("Model card: every model's measured numbers, the shortcut audits, what did not pay "
                              "(MODEL_CARD.md)", open=False, elem_id="model-card-full") as card_box:
                card_text = gr.Markdown(elem_id="model-card-text")

            inputs = [upload, method, explain_class, opacity, view]
            # The map test's result goes with the image it was made for: each new result clears it.
            # The single view and the compare view: the one shown is filled, the other emptied.
            outputs = [probabilities, original, overlay_image, summary, shown, occlusion_result, occluded, eraser,
                       eraser_box, deletion_result, deletion_plot, card, facts, single_view, compare_view,
                       *compare_outputs]
            model = dict(concurrency_id="model", validator=self.admit)
            # Handlers run through `served` (serve_*); their API names stay the plain methods' names.
            # One request per user action: the upload, each change of method or class, each example
            # click; a new opacity only re-blends the kept map (tests/test_app.py counts them in Chromium).
            # A new image resets the explained class; an error takes the result area's place.
            # Minimal progress: the full overlay's animation on every output took CPU from the
            # analysis on a small server (BENCHMARKS.md, "In the browser").
            analysed = upload.upload(self.serve_upload, inputs, [explain_class, *outputs], api_name="show_new",
                                     show_progress="minimal",
                                     api_visibility="private", **model)
            analysed.success(None, js=SHOW_RESULT_JS)
            # An unexpected failure (the handler itself shows the expected ones) still clears the
            # previous verdict: no result on the page may belong to another file.
            analysed.failure(self.failed, None, outputs, api_visibility="private")
            upload.clear(self.cleared, view, [explain_class, *outputs], api_visibility="private")
            # The dropdown's `input` event fired twice per choice (Gradio 6.31, Chromium); `select` once.
            method.select(self.serve_reanalyse, inputs, outputs, api_name="reanalyse", api_visibility="private",
                          trigger_mode="always_last", **model)
            explain_class.input(self.serve_reanalyse, inputs, outputs, api_name="reanalyse", api_visibility="private",
                                trigger_mode="always_last", **model)
            # Another model or the compare view: analyses this session already has come from the kept table.
            view.input(self.serve_reanalyse, inputs, outputs, api_name="reanalyse", api_visibility="private",
                       trigger_mode="always_last", **model)
            opacity.release(self.serve_reblend, [shown, opacity], [overlay_image, *compare_images], api_name="reblend",
                            api_visibility="private", trigger_mode="always_last", concurrency_id="blend",
                            validator=self.admit_opacity)
            # The `/predict` API: plain values (no page updates), through a button the page does not show.
            api = gr.Button(visible=False)
            api_model = gr.Dropdown(names, value=default, visible=False, label="model")
            api_model.preprocess = _as_sent
            api.click(self.serve_analyse, [upload, method, explain_class, opacity, api_model], outputs[:4],
                      api_name="predict", **model)
            # The map test: one request per click; `/occlusion` also returns the numbers.
            numbers = gr.JSON(visible=False)
            blanked = gr.Textbox(visible=False)
            painted = gr.File(visible=False, label="painted: a mask image, white where to blank")
            painted.preprocess = _upload_path
            tested = dict(concurrency_id="model", validator=self.admit_occlusion)
            blank_lungs.click(self.serve_blank_lungs, [upload, view], [occlusion_result, occluded],
                              api_name="blank_lungs", api_visibility="private", **tested)
            blank_outside.click(self.serve_blank_outside, [upload, view], [occlusion_result, occluded],
                                api_name="blank_outside", api_visibility="private", **tested)
            api.click(self.serve_occlusion, [upload, blanked, api_model, painted],
                      [occlusion_result, occluded, numbers],
                      api_name="occlusion", **tested)
            card_box.expand(model_card_text, None, card_text, api_name="model_card", api_visibility="private",
                            concurrency_id="blend")  # a file read: never queued behind a model run
            eraser_box.expand(self.eraser_image, shown, eraser, api_name="eraser_image", api_visibility="private",
                              concurrency_id="blend")  # the kept image: no model run
            erase.click(self.serve_erase, [upload, eraser, view], [occlusion_result, occluded], api_name="erase",
                        api_visibility="private", concurrency_id="model")
            # The deletion curve: one request per click; `/deletion_curve` also returns the numbers.
            deletion.click(self.serve_deletion, [upload, method, explain_class, view], [deletion_result, deletion_plot],
                           api_name="deletion", api_visibility="private", concurrency_id="model",
                           validator=self.admit_settings)
            api.click(self.serve_deletion_api, [upload, method, explain_class, api_model],
                      [deletion_result, deletion_plot, numbers], api_name="deletion_curve", concurrency_id="model",
                      validator=self.admit_settings)
            if self.examples:
                clicked = examples.click(self.serve_example, [examples, method, explain_class, opacity, view],
                                         [upload, explain_class, *outputs], api_name="analyse_example",
                                         api_visibility="private", **model)
                clicked.success(None, js=SHOW_RESULT_JS)
                clicked.failure(self.failed, None, outputs, api_visibility="private")
        # One model, one request at a time: the explainer's hooks are not thread-safe, and
        # two CPU-bound requests would only slow each other down. (The predictor's lock holds
        # it even when a cancelled job's thread has not stopped yet: limits.py.)
        demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
        self.demo = demo
        return demo


DELETION_INTRO = ("**Does the map point at what the model uses?** Remove the pixels the map marks hottest, a "
                  "growing share, and watch the probability fall; then remove as many at random. Removed pixels are "
                  "filled in from their neighbours (pytorch-grad-cam's ROAD), so the holes themselves say nothing.")
MAP_TEST_INTRO = ("A heatmap shows where the evidence lies; blanking shows whether the model needs it there. "
                  "Fill the lungs (or everything but them) with flat gray and ask the model again. "
                  f"The model card ({CARD_LINK}, shortcut audit) has the same test over the whole test split.")
NO_OCCLUSION = ("", None)  # the map test's (and the deletion curve's) result, cleared by every new result


def model_card_text() -> str:
    """The repository's MODEL_CARD.md, or where to find it when this copy has none."""
    if MODEL_CARD.is_file():
        return MODEL_CARD.read_text(encoding="utf-8")
    return ("MODEL_CARD.md is in the covidxr repository, beside README.md; this installed copy does not carry it. "
            "`covidxr describe NAME` prints a bundled model's own description and measured numbers.")


def deletion_text(curve) -> str:
    """The deletion curve in words, for a student: what removing the map's hottest pixels did,
    against removing as many at random, at one share and on average over them all."""
    share = curve.removed.index(0.2) if 0.2 in curve.removed else len(curve.removed) // 2
    text = (f"With the {curve.removed[share]:.0%} of pixels the map marks hottest removed: {curve.target} "
            f"{curve.by_map[share]:.0%} (as it is: {curve.as_is:.0%}; the same share removed at random: "
            f"{curve.at_random[share]:.0%}). Over every share removed ({curve.removed[0]:.0%} to "
            f"{curve.removed[-1]:.0%}), {curve.target} is on average {abs(curve.gap):.0%} "
            f"{'lower' if curve.gap >= 0 else 'higher'} when the map picks the pixels than when chance does: ")
    if curve.gap >= 0.10:
        return text + "the map points at what the model uses."
    if curve.gap >= 0.03:
        return text + "the map points at some of what the model uses."
    if curve.gap > -0.03:
        return text + ("removing what the map marks costs about as much as removing pixels at random: on this image "
                       "the map says little about what the model uses (it may read the film as a whole).")
    return text + "the map does not point at what the model uses."


def occlusion_text(test, view: str) -> str:
    """The map test's result in words, for a student: the probabilities before and after, and
    what the change means for this image."""
    decided = test.decided[AS_IS]
    before, after = test.probabilities[AS_IS][decided], test.probabilities[view][decided]
    now = test.decided[view]
    what = {OUTSIDE_LEFT: "the lungs blanked", LUNGS_LEFT: "only the lungs left",
            PAINTED_OVER: "what you painted over blanked"}[view]
    says = f"still says **{now}**" if now == decided else f"now says **{now}**"
    text = (f"**With {what}**: {decided} {after:.0%} (as it is: {before:.0%}); the model {says}.\n\n"
            + ", ".join(f"{name} {p:.0%}" for name, p in test.probabilities[view].items()) + ".\n\n")
    if view == PAINTED_OVER:
        if now == decided:
            return text + f"It still says {decided}: on this image it did not need what you painted over."
        return text + (f"Without what you painted over it no longer says {decided}: that was part of its answer "
                       "(a shortcut, if it was not lung).")
    if view == OUTSIDE_LEFT:
        if now == decided:
            return text + (f"It still says {decided} without seeing the lungs: on this image its evidence for "
                           f"{decided} does not need them. It may be reading a border, a marker or the look of "
                           "the film (a shortcut).")
        return text + f"Without the lungs it no longer says {decided}: it needed them for that answer."
    if now == decided:
        return text + f"The lungs alone carry its answer: with everything else blanked it still says {decided}."
    return text + (f"With only the lungs it no longer says {decided}: what lies outside them was part of "
                   "its answer.")


def painted_file_mask(file) -> np.ndarray:
    """The mask of `/occlusion`'s "painted": an image file (any size; it is stretched over the
    X-ray), white or any bright pixel where to blank."""
    if not file:
        raise gr.Error("Blanking what is painted needs the mask: an image, white where to blank.",
                       print_exception=False)
    try:
        gray, _ = load_image(Path(file if isinstance(file, (str, Path)) else file.name))
    except ImageLoadError as error:
        raise gr.Error(html.escape(f"the mask: {error}", quote=False), print_exception=False) from error
    mask = gray > 0.5
    if not mask.any():
        raise gr.Error("The mask marks nothing: paint white where to blank.", print_exception=False)
    return mask


def painted_mask(edited) -> np.ndarray | None:
    """What was painted on the eraser (an ImageEditor value): every pixel a brush layer covers
    (its alpha; a layer without alpha counts where it is not black)."""
    if not isinstance(edited, dict):
        return None
    masks = []
    for layer in edited.get("layers") or []:
        layer = np.asarray(layer) if layer is not None else None
        if layer is None or layer.ndim < 2:
            continue
        masks.append(layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[2] == 4
                     else layer.reshape(*layer.shape[:2], -1).any(-1))
    return np.logical_or.reduce(masks) if masks else None


def _as_sent(value):
    return value


def label_data(verdict: report.Verdict) -> LabelData:
    """The label output of a verdict (report.label_output): the decided class with every class's
    probability, or the refusal or "no result" with no bars."""
    value = report.label_output(verdict)
    return LabelData(label=value["label"], confidences=[LabelConfidence(**item) for item in value["confidences"]])


def _decided_as_is(postprocess):
    """gr.Label's postprocess names the most probable class; a `LabelData` built by
    `label_data` passes through unchanged, so a threshold's decision is what both the page and
    `/predict` say. (A gr.Label subclass would do it too, but Gradio writes a .pyi stub beside
    the module of any component subclass at import time.)"""
    def keep_decided(value):
        return value if isinstance(value, LabelData) else postprocess(value)
    return keep_decided


def _upload_path(payload):
    """The upload's path, as gr.File(type="filepath") hands it to a handler, without the empty
    temp file Gradio 6.31 also creates in the app's temp folder each time it does (File.
    _process_single_file opens a NamedTemporaryFile(delete=False) and never uses it): two per
    analysis (the validator's preprocessing and the handler's), 1,224 empty files after 600."""
    if payload is None:
        return None
    if isinstance(payload, ListFiles):
        payload = payload[0]
    return NamedString(payload.path)


def _saved_once(component):
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
    return save_then_postprocess


def _quoted(value) -> str:
    text = repr(value)
    return text if len(text) <= 30 else text[:30] + "..."


def _session(request) -> str:
    """The page session a request comes from (what the kept analyses are keyed by)."""
    return str(getattr(request, "session_hash", None) or "")


def _digest(path: Path) -> str:
    """The file's bytes as a key: the same X-ray uploaded again (a new temp path) is found again."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _address(request) -> str:
    """The client's address: the connection's, or X-Forwarded-For's when the connection comes
    from a proxy named by --trusted-proxy (uvicorn reads it, launch sets which proxies)."""
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or "unknown"


def _delete_upload(path: Path) -> None:
    """Delete a refused upload from the app's temp folder at once (never an example or a file
    elsewhere: the API also takes paths the app itself handed out)."""
    folder = os.environ.get("GRADIO_TEMP_DIR")
    try:
        if folder and path.resolve().is_relative_to(Path(folder).resolve()):
            path.unlink(missing_ok=True)
            if not any(path.parent.iterdir()):
                path.parent.rmdir()
    except OSError:
        pass


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX would). Gradio runs each request on a
    worker thread; glibc gives threads their own arenas, and the large, freed image buffers
    fragment them, so the server's memory crept up request after request (+280 MiB over 384
    requests; flat with 2 arenas, see BENCHMARKS.md). A no-op where libc is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


class SecurityHeaders:
    """ASGI middleware adding the response headers Gradio leaves out: browsers must not guess a
    served file's type (an upload served back never runs as a page or script), and other sites
    may not show the app in a frame (clickjacking)."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"SAMEORIGIN"),
               (b"content-security-policy", b"frame-ancestors 'self'")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *[(name, value) for name, value in self.HEADERS if name not in present]]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def private_temp_dir() -> Path:
    """A folder of this server's own for Gradio's uploads and results (mode 0700, inside
    $GRADIO_TEMP_DIR or the system temp folder), removed when the app stops. In the shared
    /tmp/gradio, files of other Gradio apps on the machine would be served and accepted as input."""
    parent = os.environ.get("GRADIO_TEMP_DIR")
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="covidxr-app-", dir=parent))
    os.environ["GRADIO_TEMP_DIR"] = str(folder)  # read by every Gradio component as it is built
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


class KnownEndpoints:
    """ASGI middleware: a call to an API name the app does not have gets 404 and one plain line
    (Gradio answered 500 with the server's working directory in it), and no other server error
    carries Gradio's own text either (it may name files of this machine)."""

    CALL_ROUTES = ("/call/", "/run/", "/api/")

    def __init__(self, app, api_names: set[str]):
        self.app = app
        self.api_names = api_names

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        for route in self.CALL_ROUTES:
            if scope["method"] == "POST" and f"/gradio_api{route}" in path:
                name = path.split(f"/gradio_api{route}", 1)[1].strip("/").split("/")[0]
                if name not in self.api_names:
                    return await send_json(send, 404, {"detail": f"No API endpoint named {_quoted(name)}; "
                                                                 f"this app has {', '.join(sorted(self.api_names))}."})
        failed = False

        async def without_server_details(message):
            nonlocal failed
            if message["type"] == "http.response.start" and message["status"] >= 500:
                failed = True
                await send({**message, "headers": [(b"content-type", b"application/json")]})
                return
            if failed and message["type"] == "http.response.body":
                if not message.get("more_body"):
                    await send({"type": "http.response.body", "body": b'{"detail": "internal server error"}'})
                return
            await send(message)

        await self.app(scope, receive, without_server_details)


def launch(checkpoint: str | None = None, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           examples_dir: Path | None = None, block: bool = True, auth: list[tuple[str, str]] | None = None,
           public_url: str | None = None, trusted_proxies: list[str] | None = None):
    limit_malloc_arenas()
    private_temp_dir()
    # uvicorn replaces the connection's address with X-Forwarded-For's only for these proxies
    # (its default trusts 127.0.0.1, so any local client could claim any address).
    os.environ["FORWARDED_ALLOW_IPS"] = ",".join(trusted_proxies or [])
    xray_app = XrayApp(examples_dir=examples_dir, models=ModelShelf.of(checkpoint))
    app = xray_app.build()
    # Outermost first: expired logins are dropped before anything reads them.
    middleware = [Middleware(LoginGuard().middleware)] if auth else []
    middleware += [Middleware(SecurityHeaders),
                   Middleware(KnownEndpoints, api_names={"predict", "occlusion", "deletion_curve"}),
                   Middleware(xray_app.limits.middleware)]
    # quiet: Gradio's own banner tells users to "set `share=True` in `launch()`"; ours names the flag.
    app.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
               prevent_thread_lock=True, quiet=True, theme=gr.themes.Soft(), css=CSS, footer_links=["api"],
               auth=auth or None, root_path=public_url, app_kwargs={"middleware": middleware})
    print(f"covidxr app running on {public_url or app.local_url}", flush=True)
    if not share:  # with --share, Gradio prints the public link itself, or why it could not make one
        print("For a public link, restart with --share (with --auth: README, 'Exposing the app safely'). "
              "Ctrl-C stops the app.", flush=True)
    if block:
        app.block_thread()
    return app


def main(argv: list[str] | None = None) -> None:
    """The app's command line (app.py, `covidxr serve`)."""
    parser = argparse.ArgumentParser(prog="covidxr serve", description="The covidxr web app: upload a chest "
                                     "X-ray, get the label, probabilities and a heatmap.")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--checkpoint", type=checkpoint_path, metavar="FILE_OR_NAME", default=None,
                        help="the model shown first: a bundled model's name (the others are offered too) or a "
                             "checkpoint file of one's own (offered alone); default: the shipped model")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--examples-dir", type=Path, default=None, help="folder of examples (default: examples/)")
    parser.add_argument("--auth", action="append", default=[], metavar="USER:PASS",
                        help="ask for this login (repeatable; other users on this machine can see it in the "
                             "process list: prefer --auth-file)")
    parser.add_argument("--auth-file", action="append", default=[], type=Path, metavar="FILE",
                        help="ask for one of the USER:PASS logins in FILE (one a line)")
    parser.add_argument("--trusted-proxy", action="append", default=[], metavar="ADDRESS",
                        help="a reverse proxy whose X-Forwarded-For header names the client (repeatable; "
                             "an address or a network such as 10.0.0.0/8). Without it, the header is ignored")
    parser.add_argument("--public-url", default=None, metavar="URL",
                        help="the address users reach the app at (e.g. https://xray.example.org): result URLs "
                             "are built from it, not from the request's Host header")
    args = parser.parse_args(argv)
    try:
        auth = read_logins(args.auth, args.auth_file)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if args.public_url and not args.public_url.startswith(("http://", "https://")):
        parser.error("--public-url must start with http:// or https://")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if (args.share or args.host not in ("127.0.0.1", "localhost", "::1")) and not auth:
        log.warning("serving beyond this machine without --auth: anyone who reaches it can use the app "
                    "(README: 'Exposing the app safely')")
    # Stopped with SIGTERM, exit normally, so that the temp folder with the uploads is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    launch(args.checkpoint, args.host, args.port, args.share, args.examples_dir, auth=auth,
           public_url=args.public_url, trusted_proxies=args.trusted_proxy)
