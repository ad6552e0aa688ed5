"""What the benchmark and the load test share: the app in its own process, the machine they ran
on, real X-rays to send, and the generated sections of BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """CPU model, cores, torch and its threads, GPU: printed beside every figure."""
    name = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


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
                 start_timeout: float = 180, environment: dict[str, str] | None = None,
                 extra_args: list[str] | None = None):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        command = [sys.executable, "app.py", "--port", str(self.port)]
        if examples_dir:
            command += ["--examples-dir", str(examples_dir)]
        if checkpoint:
            command += ["--checkpoint", str(checkpoint)]
        command += extra_args or []
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


def default_images(data_dir: Path, count: int = 16) -> list[Path]:
    """Real X-rays from the data folder, a few per source (decoding costs differ by source)."""
    import pandas as pd

    manifest = pd.read_csv(data_dir / "manifest.csv", dtype=str, keep_default_na=False)
    rows = manifest.groupby("source_dataset").head(max(1, count // manifest["source_dataset"].nunique() + 1))
    return [data_dir / name for name in rows["filename"]][:count]


def write_markdown(section: str, path: Path, marker: str) -> None:
    """Replace one generated part of BENCHMARKS.md (between <!-- marker:start --> and
    <!-- marker:end -->), keeping the hand-written text around it."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1] if end in rest else ""
    path.write_text(f"{before}{start}\n{section}\n{end}{after}")
