"""The covidxr web app: upload a chest X-ray, get the label, probabilities and a heatmap.

    python app.py                      # http://127.0.0.1:7860
    python app.py --port 8080 --checkpoint runs/x/model.safetensors
"""

import argparse
from pathlib import Path

from covidxr.serve import launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--checkpoint", default=None, help="safetensors checkpoint (default: the shipped model)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--examples-dir", type=Path, default=None, help="folder of examples (default: examples/)")
    args = parser.parse_args()
    launch(args.checkpoint, args.host, args.port, args.share, args.examples_dir)


if __name__ == "__main__":
    main()
