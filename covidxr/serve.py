"""Serving stage: the Gradio app around `Predictor.predict` and `Predictor.explain`.

`main` is its command line (`python app.py`, `covidxr serve`). The one analysis function,
`XrayApp.analyse`, serves the upload, the example gallery and the programmatic endpoint
`/predict` alike; `XrayApp.admit` checks each request before it may join the queue.

For a server others can reach: uploads and results live in the app's own temp folder and are
deleted an hour after they were made (and all of them when the app stops), usage analytics
are off, `--auth` / `--auth-file` ask for a login, each client may have only a few analyses
waiting, responses carry nosniff and frame headers, and `--public-url` builds result URLs from
the public address instead of the request's Host header.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import html
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import gradio as gr
from PIL import Image
from starlette.middleware import Middleware

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
# Uploads and results are deleted this long after they were made; the check runs as often.
FILE_LIFETIME_S = 3600
QUEUE_SIZE = 64
# Analyses one client (login, else address) may have waiting besides the one running: a user
# needs one or two, and a script cannot fill the queue for everyone (Score-CAM takes seconds).
MAX_WAITING_PER_CLIENT = 4
log = logging.getLogger("covidxr.serve")


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
        self.demo = None  # the Blocks, once built

    def problems(self, method, explain_class, opacity) -> dict[str, str]:
        """What is wrong with a request's settings, by parameter name; empty when nothing is.
        The API accepts any JSON, so nothing is assumed of the types, and a refused value is
        quoted short: a 100,000-character one does not come back."""
        problems = {}
        if not isinstance(method, str) or method not in METHODS:
            problems["method"] = (f"Unknown explanation method {_quoted(method)}; choose one of "
                                  f"{', '.join(METHODS)}.")
        if not (explain_class in (None, "") or isinstance(explain_class, str)
                and explain_class in (PREDICTED, *self.predictor.classes)):
            problems["explain_class"] = (f"Unknown class {_quoted(explain_class)}; choose one of "
                                         f"{', '.join([PREDICTED, *self.predictor.classes])}.")
        if isinstance(opacity, bool) or not isinstance(opacity, (int, float)) or not 0 <= opacity <= 1 \
                or not math.isfinite(opacity):
            problems["opacity"] = f"Opacity must be a number from 0 to 1, not {_quoted(opacity)}."
        return problems

    def admit(self, file, method, explain_class, opacity, request: gr.Request):
        """Gradio's validator, run before a request joins the queue: refused settings, and a
        client that already has MAX_WAITING_PER_CLIENT analyses waiting, never take a place."""
        problems = self.problems(method, explain_class, opacity)
        client = _client(request)
        if self.waiting(client) >= MAX_WAITING_PER_CLIENT:
            log.info("refused a request from %s: %d analyses already waiting", client, MAX_WAITING_PER_CLIENT)
            problems["file"] = (f"You already have {MAX_WAITING_PER_CLIENT} analyses waiting; "
                                "try again when they are done.")
        names = ("file", "method", "explain_class", "opacity")
        return [gr.validate(name not in problems, html.escape(problems.get(name, ""), quote=False))
                for name in names]

    def waiting(self, client: str) -> int:
        """How many of this client's analyses wait in the queue (the running one not counted)."""
        # Gradio has no per-client limit of its own; its queue is read, never changed.
        queues = getattr(getattr(self.demo, "_queue", None), "event_queue_per_concurrency_id", {})
        return sum(_client(event.request, event.username) == client
                   for queue in list(queues.values()) for event in list(queue.queue))

    def analyse(self, file, method: str = "gradcam", explain_class: str = PREDICTED, opacity: float = 0.4):
        """(probabilities, original, overlay, summary) for an uploaded file path."""
        if not file:
            raise gr.Error("Upload a chest X-ray (PNG, JPEG or DICOM) or click an example first.",
                           print_exception=False)
        path = Path(file if isinstance(file, (str, Path)) else file.name)
        problems = self.problems(method, explain_class, opacity)
        if problems:
            raise gr.Error(html.escape(" ".join(problems.values()), quote=False), print_exception=False)
        target = None if explain_class in (None, "", PREDICTED) else explain_class
        try:
            explanation = self.predictor.explain(path, method=method, target=target, opacity=float(opacity),
                                                 max_side=DISPLAY_SIDE)
        except ImageLoadError as error:
            # An expected refusal: one line in the log, no traceback.
            reason = str(error).removeprefix(f"{path.name}: ")
            log.info("refused %r: %s", path.name, reason)
            raise gr.Error(html.escape(f"Cannot read {path.name}: {reason}", quote=False),
                           print_exception=False) from error
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
        with gr.Blocks(title="covidxr: COVID-19 on chest X-rays", analytics_enabled=False,
                       delete_cache=(FILE_LIFETIME_S, FILE_LIFETIME_S)) as demo:
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
                    # Their values reach `admit` and `analyse` as sent: Gradio's own checks
                    # echo a refused value whole and let NaN through as an opacity.
                    for control in (method, explain_class, opacity):
                        control.preprocess = _as_sent
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
            model = dict(concurrency_id="model", validator=self.admit)
            run.click(self.analyse, inputs, outputs, api_name="predict", **model)
            upload.upload(self.analyse, inputs, outputs, api_visibility="private", **model)
            for control in (method, explain_class):
                control.input(self.analyse, inputs, outputs, api_visibility="private", trigger_mode="always_last",
                              **model)
            opacity.release(self.analyse, inputs, outputs, api_visibility="private", trigger_mode="always_last",
                            **model)
            if self.examples:
                paths = [str(path) for path, _ in self.examples]
                gallery.select(_pick_example(paths), None, upload, api_visibility="private").then(
                    self.analyse, inputs, outputs, api_visibility="private", **model)
        # One model, one request at a time: the explainer's hooks are not thread-safe, and
        # two CPU-bound requests would only slow each other down.
        demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
        self.demo = demo
        return demo


