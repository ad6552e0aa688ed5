"""Serving stage: the Gradio app around `Predictor.predict` and `Predictor.explain`.

    covidxr serve                      # http://127.0.0.1:7860 (also: python app.py)
    covidxr serve --port 8080 --checkpoint runs/x/model.safetensors

The one analysis function, `XrayApp.analyse`, serves the upload, the example gallery and the
programmatic endpoint `/predict` alike.
"""

from __future__ import annotations

import argparse
import ctypes
from pathlib import Path

import gradio as gr
from PIL import Image

from .data import ImageLoadError
from .examples import FETCH_COMMAND, available_examples
from .explain import METHODS
from .predictor import Predictor

PREDICTED = "predicted class"
NOTICE = ("**Research and teaching tool, not a medical device.** Not validated for clinical use: "
          "do not use it to diagnose, treat or triage anyone.")
METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "hirescam": "HiResCAM",
                 "xgradcam": "XGrad-CAM", "layercam": "LayerCAM", "eigencam": "Eigen-CAM",
                 "scorecam": "Score-CAM (slow)"}
# Uploads above this are refused by the server before they reach the model.
MAX_FILE_SIZE = "40mb"
# The two images go back at most this many pixels a side: enough for the full-screen view,
# and a 3,000-px DICOM no longer costs its colour mapping, JPEG encoding and transfer at full size.
DISPLAY_SIDE = 1024
M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h


def model_facts(config: dict) -> str:
    """The model's own description, read from its checkpoint."""
    metrics = config.get("metrics", {})
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
    if data:
        lines.append(f"**Training data** {data.get('images', {}).get('train', '?')} images "
                     f"(`{Path(str(data.get('manifest', ''))).name}`, fingerprint "
                     f"`{str(data.get('train_data_sha256', ''))[:12]}`).")
    lines.append(f"**Trained** {config.get('created', '?')}, code {config.get('code_version', '?')}.")
    return "\n\n".join(lines)


# Below this share of the heatmap on the lungs, the app says the evidence lies mostly elsewhere.
LOW_LUNG_FOCUS = 0.5


def focus_text(explanation) -> str:
    """Where the evidence lies, in words: the lung focus and the shares on border and top strip."""
    if explanation.lung_focus is None:
        return ""
    text = (f"\n\n**Lung focus {explanation.lung_focus:.0%}**: share of the heatmap on the lungs "
            f"(white outline); {explanation.border_share:.0%} lies on the image border and "
            f"{explanation.top_share:.0%} on the top strip where text markers sit.")
    if explanation.lung_focus < LOW_LUNG_FOCUS:
        text += ("\n\n> **Most of the evidence lies outside the lungs.** The model may be reading something "
                 "other than lung disease here (a marker, a border, a device, the patient's build): give this "
                 "prediction less weight.")
    return text


