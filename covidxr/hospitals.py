"""Hospitals in no training source: how often does a model call their people COVID?

In the training data source and label are confounded: nearly every adult COVID film comes from
journal figures and a few hospitals, nearly every adult normal from NIH. A model that learned
"not NIH-looking = COVID" scores well on a test split of the same sources and calls the normal
adults of a new hospital COVID. The sets under `external/` (beside the data folder; its README)
hold adults from two hospitals none of the training sources comes from: Shenzhen and
Montgomery, normals and tuberculosis. None of them has COVID, so every COVID call there is a
false alarm.

`covidxr train --external shenzhen` trains on one of them (normals as normal, tuberculosis as
not-COVID pneumonia) and judges the other at the end (leave one hospital out); `covidxr
hospitals --checkpoint C` judges any checkpoint on every hospital it did not train on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import checkpoint_path
from .data import data_dir, read_manifest

# A hospital set's labels as training classes: what is not COVID stays not COVID.
# Tuberculosis is an infection of the lungs, not COVID: the nearest class is `pneumonia`
# ("other pneumonia", not COVID).
HOSPITAL_LABELS = {"normal": "normal", "other": "pneumonia"}


def hospitals_dir(explicit: str | Path | None = None, data: str | Path | None = None) -> Path:
    """--external-dir, else `external` beside the data folder (../shared/data/external)."""
    return Path(explicit) if explicit else data_dir(data).parent / "external"


def available(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "manifest.csv").is_file()) if root.is_dir() else []


def read_hospital(root: Path, name: str, classes: list[str]) -> pd.DataFrame:
    """One hospital's manifest, with `target` set from HOSPITAL_LABELS (only to classes in use)."""
    path = root / name / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no hospital set {name!r}: {path} does not exist (have: {available(root)})")
    frame = read_manifest(path)
    frame["target"] = frame["label"].map(HOSPITAL_LABELS).where(lambda t: t.isin(classes), "").fillna("")
    return frame


def judge(predictor, frame: pd.DataFrame, cache_dir: str | Path | None = ".cache") -> dict:
    """The share of each label called COVID under the predictor's own decision rule (and at
    argmax, for comparison), and the COVID probabilities' median."""
    images = predictor.frame_files(list(frame["path"]), cache_dir, f"framing {frame['source_dataset'].iloc[0]}")
    probabilities = predictor.probabilities(images)
    covid = predictor.classes.index("covid")
    decided = predictor.decide(probabilities) == covid
    argmax = probabilities.argmax(1) == covid
    result = {"n": int(len(frame)), "called_covid": float(decided.mean()),
              "called_covid_argmax": float(argmax.mean()),
              "median_p_covid": float(np.median(probabilities[:, covid])), "by_label": {}}
    for label, rows in frame.groupby("label"):
        index = rows.index.to_numpy()
        result["by_label"][label] = {"n": int(len(index)), "called_covid": float(decided[index].mean()),
                                     "called_covid_argmax": float(argmax[index].mean())}
    return result


def judge_all(predictor, root: Path, skip: list[str] = (), cache_dir: str | Path | None = ".cache") -> dict:
    """`judge` on every hospital set under `root` except `skip` (those trained on)."""
    return {name: judge(predictor, read_hospital(root, name, predictor.classes).reset_index(drop=True), cache_dir)
            for name in available(root) if name not in skip}


def table(results: dict, trained: list[str] = ()) -> str:
    """The results as a markdown table; with none, a line that says why (an empty table reads as
    "nothing called COVID")."""
    if not results and trained:
        return (f"no hospital left to judge: the checkpoint was trained on {', '.join(trained)} "
                "(--include-trained judges them anyway, their training patients included)")
    if not results:
        return "no hospital sets found (--external-dir, or 'external' beside the data folder)"
    lines = ["| hospital | images | called COVID | normals called COVID | TB called COVID | at argmax |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        by = r["by_label"]
        lines.append(f"| {name} | {r['n']} | {r['called_covid']:.1%} | "
                     f"{by.get('normal', {}).get('called_covid', float('nan')):.1%} | "
                     f"{by.get('other', {}).get('called_covid', float('nan')):.1%} | {r['called_covid_argmax']:.1%} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="How often a checkpoint calls adults of hospitals it never saw "
                                                 "COVID (none of them has COVID).")
    parser.add_argument("--checkpoint", type=checkpoint_path, metavar="FILE_OR_NAME", default=None,
                        help="classifier checkpoint (default: the shipped one)")
    parser.add_argument("--data", default=None, help="data folder; the hospitals are in 'external' beside it")
    parser.add_argument("--external-dir", default=None, help="folder of hospital sets (default: see --data)")
    parser.add_argument("--include-trained", action="store_true",
                        help="also judge hospitals the checkpoint was trained on (their test patients are mixed in)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--cache-dir", default=".cache")
    return parser


def main(argv: list[str] | None = None) -> dict:
    from .predictor import Predictor

    args = build_parser().parse_args(argv)
    predictor = Predictor.load(args.checkpoint)
    trained = [] if args.include_trained else predictor.config.get("data", {}).get("external", [])
    results = judge_all(predictor, hospitals_dir(args.external_dir, args.data), trained, args.cache_dir)
    print(table(results, trained))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