def _as_sent(value):
    return value


def _quoted(value) -> str:
    text = repr(value)
    return text if len(text) <= 30 else text[:30] + "..."


def _client(request, username: str | None = None) -> str:
    """Who sent a request: the login when there is one, else the address (behind a reverse
    proxy on this machine, uvicorn reads the client's address from X-Forwarded-For)."""
    username = username or getattr(request, "username", None)
    client = getattr(request, "client", None)
    return f"user {username}" if username else f"address {getattr(client, 'host', 'unknown')}"


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


def launch(checkpoint: str | None = None, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           examples_dir: Path | None = None, block: bool = True, auth: list[tuple[str, str]] | None = None,
           public_url: str | None = None):
    limit_malloc_arenas()
    private_temp_dir()
    app = XrayApp(Predictor.load(checkpoint), examples_dir).build()
    app.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
               prevent_thread_lock=not block, theme=gr.themes.Soft(), footer_links=["api"],
               auth=auth or None, root_path=public_url, app_kwargs={"middleware": [Middleware(SecurityHeaders)]})
    return app


def read_auth(pairs: list[str], files: list[Path]) -> list[tuple[str, str]]:
    """USER:PASS pairs from the command line and from files (one a line, # comments)."""
    lines = list(pairs)
    for file in files:
        lines += [line.strip() for line in file.read_text().splitlines()
                  if line.strip() and not line.strip().startswith("#")]
    logins = []
    for line in lines:
        user, colon, password = line.partition(":")
        if not colon or not user or not password:
            raise ValueError("a login must be USER:PASSWORD, with neither empty")
        logins.append((user, password))
    return logins


def main(argv: list[str] | None = None) -> None:
    """The app's command line (app.py, `covidxr serve`)."""
    parser = argparse.ArgumentParser(prog="covidxr serve", description="The covidxr web app: upload a chest "
                                     "X-ray, get the label, probabilities and a heatmap.")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--checkpoint", default=None, help="safetensors checkpoint (default: the shipped model)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--examples-dir", type=Path, default=None, help="folder of examples (default: examples/)")
    parser.add_argument("--auth", action="append", default=[], metavar="USER:PASS",
                        help="ask for this login (repeatable; other users on this machine can see it in the "
                             "process list: prefer --auth-file)")
    parser.add_argument("--auth-file", action="append", default=[], type=Path, metavar="FILE",
                        help="ask for one of the USER:PASS logins in FILE (one a line)")
    parser.add_argument("--public-url", default=None, metavar="URL",
                        help="the address users reach the app at (e.g. https://xray.example.org): result URLs "
                             "are built from it, not from the request's Host header")
    args = parser.parse_args(argv)
    try:
        auth = read_auth(args.auth, args.auth_file)
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
           public_url=args.public_url)
