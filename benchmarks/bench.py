"""Benchmark: what each step costs, for the shipped model and for two well-known architectures.

    covidxr bench                          # prints the table (or: python -m benchmarks.bench)
    covidxr bench --markdown BENCHMARKS.md --json benchmarks/results.json   # and records it
    covidxr bench --quick                  # fewer repeats (a smoke run)

Every figure is a median (and p95) over repeated runs after warm-up, in one process, so the
ratios between architectures are fair even on a noisy machine. densenet121 (the architecture
of CheXNet and torchxrayvision's models) and resnet18 run the very same pipeline (randomly
initialised: their weights do not change their cost). The "floor" is the model's FLOPs over the
multiply-add rate this CPU reaches on one large matrix product.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from covidxr.data import data_dir, load_image
from covidxr.framing import WHOLE_IMAGE
from covidxr.explain import METHODS
from covidxr.model import build_model, count_parameters, fold_batch_norms, gradcam_layer_name
from covidxr.predictor import Predictor

from .common import AppProcess, default_images, machine, shared_ssl_context, write_markdown

COMPARED = ("densenet121", "resnet18")


def timings(function, repeats: int, warmup: int = 2) -> dict:
    """Median, p95 and all runs of `function()` in milliseconds."""
    for _ in range(warmup):
        function()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        runs.append((time.perf_counter() - started) * 1000)
    return {"median": statistics.median(runs), "p95": float(np.percentile(runs, 95)), "runs": len(runs)}


def model_flops(model: torch.nn.Module, size: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of one forward pass on a (1, 1, size, size) image."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, 1, size, size))
    return int(counter.get_total_flops())


def cpu_gflops(size: int = 2048, repeats: int = 5) -> float:
    """What this CPU sustains on one big float32 matrix product: the practical compute ceiling."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    median = timings(lambda: a @ b, repeats)["median"] / 1000
    return 2 * size**3 / median / 1e9


