"""The verdict: the one thing people are shown of an analysis, whoever asks.

The app (serve.py), `covidxr predict` (batch.py), `Predictor` and the `/predict` API all show
the `Verdict` that `verdict` builds here, and nothing else decides what is said:

- a **result**: the decided class (the checkpoint's rule), the rule in words, the probabilities,
  any warnings (an unusual X-ray is read, with the warning beside it), where the heatmap's
  evidence lies and the lungs-outside notice when it fires;
- a **refusal**: the input is no frontal chest X-ray (xray_check.py), so no class is named; the
  reasons, and the probabilities only as detail;
- an **error**: the file could not be read, with the reason.

Pure: plain values in, plain values out; no model, no Gradio. The renderers below turn a
verdict into the page's text (`markdown`), the label output (`label_output`), a CSV row
(`csv_fields`) and a heatmap caption (`caption`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

RESULT, REFUSED, ERROR = "result", "refused", "error"
NOT_AN_XRAY = "not a frontal chest X-ray"  # the label shown for a refused input: no class name
NOT_AN_XRAY_HEADLINE = "This does not look like a frontal chest X-ray"
NO_RESULT = "no result"  # the label shown for an input that could not be read
ERROR_HEADLINE = "No result: this file could not be analysed"
# The lungs-outside notice fires when the map of the decided class (by this method) puts no more
# of its mass on the lungs than a map spread evenly over what the network read would: its lung
# focus is at or under chance (the lungs' share of the image, or of the lungs' box a lung-reading
# model reads). A checkpoint's stored rule (audit.py --store-notice) adds how often it fires.
DEFAULT_NOTICE = {"rule": "chance", "method": "gradcam"}
METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "hirescam": "HiResCAM",
                 "xgradcam": "XGrad-CAM", "layercam": "LayerCAM", "eigencam": "Eigen-CAM",
                 "scorecam": "Score-CAM"}


@dataclass(frozen=True)
class Verdict:
    """What is shown of one analysis. `label` is the decided class for a result and None
    otherwise; `shown_label` is what a label field says (the class, the refusal or "no result")."""

    status: str  # RESULT, REFUSED or ERROR
    label: str | None = None
    probabilities: Mapping[str, float] = field(default_factory=dict)  # empty for an error
    rule: str = ""  # the decision rule in words
    why: str = ""  # set when the rule called a class that is not the most probable
    warnings: Sequence[str] = ()  # an unusual X-ray: read, with these beside the result
    reasons: Sequence[str] = ()  # why the input is refused (status REFUSED)
    error: str = ""  # why the file could not be analysed (status ERROR)
    # The heatmap, when one was made: the class it explains and the method, in words.
    target: str | None = None
    method: str | None = None
    method_words: str = ""
    # Where the heatmap's evidence lies (segment.evidence_shares); None without lungs to score.
    lung_focus: float | None = None
    chance_focus: float | None = None  # the lung focus of a map spread evenly over what the network read
    border_share: float | None = None
    top_share: float | None = None
    notice: str = ""  # the lungs-outside notice, when it fires

    @property
    def shown_label(self) -> str:
        return {RESULT: self.label, REFUSED: NOT_AN_XRAY}.get(self.status) or NO_RESULT

    @property
    def headline(self) -> str:
        if self.status == RESULT:
            return f"Prediction: {self.label}"
        return NOT_AN_XRAY_HEADLINE if self.status == REFUSED else ERROR_HEADLINE

    @property
    def evidence_shown(self) -> bool:
        """Whether where the evidence lies (lung focus, the lungs' outline, the notice) is shown:
        only for an X-ray read without warnings. Lungs "found" on a photo, a document or an
        unusual film may be no lungs. The one place this rule is written."""
        return self.status == RESULT and not self.warnings

    @property
    def explained_other_class(self) -> bool:
        return self.status == RESULT and self.target is not None and self.target != self.label


def decision_rule(decision: Mapping | None) -> str:
    """The decision rule in words."""
    decision = decision or {"rule": "argmax"}
    if decision.get("rule", "argmax") == "argmax":
        return "the most probable class"
    why = decision.get("method", "")
    return (f"{decision['class']} whenever its probability is at least {decision['threshold']:.2f}"
            + (f" ({why})" if why else "") + "; otherwise the most probable other class")


def notice_rule(config: Mapping) -> Mapping:
    """The lungs-outside notice's rule: the checkpoint's own (audit.py --store-notice), else the
    default. A rule stored before the chance rule (a percentile threshold of lung focus) is read
    as the chance rule for its method: a threshold of one model's own maps said nothing about
    the lungs."""
    stored = config.get("lung_focus_notice")
    if not stored or stored.get("rule") != "chance":
        return DEFAULT_NOTICE | ({"method": stored["method"]} if stored and "method" in stored else {})
    return stored


def method_in_words(method: str, same: Mapping[str, Sequence[str]]) -> str:
    """The method's name, with the others that draw the same map on this network."""
    for key, others in same.items():
        if method in (key, *others):
            twins = [METHOD_LABELS[m] for m in (key, *others) if m != method]
            return f"{METHOD_LABELS[method]}, here the same map as {', '.join(twins[:-1])} and {twins[-1]}"
    return METHOD_LABELS.get(method, method)


def verdict(decided: str, probabilities: Mapping[str, float], *, warnings: Sequence[str] = (),
            reasons: Sequence[str] = (), decision: Mapping | None = None, target: str | None = None,
            method: str | None = None, shares: Mapping[str, float] | None = None,
            notice: Mapping | None = None, same_methods: Mapping[str, Sequence[str]] | None = None) -> Verdict:
    """The verdict for one analysis.

    `decided`: the class the checkpoint's `decision` rule gives for `probabilities`; `reasons`:
    why the input is no chest X-ray (a refusal when any); `warnings`: what is unusual about an
    X-ray that is read all the same; `target`, `method`, `shares`: the heatmap, when one was
    made (the class it explains, the method, evidence_shares of it); `notice`: the
    lungs-outside rule (`notice_rule`); `same_methods`: explain.identical_methods."""
    same = same_methods or {}
    probabilities = {name: float(p) for name, p in probabilities.items()}
    heatmap = dict(target=target, method=method, method_words=method_in_words(method, same) if method else "")
    if reasons:
        return Verdict(REFUSED, None, probabilities, decision_rule(decision), warnings=tuple(warnings),
                       reasons=tuple(reasons), **heatmap)
    why = ""
    decision = decision or {}
    if decision.get("rule") == "threshold" and decided == decision["class"] and \
            max(probabilities, key=probabilities.get) != decided:
        why = (f"Called {decided} because its probability reaches the model's operating threshold of "
               f"{decision['threshold']:.2f}, though another class is more probable.")
    shares = dict(shares or {}) if Verdict(RESULT, decided, warnings=tuple(warnings)).evidence_shown else {}
    text = ""
    rule = notice or DEFAULT_NOTICE
    focus = shares.get("lung_focus")
    same_map = target == decided and method is not None and (
        method == rule["method"] or method in same.get(rule["method"], ()))
    chance = shares.get("chance_focus")
    if focus is not None and chance is not None and same_map and notice_fires(focus, chance):
        region = "lungs' box" if shares.get("cropped") else "image"
        text = (f"The evidence is not on the lungs. This map puts {focus:.0%} of its mass on the lungs, no more "
                f"than the {chance:.0%} a map spread evenly over the {region} would. The model may be reading "
                "something other than lung disease here (a marker, a border, a "
                "device, the patient's build): give this prediction less weight.")
    return Verdict(RESULT, decided, probabilities, decision_rule(decision), why, tuple(warnings),
                   lung_focus=focus, chance_focus=chance, border_share=shares.get("border_share"),
                   top_share=shares.get("top_share"), notice=text, **heatmap)


def notice_fires(lung_focus: float, chance_focus: float) -> bool:
    """The lungs-outside notice's rule: lung focus no better than an even spread."""
    return lung_focus <= chance_focus


def failure(message: str) -> Verdict:
    """The verdict for an input that could not be analysed (unreadable, empty, too large...)."""
    return Verdict(ERROR, error=str(message))


# -- renderers --------------------------------------------------------------------------------------

def markdown(v: Verdict) -> str:
    """The page's text: the headline first, then the rule, warnings, the heatmap and the evidence."""
    if v.status == ERROR:
        return f"### {ERROR_HEADLINE}\n{_escape(v.error)}"
    if v.status == REFUSED:
        reasons = "".join(f"\n- {reason}" for reason in v.reasons)
        probabilities = ", ".join(f"{name} {p:.0%}" for name, p in v.probabilities.items())
        heatmap = (f"; the heatmap shows where its evidence for {v.target} lies, which says nothing about disease"
                   if v.target else "")
        return (f"### {NOT_AN_XRAY_HEADLINE}\n"
                f"The model reads frontal chest X-rays only, so it gives no result for this image.{reasons}\n\n"
                f'<span class="secondary">Not a result: what the network outputs for this image anyway '
                f"(probabilities {probabilities}){heatmap}.</span>")
    text = f"### {v.headline}\nDecided by the model's rule: {v.rule}."
    if v.why:
        text += f" {v.why}"
    text += "".join(f"\n\n> ⚠️ **Check the input.** {warning}" for warning in v.warnings)
    if v.target:
        text += (f"\n\nThe heatmap shows where the evidence for **{v.target}** lies "
                 f"({v.method_words}; red = strongest, blue = weakest).")
        if v.explained_other_class:
            text += f" You are looking at the evidence for {v.target}, not for the prediction."
    if v.lung_focus is not None:
        chance = f" (an even spread: {v.chance_focus:.0%})" if v.chance_focus is not None else ""
        text += (f"\n\n**Lung focus {v.lung_focus:.0%}**{chance}: share of the heatmap on the lungs "
                 f"(white outline); {v.border_share:.0%} lies on the image border and "
                 f"{v.top_share:.0%} on the top strip where text markers sit.")
    if v.notice:
        text += f"\n\n> **{v.notice.split('. ', 1)[0]}.** {v.notice.split('. ', 1)[1]}"
    return text


def brief(v: Verdict) -> str:
    """A short account, for one model's column in the compare view: the headline, the class the
    map explains, its lung focus against an even spread, and the notice's first sentence."""
    if v.status == ERROR:
        return f"**{ERROR_HEADLINE}** {_escape(v.error)}"
    text = f"**{v.headline}**"
    if v.target:
        text += f"  \nMap: evidence for {v.target}" + (" (not the prediction)" if v.explained_other_class else "")
    if v.lung_focus is not None:
        chance = f" (even spread {v.chance_focus:.0%})" if v.chance_focus is not None else ""
        text += f"  \nLung focus **{v.lung_focus:.0%}**{chance}"
    if v.notice:
        text += f"\n\n> {v.notice.split('. ', 1)[0]}."
    return text


def label_output(v: Verdict) -> dict:
    """The label field's value: the shown label, and the probabilities as bars for a result only
    (a refusal names no class, and its probabilities are no reading)."""
    confidences = []
    if v.status == RESULT:
        ranked = sorted(v.probabilities.items(), key=lambda item: item[1], reverse=True)
        confidences = [{"label": name, "confidence": value} for name, value in ranked]
    return {"label": v.shown_label, "confidences": confidences}


def csv_fields(v: Verdict, classes: Sequence[str]) -> dict[str, str]:
    """A CSV row's fields: label (the shown label: a class only for a result), every
    probability, lung focus and its chance level, the lungs-outside notice, warnings (for a refusal, its reasons
    first) and the error."""
    return {"label": v.shown_label if v.status != ERROR else "",
            **{f"p_{c}": f"{v.probabilities[c]:.4f}" if c in v.probabilities else "" for c in classes},
            "lung_focus": "" if v.lung_focus is None else f"{v.lung_focus:.3f}",
            "chance_focus": "" if v.chance_focus is None else f"{v.chance_focus:.3f}",
            "notice": v.notice,
            "warning": "; ".join([*v.reasons, *v.warnings]),
            "error": v.error}


def caption(v: Verdict) -> str:
    """One line for a heatmap image: what it shows, for which class, by which method, and the
    verdict it belongs to."""
    if v.status == ERROR:
        return f"{ERROR_HEADLINE}: {v.error}"
    method = METHOD_LABELS.get(v.method or "", v.method or "")
    if v.status == REFUSED:
        return (f"NOT A FRONTAL CHEST X-RAY: no result. {method} evidence for {v.target} "
                f"(p = {v.probabilities.get(v.target, 0):.2f}), which says nothing about disease")
    text = f"{method} evidence for {v.target} (p = {v.probabilities.get(v.target, 0):.2f})"
    if v.explained_other_class:
        text += f"; prediction: {v.label} (p = {v.probabilities[v.label]:.2f})"
    else:
        text += ": the prediction"
    if v.lung_focus is not None:
        text += f"; lung focus {v.lung_focus:.0%}" + (f" (even spread {v.chance_focus:.0%})"
                                                      if v.chance_focus is not None else "")
    if v.notice:
        text += "; much of the evidence lies outside the lungs"
    if v.warnings:
        text += "; check the input: " + " ".join(v.warnings)
    return text


def _escape(text: str) -> str:
    """Markdown-safe text of an error message (a file name may hold * or _ or <)."""
    import html

    return html.escape(text, quote=False).replace("*", "\\*").replace("_", "\\_")
