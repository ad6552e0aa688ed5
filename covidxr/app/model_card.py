"""What the page says about the models: the picked model's short card under its result, the
About panel (the checkpoint's own description, the notice's rule, the methods), and the page's
last panel, which shows MODEL_CARD.md itself when opened. Read from the checkpoints and the
file: no model runs, so none of it waits behind an analysis.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import current
from ..explain import identical_methods
from ..report import METHOD_LABELS, decision_rule, notice_rule
from .state import COMPARE, XrayApp
from .words import COMPARE_INTRO, SLOW_METHODS

# The repository's model card, shown in the page's last panel (opened, it loads the file) and
# linked from the notes that say "the rest is there". A pip-installed copy has no repository.
MODEL_CARD = Path(__file__).resolve().parents[2] / "MODEL_CARD.md"


def card(app: XrayApp, view: str) -> str:
    """What the picked model is (`short_card`), or what the comparison shows."""
    if not app.several:
        return ""
    if view == COMPARE:
        return COMPARE_INTRO
    return short_card(app.models.configs[view])


def facts(app: XrayApp, view: str) -> str:
    """The About panel: the picked model's description (the default's in the compare view)."""
    config = app.models.configs[app.models.default if view == COMPARE else view]
    return "\n\n".join([model_facts(config), notice_facts(config), method_facts(config)])


def model_card_text() -> str:
    """The repository's MODEL_CARD.md, or where to find it when this copy has none."""
    if MODEL_CARD.is_file():
        return MODEL_CARD.read_text(encoding="utf-8")
    return ("MODEL_CARD.md is in the covidxr repository, beside README.md; this installed copy does not carry it. "
            "`covidxr describe NAME` prints a bundled model's own description and measured numbers.")


def short_card(config: dict) -> str:
    """What a model is, in a few lines for a student, from its checkpoint: its card (what it was
    trained on and the shortcut it is known to take), its test numbers and its lung focus."""
    about = config.get("card") or {}
    lines = [f"**{about.get('title', config['arch'])}.** {about.get('summary', '')}".strip()]
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
    fared = config.get("quality")
    if fared:
        holds = "holds" if fared["worst_labels_changed"] <= 0.10 else "does not hold"
        lines.append(f"Under a JPEG, a smaller copy or a blur its answer {holds}: at worst "
                     f"**{fared['worst_labels_changed']:.0%}** of labels change ({fared['worst_variant']}, "
                     f"{fared['worst_group']}; the bar is 10%).")
    if about.get("shortcut"):
        lines.append(f"*Known shortcut:* {about['shortcut']}")
    return "  \n".join(lines)


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
    # The rule's words, and how it was chosen, are the checkpoint's own record (report.decision_rule).
    chosen = f", chosen on {decision['chosen_on']}" if decision.get("chosen_on") else ""
    lines.append(f"**Decision** {decision_rule(decision)}{chosen}.")
    if metrics:
        where = f" ({metrics['split']} split)" if isinstance(metrics.get("split"), str) else ""
        lines.append(f"**Test results** ({metrics.get('n')} held-out images{where}, from patients never seen in "
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


def notice_facts(config: dict) -> str:
    """The lungs-outside notice's rule in words, for the About panel."""
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


def method_choices(config: dict) -> list[tuple[str, str]]:
    """(label, method) for the method menu: methods that draw the very same map on this network
    (explain.identical_methods) are one entry, named for all of them; a slow one says so."""
    same = identical_methods(config)
    folded = {other for others in same.values() for other in others}
    return [(menu_name(key, same), key) for key in METHOD_LABELS if key not in folded]


def menu_name(method: str, same: dict[str, tuple[str, ...]]) -> str:
    """The method's entry in the menu: one entry, named for all, where methods draw the same map."""
    name = " = ".join([METHOD_LABELS[method], *(METHOD_LABELS[m] for m in same.get(method, ()))])
    return f"{name} (slow)" if method in SLOW_METHODS else name


def method_info(config: dict) -> str:
    """The method menu's help line."""
    same = identical_methods(config)
    return "; ".join(f"{names(key, others)} draw the same map for this network: one entry"
                     for key, others in same.items()) or "Each method draws its own map."


def method_facts(config: dict) -> str:
    """The methods in words, for the About panel."""
    same = identical_methods(config)
    text = ("**Explanation methods** Grad-CAM++ and LayerCAM weigh only positive evidence (close to Grad-CAM "
            "at this layer); Eigen-CAM shows the layer's main pattern, whatever the class; Score-CAM scores "
            "masked copies of the input (slow).")
    for key, others in same.items():
        text += (f" {names(key, others)} give one and the same map here: a global average pool and one linear "
                 f"layer follow the explained layer `{config['gradcam_layer']}`, so each position of a channel "
                 "gets the same gradient and they weigh the channels alike. The API still accepts each name.")
    return text


def names(key: str, others: tuple[str, ...]) -> str:
    listed = [METHOD_LABELS[key], *(METHOD_LABELS[m] for m in others)]
    return f"{', '.join(listed[:-1])} and {listed[-1]}"