def pipeline(predictor: Predictor, paths: list[Path], repeats: int, methods: list[str], batch_size: int = 32) -> dict:
    """Per-image costs of decode+preprocess, predict and predict+CAM, over real X-rays.

    Preprocessing is the model's own (`Predictor.prepare`): for a lung-reading checkpoint it
    includes the lung U-Net that finds the box to crop (framing.py), so every row below that
    starts from the image pays for the segmentation too."""
    grays = [load_image(path)[0] for path in paths]
    prepared = [predictor.prepare(gray) for gray in grays]
    cycle = iter(range(10**9))
    segmenter = predictor.segmenter

    def pick(items):
        # Each image as new: the lung model's kept answers (segment.py) are dropped, as the app
        # drops them at every request, so no repeat finds its U-Net pass already done.
        if segmenter is not None:
            segmenter.forget()
        return items[next(cycle) % len(items)]

    result = {
        "decode+preprocess": timings(lambda: predictor.prepare(load_image(pick(paths))[0]), repeats),
        "predict (network only)": timings(lambda: predictor.probabilities_and_features(pick(prepared)[None]),
                                          repeats),
        "predict (decoded image to label)": timings(lambda: predictor.predict(pick(grays)), repeats),
    }
    # The CAM rows: from the decoded image to the label and the map on the image (an Explanation
    # computes its lung outline and overlay when they are first read; those are timed below).
    for method in methods:
        runs = max(3, repeats // 10) if method == "scorecam" else repeats
        result[f"predict+{method}"] = timings(lambda: predictor.explain(pick(grays), method=method).heatmap, runs)
    if segmenter is not None:
        result["lung mask (U-Net)"] = timings(lambda: segmenter.segment(pick(grays)), repeats)

    def everything(explanation):
        return explanation.overlay, explanation.lung_focus

    result["explain, full pipeline (file to overlay, lung focus)"] = timings(
        lambda: everything(predictor.explain(pick(paths))), max(5, repeats // 2))
    batch = torch.stack(prepared * (batch_size // len(prepared) + 1))[:batch_size]
    per_batch = timings(lambda: predictor.probabilities(batch), max(3, repeats // 5))
    result["batch_images_per_s"] = batch_size / (per_batch["median"] / 1000)
    return result


def training_throughput(arch: str, size: int, batch_size: int, steps: int, device: torch.device) -> float:
    """Images per second of forward + backward + AdamW step on (batch, 1, size, size), channels_last."""
    model = build_model(arch, 3).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = torch.randn(batch_size, 1, size, size, device=device).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 3, (batch_size,), device=device)

    def step():
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(inputs).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    median = timings(step, steps, warmup=1)["median"] / 1000
    return batch_size / median


def app_round_trip(paths: list[Path], repeats: int) -> dict:
    """Upload, predict, Grad-CAM and the overlay back, through the launched app."""
    from gradio_client import Client, handle_file

    # Gradio's own profiler (GRADIO_PROFILING) times each request's phases inside the server.
    with AppProcess(environment={"GRADIO_PROFILING": "1"}) as app:
        client = Client(app.url, verbose=False, ssl_verify=shared_ssl_context())
        cycle = iter(range(10**9))

        def call():
            client.predict(handle_file(str(paths[next(cycle) % len(paths)])), "gradcam", "predicted class", 0.4,
                           api_name="/predict")

        for _ in range(3):  # warm-up, left out of the server's phases too
            call()
        _server_profile(app.url, clear=True)
        result = timings(call, repeats, warmup=0)
        result["server"] = _server_profile(app.url)
        result["peak_rss_mb"] = _peak_rss_mb(app.process.pid)
    return result


def compare_view(paths: list[Path], repeats: int, memory_requests: int = 100) -> dict:
    """The compare view's handler (analysis.show with "compare"): every bundled model's verdict
    and Grad-CAM for one image, from a cold cache (a new page session each time: nothing of an
    earlier analysis is reused), in this process. Then this process's resident memory before and
    after `memory_requests` more of them."""
    import psutil

    from covidxr.predictor import ModelShelf
    from covidxr.app import analysis
    from covidxr.app.state import COMPARE, PREDICTED, XrayApp

    app = XrayApp(models=ModelShelf.bundled())
    cycle = iter(range(10**9))

    def call():
        index = next(cycle)
        app.models.forget_lung_answers()  # as every job of the app does (XrayApp.analyses)
        analysis.show(app, str(paths[index % len(paths)]), "gradcam", PREDICTED, 0.4, COMPARE, f"bench session {index}")

    result = timings(call, repeats, warmup=2)
    result["models"] = app.models.names
    process = psutil.Process()
    result["rss_before_mb"] = process.memory_info().rss / 2**20
    for _ in tqdm(range(memory_requests), desc="compare requests (memory)", unit="request", leave=False):
        call()
    result["rss_after_mb"] = process.memory_info().rss / 2**20
    result["memory_requests"] = memory_requests
    return result


def file_test(paths: list[Path], repeats: int) -> dict:
    """The file test's handler (app/file_test.quality_api): one model's verdict for one X-ray as it
    is, compressed, smaller and blurred, for each bundled model (the bar: at most 1 s on 2 cores)."""
    from covidxr.app import file_test as view
    from covidxr.app.state import XrayApp
    from covidxr.predictor import ModelShelf

    app = XrayApp(models=ModelShelf.bundled())
    results = {}
    for name in app.models.names:
        cycle = iter(range(10**9))

        def call():
            app.models.forget_lung_answers()  # as every job of the app does
            view.quality_api(app, str(paths[next(cycle) % len(paths)]), name)

        results[name] = timings(call, repeats, warmup=2)
    return results


# In the page, set before the action: a promise (window.covidxrRendered) of when the result's
# heatmap has arrived and is drawn (every image `selector` names decoded), in ms since the
# page's time origin. Watched with a MutationObserver
# and load events, not polled: polling from the test driver took CPU from the server it timed.
_RENDERED_JS = """([selector, count]) => { window.covidxrRendered = new Promise(resolve => {
  const done = () => {
    const images = [...document.querySelectorAll(selector)];
    if (images.length >= count && images.every(i => i.complete && i.naturalWidth > 0)) {
      observer.disconnect(); resolve(performance.now()); return true;
    }
    images.forEach(i => i.addEventListener("load", done, {once: true}));
    return false;
  };
  const observer = new MutationObserver(done);
  observer.observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ["src"]});
  done();
}); }"""
_CHANGE_JS = """() => document.querySelector("#upload input[type=file]").addEventListener(
  "change", () => { window.covidxrPicked = performance.now(); }, {capture: true, once: true})"""
_RESOURCES_JS = """(since) => performance.getEntriesByType("resource").filter(e => e.startTime >= since)
  .map(e => ({name: e.name, start: e.startTime, end: e.responseEnd}))"""


def browser_timings(paths: list[Path], repeats: int, workdir: Path, data: Path) -> dict:
    """From upload to rendered result as a person meets it, in Chromium (Playwright, Debian's
    /usr/bin/chromium), against the launched app: a 1-megapixel PNG X-ray picked for upload, with
    Grad-CAM, and an example clicked in the compare view (every model's map). Each repeat is a
    new page (a new session: a cold cache). Stage by stage: the upload request, the server's
    phases (Gradio's profiler: queue wait, the handler, postprocess), the result images'
    downloads; what is left is the event stream and drawing."""
    from playwright.sync_api import sync_playwright

    from covidxr.checkpoint import BUNDLED

    megapixel = workdir / "xray-1mp.png"
    gray, _ = load_image(paths[0])
    from PIL import Image

    Image.fromarray((np.clip(gray, 0, 1) * 255).astype(np.uint8)).resize((1000, 1000)).save(megapixel)
    from covidxr.examples import main as fetch_examples

    examples = workdir / "examples"  # the app's examples, copied from the data folder
    if fetch_examples(["--from", str(data), "--dest", str(examples)]) != 0:
        raise RuntimeError(f"could not copy the examples from {data}")
    stages = {"upload": [], "total": [], "images": [], "compare": []}
    server_phases = []
    with AppProcess(examples, environment={"GRADIO_PROFILING": "1"}) as app, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        for index in tqdm(range(repeats + 1), desc="browser", unit="page", leave=False):
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(app.url)
            page.locator("#upload input[type=file]").wait_for(state="attached", timeout=60_000)
            page.locator("#examples tbody tr").first.wait_for(timeout=60_000)
            _server_profile(app.url, clear=True)  # the server's phases of this upload alone
            # The clock starts when the browser has the file (the input's change event): what a
            # person waits for after picking it. Playwright's own hand-over of the file to the
            # browser (over the DevTools protocol, 1-1.8 s here) is no part of it.
            page.evaluate(_CHANGE_JS)
            page.evaluate(_RENDERED_JS, ["#overlay img", 1])
            page.locator("#upload input[type=file]").set_input_files(str(megapixel))
            end = page.evaluate("() => window.covidxrRendered")
            start = page.evaluate("() => window.covidxrPicked")
            resources = page.evaluate(_RESOURCES_JS, start)
            phases = _server_profile(app.url)
            # The compare view: one click on an example, every model's map drawn.
            page.get_by_role("radio", name="Compare all").check()
            page.wait_for_timeout(300)
            page.evaluate(_RENDERED_JS, ["#compare-view .compare-map img", len(BUNDLED)])
            start_compare = page.evaluate("() => performance.now()")
            page.locator("#examples tbody tr").nth(index % 3).click()
            compare_end = page.evaluate("() => window.covidxrRendered")
            page.close()
            if index == 0:
                continue
            uploads = [r for r in resources if "/upload" in r["name"] and "upload_progress" not in r["name"]]
            images = [r for r in resources if "/file=" in r["name"]]
            stages["total"].append(end - start)
            stages["upload"].append(sum(r["end"] - r["start"] for r in uploads))
            stages["images"].append(max((r["end"] for r in images), default=end) - min((r["start"] for r in images),
                                                                                     default=end))
            stages["compare"].append(compare_end - start_compare)
            server_phases.append(phases)
        browser.close()
    server = {key: statistics.median(p[key] for p in server_phases) for key in server_phases[0]
              if all(key in p for p in server_phases)}
    result = {name: {"median": statistics.median(values), "p95": float(np.percentile(values, 95))}
              for name, values in stages.items()}
    result["server"] = server
    result["runs"] = repeats
    return result


def _server_profile(url: str, clear: bool = False) -> dict:
    """Median milliseconds per phase of the requests Gradio's profiler saw (queue wait,
    preprocess, the handler, postprocess, total; uploads apart)."""
    if clear:
        urllib.request.urlopen(urllib.request.Request(url + "gradio_api/profiling/clear", method="POST"), timeout=10)
        return {}
    with urllib.request.urlopen(url + "gradio_api/profiling/summary", timeout=10) as response:
        summary = json.load(response)
    phases = {phase: values["p50"] for phase, values in summary.get("phases", {}).items()}
    if "upload" in summary:
        phases["upload"] = summary["upload"]["p50"]
    return phases


def _peak_rss_mb(pid: int) -> float:
    """The process's high-water mark of resident memory (VmHWM), or its current RSS elsewhere."""
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
        if match:
            return int(match.group(1)) / 1024
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def run(repeats: int, train_steps: int, with_app: bool, methods: list[str], compared=COMPARED,
        batch_size: int = 32, data: Path | None = None, checkpoint: Path | None = None, browser: bool = True) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shipped = Predictor.load(checkpoint, device="cpu")
    size = shipped.config["input_size"]
    paths = default_images(data_dir(data), 10)
    results = {"machine": machine(), "input_size": size, "batch_size": batch_size, "models": {}}
    candidates = {shipped.config["arch"]: shipped}
    for arch in compared:
        # The usual way to run them: the whole image at 224 px, no lung crop before them.
        config = dict(shipped.config, arch=arch, gradcam_layer=gradcam_layer_name(arch), framing=WHOLE_IMAGE,
                      input_size=224)
        # Folded like the shipped model's (Predictor.load), so the comparison is like for like.
        candidates[arch] = Predictor(fold_batch_norms(build_model(arch, len(shipped.classes))), config, "cpu")
    for arch, predictor in tqdm(candidates.items(), desc="benchmark", unit="model"):
        cpu_model = build_model(arch, len(shipped.classes))
        input_size = predictor.config["input_size"]
        entry = {"parameters": count_parameters(cpu_model), "gflops": model_flops(cpu_model, input_size) / 1e9,
                 "input_size": input_size}
        entry["cpu"] = pipeline(predictor, paths, repeats, methods if arch == shipped.config["arch"] else ["gradcam"],
                                batch_size)
        entry["train_images_per_s_cpu"] = training_throughput(arch, input_size, batch_size, train_steps,
                                                              torch.device("cpu"))
        if device.type == "cuda":
            entry["train_images_per_s_gpu"] = training_throughput(arch, input_size, batch_size, 3 * train_steps,
                                                                  device)
        results["models"][arch] = entry
    results["compare_view"] = compare_view(paths, max(5, repeats // 3), memory_requests=100 if with_app else 5)
    results["file_test"] = file_test(paths, max(5, repeats // 3))
    if with_app:
        results["app_round_trip"] = app_round_trip(paths, max(10, repeats))
        if browser:
            import tempfile

            with tempfile.TemporaryDirectory() as workdir:
                results["browser"] = browser_timings(paths, max(5, repeats // 3), Path(workdir), data_dir(data))
    results["cpu_gflops"] = cpu_gflops()
    return results


def markdown(results: dict) -> str:
    models = results["models"]
    shipped = next(iter(models))
    head = models[shipped]
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads"
             + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU") + f". Input {results['input_size']} px. "
             f"CPU ceiling (one 2048x2048 float32 matrix product): {results['cpu_gflops']:.0f} GFLOP/s.",
             "",
             f"| per image, CPU (ms, median / p95) | {' | '.join(models)} | "
             + " | ".join(f"{shipped} speed-up vs {a}" for a in list(models)[1:]) + " |",
             "|---|" + "---|" * (2 * len(models) - 1)]
    rows = [row for row in head["cpu"] if row != "batch_images_per_s"]
    for row in rows:
        cells = []
        for arch in models:
            value = models[arch]["cpu"].get(row)
            cells.append(f"{value['median']:.1f} / {value['p95']:.1f}" if value else "")
        ratios = []
        for arch in list(models)[1:]:
            value = models[arch]["cpu"].get(row)
            ratios.append(f"{value['median'] / head['cpu'][row]['median']:.1f}x" if value else "")
        lines.append(f"| {row} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines += ["| parameters | " + " | ".join(f"{models[a]['parameters'] / 1e6:.2f} M" for a in models) + " | "
              + " | ".join(f"{models[a]['parameters'] / head['parameters']:.1f}x" for a in list(models)[1:]) + " |",
              "| forward GFLOPs | " + " | ".join(f"{models[a]['gflops']:.2f}" for a in models) + " | "
              + " | ".join(f"{models[a]['gflops'] / head['gflops']:.1f}x" for a in list(models)[1:]) + " |",
              f"| batch inference (images/s, batch {results['batch_size']}) | "
              + " | ".join(f"{models[a]['cpu']['batch_images_per_s']:.0f}" for a in models) + " | "
              + " | ".join(f"{head['cpu']['batch_images_per_s'] / models[a]['cpu']['batch_images_per_s']:.1f}x"
                           for a in list(models)[1:]) + " |",
              f"| training (images/s, CPU, batch {results['batch_size']}) | "
              + " | ".join(f"{models[a]['train_images_per_s_cpu']:.0f}" for a in models) + " | "
              + " | ".join(f"{head['train_images_per_s_cpu'] / models[a]['train_images_per_s_cpu']:.1f}x"
                           for a in list(models)[1:]) + " |"]
    if "train_images_per_s_gpu" in head:
        lines.append(f"| training (images/s, {m['gpu']}, AMP) | "
                     + " | ".join(f"{models[a]['train_images_per_s_gpu']:.0f}" for a in models) + " | |")
    # The floor: FLOPs over the CPU ceiling. Backward costs about twice the forward.
    floor_forward = head["gflops"] / results["cpu_gflops"] * 1000
    predict = head["cpu"]["predict (network only)"]["median"]
    cam = head["cpu"]["predict+gradcam"]["median"]
    sizes = ", ".join(f"{a} {models[a]['input_size']} px" for a in models)
    lines += ["", f"Inputs: {sizes}; the compared networks read the whole image, as they usually do, with no "
              f"lung crop before them. Every model's rows from a decoded image include the not-a-chest-X-ray "
              f"check (the lung U-Net on the image and its inverse); a lung-reading model's also include its crop."]
    for arch in list(models)[1:]:
        theirs = models[arch]["cpu"]["predict+gradcam"]["median"]
        lines.append(f"Predict + Grad-CAM, {shipped} (segmentation included) against {arch} with pytorch-grad-cam: "
                     f"{cam:.1f} against {theirs:.1f} ms, {cam / theirs:.2f} of its time.")
    lines += ["", f"Floor for {shipped}: {head['gflops']:.2f} GFLOPs per forward pass / "
              f"{results['cpu_gflops']:.0f} GFLOP/s = {floor_forward:.1f} ms. The network alone takes {predict:.1f} ms "
              f"({predict / floor_forward:.1f}x the floor). Batched inference "
              f"reaches {head['cpu']['batch_images_per_s']:.0f} images/s, {1000 / head['cpu']['batch_images_per_s']:.1f} ms "
              f"per image ({1000 / head['cpu']['batch_images_per_s'] / floor_forward:.1f}x the floor)."]
    if "app_round_trip" in results:
        trip = results["app_round_trip"]
        lines += ["", f"App round trip through `gradio_client` (upload, predict, Grad-CAM, overlay back; "
                  f"{trip['runs']} requests after warm-up): median {trip['median']:.0f} ms, p95 {trip['p95']:.0f} ms. "
                  f"Peak resident memory of the app process: {trip['peak_rss_mb']:.0f} MiB."]
        server = trip.get("server") or {}
        if server.get("total"):
            lines += ["", "Inside the server (Gradio's profiler, medians): "
                      + ", ".join(f"{label} {server[key]:.0f} ms" for key, label in (
                          ("upload", "upload"), ("queue_wait", "queue wait"), ("preprocess", "preprocess"),
                          ("fn_call", "the handler (decode, predict, Grad-CAM, lung mask, overlay)"),
                          ("postprocess", "postprocess (JPEG encoding into the cache)"), ("total", "total"))
                          if key in server)
                      + f". The other {trip['median'] - server['total'] - server.get('upload', 0):.0f} ms of the "
                      "median round trip are the client's side: its requests, the event stream it polls "
                      "every 50 ms, and downloading the two images."]
    view = results.get("compare_view")
    if view:
        growth = view["rss_after_mb"] / view["rss_before_mb"] - 1
        lines += ["", f"Compare view ({', '.join(view['models'])}: each model's verdict and Grad-CAM for one image, "
                  f"cold cache, the handler in one process): median {view['median']:.0f} ms, p95 {view['p95']:.0f} ms. "
                  f"Memory over {view['memory_requests']} more compare requests: {view['rss_before_mb']:.0f} -> "
                  f"{view['rss_after_mb']:.0f} MiB ({growth:+.1%})."]
    if results.get("file_test"):
        lines += ["", "File test (the page's 'Compress, shrink and blur it' and `/quality`: one model's verdict for the "
                  "X-ray as it is, compressed, smaller and blurred; the handler in one process; bar 1 s): "
                  + ", ".join(f"{name} median {t['median']:.0f} ms (p95 {t['p95']:.0f})"
                              for name, t in results["file_test"].items()) + "."]
    if "browser" in results:
        seen = results["browser"]
        server = seen.get("server") or {}
        lines += ["", f"In Chromium (1280x800, a new page each time, {seen['runs']} runs, medians): a 1-megapixel PNG "
                  f"X-ray from upload to its Grad-CAM drawn: **{seen['total']['median']:.0f} ms** "
                  f"(p95 {seen['total']['p95']:.0f}); the upload request {seen['upload']['median']:.0f} ms, "
                  + ", ".join(f"{label} {server[key]:.0f} ms" for key, label in (
                      ("queue_wait", "queue wait"), ("preprocess", "preprocess"),
                      ("fn_call", "the handler (decode, model, Grad-CAM, lung mask, overlay)"),
                      ("postprocess", "postprocess (JPEG encoding)")) if key in server)
                  + f" (the server's phases of the upload), the result images' download "
                  f"{seen['images']['median']:.0f} ms. An example click in the compare view to every model's map "
                  f"drawn: **{seen['compare']['median']:.0f} ms** (p95 {seen['compare']['p95']:.0f})."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="few repeats, small batches, no app, Grad-CAM only")
    parser.add_argument("--compare", nargs="*", default=list(COMPARED), help="architectures run beside the shipped one")
    parser.add_argument("--no-app", action="store_true", help="skip the app round trip and the browser")
    parser.add_argument("--no-browser", action="store_true", help="skip the browser timings (Chromium)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="benchmark this classifier instead of the shipped one (the app round trip always "
                             "serves the shipped one)")
    parser.add_argument("--data", type=Path, default=None,
                        help="data folder for the sample X-rays (default: $COVIDXR_DATA, else ../shared/data/cxr)")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also update this file's generated section (e.g. BENCHMARKS.md)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    methods, batch_size = sorted(METHODS), 32
    if args.quick:
        args.repeats, args.train_steps, args.no_app, methods, batch_size = 3, 1, True, ["gradcam"], 4
    results = run(args.repeats, args.train_steps, not args.no_app, methods, args.compare, batch_size, args.data,
                  args.checkpoint, browser=not args.no_browser)
    section = markdown(results)
    print(section)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if args.markdown:
        write_markdown(section, args.markdown, "bench")
    return results


if __name__ == "__main__":
    main()
