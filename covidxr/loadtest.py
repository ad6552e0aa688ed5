"""Load test: launch the app as a user would, hit it with concurrent gradio_client clients.

    python -m covidxr.loadtest --clients 16 --requests 208 --markdown BENCHMARKS.md

Reports latency per request (median, p95, max, as each client sees it: upload, queue, predict,
Grad-CAM, overlay download), errors (there should be none), throughput, and the server's
resident memory before, during and after, to show it does not keep growing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
from tqdm.auto import tqdm

from .data import DATA_DIR

REPO = Path(__file__).resolve().parents[1]


def shared_ssl_context() -> ssl.SSLContext:
    """One TLS context for every request a gradio_client makes. The client opens a new httpx
    connection per request (upload, join, event stream, each download), and each one would
    otherwise build its own context from the CA bundle: 70-80 ms here, five times a call
    (the fix suggested in ogx-ai/ogx#4221; see gradio-app/gradio#7890). Certificates are
    still verified. Pass it as `Client(url, ssl_verify=shared_ssl_context())`."""
    return ssl.create_default_context()


class AppProcess:
    """`python app.py` in its own process on a free local port; a context manager."""

    def __init__(self, examples_dir: Path | None = None, log: Path | None = None, checkpoint: str | None = None,
                 start_timeout: float = 180, environment: dict[str, str] | None = None):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        command = [sys.executable, "app.py", "--port", str(self.port)]
        if examples_dir:
            command += ["--examples-dir", str(examples_dir)]
        if checkpoint:
            command += ["--checkpoint", str(checkpoint)]
        # Output to a file: an unread pipe fills up and blocks the server.
        self.log = Path(log) if log else Path(os.devnull)
        self._log_handle = open(self.log, "w")
        self.process = subprocess.Popen(
            command, cwd=REPO, stdout=self._log_handle, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False", **(environment or {})})
        self._wait_until_up(start_timeout)

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app exited early (log: {self.log})")
            try:
                with urllib.request.urlopen(self.url, timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.close()
        raise RuntimeError(f"app did not answer within {timeout:.0f} s")

    def rss_mb(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log_handle.close()

    def __enter__(self) -> "AppProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_load(url: str, images: list[Path], clients: int, requests: int, method: str = "gradcam",
             sample_memory=None, progress: bool = True) -> dict:
    """`requests` calls to /predict spread over `clients` threads, each with its own Client."""
    from gradio_client import Client, handle_file

    latencies, errors, memory = [], [], []
    lock = threading.Lock()
    next_request = iter(range(requests))
    bar = tqdm(total=requests, desc=f"{clients} clients", unit="req", disable=not progress)

    def client_loop():
        client = Client(url, verbose=False, ssl_verify=shared_ssl_context())
        while True:
            with lock:
                index = next(next_request, None)
            if index is None:
                return
            started = time.perf_counter()
            try:
                client.predict(handle_file(str(images[index % len(images)])), method, "predicted class", 0.4,
                               api_name="/predict")
                with lock:
                    latencies.append(time.perf_counter() - started)
            except Exception as error:  # noqa: BLE001 - every failure counts, whatever its type
                with lock:
                    errors.append(f"{type(error).__name__}: {error}")
            with lock:
                bar.update()
                if sample_memory and index % max(1, requests // 20) == 0:
                    memory.append((index, sample_memory()))

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    bar.close()
    latency = np.array(latencies) * 1000
    return {"clients": clients, "requests": requests, "method": method, "ok": len(latencies),
            "errors": len(errors), "error_messages": sorted(set(errors))[:5],
            "latency_ms": {"p50": float(np.percentile(latency, 50)), "p95": float(np.percentile(latency, 95)),
                           "max": float(latency.max())} if len(latency) else {},
            "throughput_per_s": len(latencies) / wall, "wall_s": wall, "memory_samples_mb": memory}


def load_test(images: list[Path], clients: int, requests: int, method: str = "gradcam",
              examples_dir: Path | None = None, progress: bool = True) -> dict:
    """Launch the app, warm it up, measure memory, run the load, measure memory again."""
    with AppProcess(examples_dir) as app:
        rss_started = app.rss_mb()
        warm = run_load(app.url, images, 1, 3, method, progress=False)
        rss_before = app.rss_mb()
        result = run_load(app.url, images, clients, requests, method, app.rss_mb, progress)
        rss_after = app.rss_mb()
        # A second, equal round: memory that keeps growing would show up here again.
        second = run_load(app.url, images, clients, requests, method, app.rss_mb, progress)
        rss_after_second = app.rss_mb()
        alive = run_load(app.url, images, 1, 1, method, progress=False)
    result["second_round"] = {key: second[key] for key in ("ok", "errors", "latency_ms", "throughput_per_s")}
    result["errors"] += second["errors"] + warm["errors"]
    result["memory_mb"] = {"started": rss_started, "after_warmup": rss_before, "after_round_1": rss_after,
                           "after_round_2": rss_after_second,
                           "growth_round_2": rss_after_second - rss_after}
    result["answers_afterwards"] = alive["ok"] == 1
    result["cpu"] = {"cores": os.cpu_count(), "machine": _machine()}
    return result


def _machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def default_images(data_dir: Path, count: int = 16) -> list[Path]:
    """Real X-rays from the shared data, a few per source (decoding costs differ by source)."""
    import pandas as pd

    manifest = pd.read_csv(data_dir / "manifest.csv", dtype=str, keep_default_na=False)
    rows = manifest.groupby("source_dataset").head(max(1, count // manifest["source_dataset"].nunique() + 1))
    return [data_dir / name for name in rows["filename"]][:count]


def markdown(result: dict) -> str:
    latency, memory = result["latency_ms"], result["memory_mb"]
    return "\n".join([
        f"{result['clients']} concurrent gradio_client clients, {result['requests']} requests per round, "
        f"two rounds, `{result['method']}` ({result['cpu']['cores']} cores, {result['cpu']['machine']}; the clients "
        "run on the same cores as the server). The app serves one request at a time, so a client's latency is "
        "mostly its wait in the queue: about clients / throughput.",
        "",
        "| measure | round 1 | round 2 |",
        "|---|---|---|",
        f"| requests ok / errors | {result['ok']} / {result['errors']} (both rounds) | "
        f"{result['second_round']['ok']} / {result['second_round']['errors']} |",
        f"| latency p50 (ms) | {latency['p50']:.0f} | {result['second_round']['latency_ms']['p50']:.0f} |",
        f"| latency p95 (ms) | {latency['p95']:.0f} | {result['second_round']['latency_ms']['p95']:.0f} |",
        f"| throughput (requests/s) | {result['throughput_per_s']:.2f} | "
        f"{result['second_round']['throughput_per_s']:.2f} |",
        f"| server RSS after the round (MiB) | {memory['after_round_1']:.0f} | {memory['after_round_2']:.0f} |",
        "",
        f"Server memory: {memory['started']:.0f} MiB at start, {memory['after_warmup']:.0f} MiB after warm-up; "
        f"round 2 changed it by {memory['growth_round_2']:+.0f} MiB. Still answering afterwards: "
        f"{'yes' if result['answers_afterwards'] else 'NO'}.",
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m covidxr.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=208, help="per round (two rounds are run)")
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="update this file's loadtest section (e.g. BENCHMARKS.md)")
    args = parser.parse_args(argv)
    result = load_test(default_images(args.data), args.clients, args.requests, args.method)
    print(markdown(result))
    if args.markdown:
        from .bench import write_markdown

        write_markdown(markdown(result), args.markdown, "loadtest")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
