"""The web app's command line (`covidxr serve`, `python app.py`) and `launch`: the models loaded
and checked, the page built (layout.py), the server started with its middleware.

For a server others can reach: uploads and results live in the app's own temp folder and are
deleted an hour after they were made (and all of them when the app stops), usage analytics are
off, `--auth` / `--auth-file` ask for a login (logins.py: throttled, expiring), each address may
have only a few analyses waiting or running (jobs.py), request bodies are bounded, an unknown
API name gets 404, responses carry nosniff and frame headers (middleware.py), and `--public-url`
builds result URLs from the public address instead of the request's Host header.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import gradio as gr
from gradio import utils as gradio_utils
from starlette.middleware import Middleware

from ..checkpoint import CheckpointError, checkpoint_path
from ..predictor import ModelShelf
from . import layout, words
from .logins import LoginGuard, read_logins
from .middleware import MAX_BODY_BYTES, BoundedBodies, KnownEndpoints, SecurityHeaders
from .state import XrayApp

# Uploads above this are refused by the server before they reach the model.
MAX_FILE_SIZE = "40mb"
API_NAMES = {"predict", "occlusion", "deletion_curve", "quality"}
M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h
log = logging.getLogger("covidxr.serve")


def launch(checkpoint: str | None = None, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           examples_dir: Path | None = None, block: bool = True, auth: list[tuple[str, str]] | None = None,
           public_url: str | None = None, trusted_proxies: list[str] | None = None):
    limit_malloc_arenas()
    private_temp_dir()
    # uvicorn replaces the connection's address with X-Forwarded-For's only for these proxies
    # (its default trusts 127.0.0.1, so any local client could claim any address).
    os.environ["FORWARDED_ALLOW_IPS"] = ",".join(trusted_proxies or [])
    models = ModelShelf.of(checkpoint)
    models.load_all()  # fail closed: a missing or damaged model file stops the app here, named
    app = XrayApp(examples_dir=examples_dir, models=models)
    demo = layout.build(app)
    upload_bytes = gradio_utils._parse_file_size(MAX_FILE_SIZE) + MAX_BODY_BYTES  # a file and its form
    # Outermost first: every answer carries the security headers, refusals included; an oversized
    # body is refused before anything reads it; expired logins are dropped before anything reads them.
    middleware = [Middleware(SecurityHeaders), Middleware(BoundedBodies, upload_bytes=upload_bytes)]
    middleware += [Middleware(LoginGuard().middleware)] if auth else []
    middleware += [Middleware(KnownEndpoints, api_names=API_NAMES)]
    # quiet: Gradio's own banner tells users to "set `share=True` in `launch()`"; ours names the flag.
    demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
                prevent_thread_lock=True, quiet=True, theme=gr.themes.Soft(), css=words.CSS, js=words.OPEN_CARD_JS,
                footer_links=["api"], auth=auth or None, root_path=public_url, app_kwargs={"middleware": middleware})
    print(f"covidxr app running on {public_url or demo.local_url}", flush=True)
    if not share:  # with --share, Gradio prints the public link itself, or why it could not make one
        print("For a public link, restart with --share (with --auth: README, 'Exposing the app safely'). "
              "Ctrl-C stops the app.", flush=True)
    if block:
        demo.block_thread()
    return demo


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
    except OSError as error:
        parser.error(f"cannot read the login file: {error}")
    except ValueError as error:  # read_logins names the file and line of a malformed login
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
    try:
        launch(args.checkpoint, args.host, args.port, args.share, args.examples_dir, auth=auth,
               public_url=args.public_url, trusted_proxies=args.trusted_proxy)
    except CheckpointError as error:
        raise SystemExit(f"covidxr serve: {error}") from None


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