class XrayApp:
    def __init__(self, predictor: Predictor, examples_dir: Path | None = None):
        self.predictor = predictor
        self.examples = available_examples(examples_dir) if examples_dir else available_examples()

    def analyse(self, file, method: str = "gradcam", explain_class: str = PREDICTED, opacity: float = 0.4):
        """(probabilities, original, overlay, summary) for an uploaded file path."""
        if not file:
            raise gr.Error("Upload a chest X-ray (PNG, JPEG or DICOM) or click an example first.")
        path = Path(file if isinstance(file, (str, Path)) else file.name)
        if method not in METHODS:
            raise gr.Error(f"Unknown explanation method {method!r}; choose one of {', '.join(METHODS)}.")
        target = None if explain_class in (None, "", PREDICTED) else explain_class
        if target is not None and target not in self.predictor.classes:
            raise gr.Error(f"Unknown class {explain_class!r}; choose one of {', '.join(self.predictor.classes)}.")
        try:
            explanation = self.predictor.explain(path, method=method, target=target, opacity=float(opacity),
                                                 max_side=DISPLAY_SIDE)
        except ImageLoadError as error:
            raise gr.Error(f"Cannot read {path.name}: {error}") from error
        prediction = explanation.prediction
        original = Image.fromarray((explanation.image * 255).round().astype("uint8"))
        summary = "".join(f"> ⚠️ **Check the input.** {warning}\n>\n" for warning in prediction.warnings)
        summary += (f"### Prediction: {prediction.label}\n"
                   f"The heatmap shows where the evidence for **{explanation.target}** lies "
                   f"({METHOD_LABELS[method]}; red = strongest).")
        decision = self.predictor.config.get("decision") or {}
        if decision.get("rule") == "threshold" and prediction.label == decision["class"] and \
                max(prediction.probabilities, key=prediction.probabilities.get) != prediction.label:
            summary += (f" Called {prediction.label} because its probability reaches the model's operating "
                        f"threshold of {decision['threshold']:.2f}, though another class is more probable.")
        if explanation.target != prediction.label:
            summary += f" You are looking at the evidence for {explanation.target}, not for the prediction."
        if not prediction.warnings:  # lungs found on a photo or a document would mean nothing
            summary += focus_text(explanation)
        return prediction.probabilities, original, explanation.overlay, summary

    def build(self) -> gr.Blocks:
        classes = self.predictor.classes
        with gr.Blocks(title="covidxr: COVID-19 on chest X-rays") as demo:
            gr.Markdown("# covidxr\nCOVID-19, normal or other pneumonia on a frontal chest X-ray, "
                        "with a heatmap of the regions that drove the decision.")
            gr.Markdown(NOTICE, elem_id="notice")
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="Chest X-ray (PNG, JPEG or DICOM)", file_count="single", elem_id="upload")
                    method = gr.Dropdown([(label, key) for key, label in METHOD_LABELS.items()],
                                         value="gradcam", label="Explanation method")
                    explain_class = gr.Radio([PREDICTED, *classes], value=PREDICTED, label="Explain the evidence for")
                    opacity = gr.Slider(0.0, 1.0, value=0.4, step=0.05, label="Heatmap opacity")
                    run = gr.Button("Analyse", variant="primary")
                with gr.Column(scale=2):
                    # The heading is off: the label comes from the decision rule, not always the top class.
                    probabilities = gr.Label(label="Probabilities", num_top_classes=len(classes),
                                             show_heading=False, elem_id="prediction")
                    summary = gr.Markdown(elem_id="summary")
                    with gr.Row():
                        original = gr.Image(label="Input, as the model reads it", type="pil", format="jpeg", elem_id="original")
                        overlay = gr.Image(label="Heatmap overlay", type="pil", format="jpeg", elem_id="overlay")
            gr.Markdown("### Examples")
            if self.examples:
                gallery = gr.Gallery(value=[(str(path), f"{row['label']}: {row['why']}") for path, row in self.examples],
                                     columns=min(len(self.examples), 8), height=190, object_fit="contain",
                                     allow_preview=False,
                                     label="Click an example", elem_id="examples", buttons=[])
            else:
                gr.Markdown(f"No example images here yet. Fetch them with `{FETCH_COMMAND}`.")
            with gr.Accordion("About this model", open=False):
                gr.Markdown(model_facts(self.predictor.config))

            inputs = [upload, method, explain_class, opacity]
            outputs = [probabilities, original, overlay, summary]
            run.click(self.analyse, inputs, outputs, api_name="predict", concurrency_id="model")
            upload.upload(self.analyse, inputs, outputs, api_visibility="private", concurrency_id="model")
            for control in (method, explain_class):
                control.input(self.analyse, inputs, outputs, api_visibility="private", concurrency_id="model",
                              trigger_mode="always_last")
            opacity.release(self.analyse, inputs, outputs, api_visibility="private", concurrency_id="model",
                            trigger_mode="always_last")
            if self.examples:
                paths = [str(path) for path, _ in self.examples]
                gallery.select(_pick_example(paths), None, upload, api_visibility="private").then(
                    self.analyse, inputs, outputs, api_visibility="private", concurrency_id="model")
        # One model, one request at a time: the explainer's hooks are not thread-safe, and
        # two CPU-bound requests would only slow each other down.
        demo.queue(default_concurrency_limit=1, max_size=64)
        return demo


def _pick_example(paths: list[str]):
    def pick(event: gr.SelectData) -> str:
        return paths[event.index]
    return pick


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


def launch(checkpoint: str | None = None, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           examples_dir: Path | None = None, block: bool = True):
    limit_malloc_arenas()
    app = XrayApp(Predictor.load(checkpoint), examples_dir).build()
    app.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
               prevent_thread_lock=not block, theme=gr.themes.Soft(), footer_links=["api"])
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The covidxr web app: upload a chest X-ray, get the label, "
                                                 "probabilities and a heatmap.")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--checkpoint", default=None, help="safetensors checkpoint (default: the shipped model)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--examples-dir", type=Path, default=None, help="folder of examples (default: examples/)")
    args = parser.parse_args(argv)
    launch(args.checkpoint, args.host, args.port, args.share, args.examples_dir)
