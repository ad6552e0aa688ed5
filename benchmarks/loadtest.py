"""Load test: launch the app as a user would, hit it with concurrent gradio_client clients.

    covidxr loadtest --clients 16 --requests 208 --markdown BENCHMARKS.md

Reports latency per request (median, p95, max, as each client sees it: upload, queue, predict,
Grad-CAM, overlay download), errors (there should be none), throughput, and the server's
resident memory before, during and after, to show it does not keep growing, and after 300
fresh sessions (a new client, so a new session, for each analysis). Each client thread comes
from its own address (X-Forwarded-For, with the app trusting 127.0.0.1 as its proxy), as users
of a public server would: the app caps jobs per address.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from covidxr.data import data_dir

from .common import AppProcess, default_images, machine, shared_ssl_context, write_markdown


FRESH_SESSIONS = 300


def run_load(url: str, images: list[Path], clients: int, requests: int, method: str = "gradcam",
             sample_memory=None, progress: bool = True, fresh_sessions: bool = False) -> dict:
    """`requests` calls to /predict spread over `clients` threads, each with its own Client and
    address; with `fresh_sessions`, a new Client (a new session) for every call."""
    from gradio_client import Client, handle_file

    latencies, errors, memory = [], [], []
    lock = threading.Lock()
    next_request = iter(range(requests))
    bar = tqdm(total=requests, desc=f"{clients} clients", unit="req", disable=not progress)

    def client_loop(number: int):
        def new_client():
            return Client(url, verbose=False, ssl_verify=shared_ssl_context(),
                          headers={"X-Forwarded-For": f"10.1.{number // 250}.{number % 250 + 1}"})
        client = new_client()
        while True:
            with lock:
                index = next(next_request, None)
            if index is None:
                return
            started = time.perf_counter()
            try:
                if fresh_sessions:
                    client = new_client()
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
    threads = [threading.Thread(target=client_loop, args=(number,)) for number in range(clients)]
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
    with AppProcess(examples_dir, extra_args=["--trusted-proxy", "127.0.0.1"]) as app:
        rss_started = app.rss_mb()
        warm = run_load(app.url, images, 1, 3, method, progress=False)
        rss_before = app.rss_mb()
        result = run_load(app.url, images, clients, requests, method, app.rss_mb, progress)
        rss_after = app.rss_mb()
        # A second, equal round: memory that keeps growing would show up here again.
        second = run_load(app.url, images, clients, requests, method, app.rss_mb, progress)
        rss_after_second = app.rss_mb()
        sessions = run_load(app.url, images, 4, FRESH_SESSIONS, method, progress=progress, fresh_sessions=True)
        rss_after_sessions = app.rss_mb()
        alive = run_load(app.url, images, 1, 1, method, progress=False)
    result["second_round"] = {key: second[key] for key in ("ok", "errors", "latency_ms", "throughput_per_s")}
    result["errors"] += second["errors"] + warm["errors"] + sessions["errors"]
    result["memory_mb"] = {"started": rss_started, "after_warmup": rss_before, "after_round_1": rss_after,
                           "after_round_2": rss_after_second,
                           "growth_round_2": rss_after_second - rss_after,
                           f"after_{FRESH_SESSIONS}_fresh_sessions": rss_after_sessions,
                           "growth_fresh_sessions": rss_after_sessions - rss_after_second}
    result["answers_afterwards"] = alive["ok"] == 1
    result["cpu"] = {"cores": os.cpu_count(), "machine": machine()["cpu"]}
    return result


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
        f"round 2 changed it by {memory['growth_round_2']:+.0f} MiB"
        + (f"; {FRESH_SESSIONS} fresh sessions (a new client for each analysis) then changed it by "
           f"{memory['growth_fresh_sessions']:+.0f} MiB" if "growth_fresh_sessions" in memory else "")
        + f". Still answering afterwards: {'yes' if result['answers_afterwards'] else 'NO'}.",
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=208, help="per round (two rounds are run)")
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--data", type=Path, default=None,
                        help="data folder for the X-rays sent (default: $COVIDXR_DATA, else ../shared/data/cxr)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also update this file's loadtest section (e.g. BENCHMARKS.md)")
    args = parser.parse_args(argv)
    result = load_test(default_images(data_dir(args.data)), args.clients, args.requests, args.method)
    print(markdown(result))
    if args.markdown:
        write_markdown(markdown(result), args.markdown, "loadtest")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
