"""Shortcut audit: does the model look at the lungs? Measured on many images, not one.

    covidxr audit --out runs/audit      # the shipped model, on the patients of its test split

For every image the model has not been trained or tuned on: the Grad-CAM heatmap, and the share
of its mass on the lungs (lung focus, from the lung model in segment.py), on the image border and
on the top strip where text markers sit. Tables per class, per correct/incorrect, per source and
per age group (audit.md, audit.json), a plot (lung_focus.png), per-image numbers (audit.csv), and
the 12 images with the lowest lung focus as a contact sheet (lowest_focus.png: it shows data
images, so it stays in the run folder and out of git).

Occlusion check (`--occlusion`): a heatmap shows where the evidence lies, not what the decision
rests on. For every image, the COVID probability as it is, with the dilated lungs blanked
(only the outside left), and with everything but the dilated lungs blanked (only the lungs
left), each blank filled with the image's median; then COVID-vs-rest AUROC for each, on all
images and on adults. A model that decides from the lungs loses most of its ranking when they
are blanked. Blanking is itself unusual input, so "only the lungs left" understates what the
lungs hold; "only the outside left" scoring well above 0.5 is the finding: the model ranks COVID
from what lies outside the lungs. For whole-image checkpoints (a lung-reading one never sees
the outside beyond its crop margin).

Sanity check (Adebayo et al., NeurIPS 2018): a map that depends on what the model learned must
change when the weights are randomised. The audit recomputes the heatmaps with a randomly
initialised network of the same architecture and reports their Spearman rank correlation with
the trained model's maps; near 0 means the maps depend on the weights, near 1 that they would
look the same whatever the model had learned (an edge detector, not an explanation).

The app's lungs-outside notice fires when a map's lung focus is no better than chance: no more
than a map spread evenly over what the network read would put on the lungs (report.py).
`--store-notice` measures how often it fires on the checkpoint's validation X-rays (the split's
val rows; the test rows stay unseen), and how often the former rule (the 10th percentile of lung
focus on the correctly classified ones) would, and stores both in the checkpoint's description
("lung_focus_notice"). It writes only into a checkpoint named on the command line:

    covidxr audit --checkpoint runs/x/model.safetensors --store-notice
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from .checkpoint import checkpoint_path, update_config
from .data import data_dir, load_grayscale, parse_filters, read_manifest, select
from .evaluate import add_split_options, rows_to_score, split_file_for
from .explain import SCORING_SIDE
from .framing import uses_lungs
from .model import build_model
from .occlusion import OCCLUSIONS, occluded_views
from .predictor import SHIPPED_CHECKPOINT, Predictor
from .report import notice_fires

# The former notice rule, reported beside the chance rule: lung focus under this percentile of
# the correctly classified X-rays' lung focus.
NOTICE_PERCENTILE = 10.0
GROUPS = {"class (true label)": "label", "correct": "correct", "source": "source_dataset", "age group": "age_group"}


def audit_frame(predictor: Predictor, frame: pd.DataFrame, method: str = "gradcam", progress: bool = True) -> pd.DataFrame:
    """One row per image: prediction, correctness, lung focus, border and top-strip shares."""
    if predictor.segmenter is None:
        raise FileNotFoundError("the audit needs a lung segmentation model (covidxr segment)")
    rows = []
    for row in tqdm(frame.itertuples(), total=len(frame), desc="auditing", unit="img", disable=not progress):
        explanation = predictor.explain(row.path, method=method, max_side=SCORING_SIDE)  # scored at one size anyway
        label = explanation.prediction.decided  # the rule's class, refused or not
        rows.append({"filename": row.filename, "label": row.label, "target": row.target, "predicted": label,
                     "correct": ("yes" if label == row.target else "no") if row.target else "no class",
                     "source_dataset": row.source_dataset, "age_group": row.age_group,
                     "lung_focus": explanation.lung_focus, "border_share": explanation.border_share,
                     "top_share": explanation.top_share, "chance_focus": explanation.chance_focus,
                     "lung_area": float(explanation.lung_mask.mean())})
    return pd.DataFrame(rows)


def notice_rule(table: pd.DataFrame, method: str, percentile: float = NOTICE_PERCENTILE) -> dict:
    """The lungs-outside notice's rule (report.notice_fires: lung focus at or under chance) with
    how often it fires on an audit table's (`audit_frame`) correctly classified X-rays and on all
    of them; and the same for the former rule, a threshold at the `percentile`th percentile of
    lung focus over the correctly classified X-rays, for comparison."""
    correct = table[table["correct"] == "yes"]
    if correct.empty:
        raise ValueError("no correctly classified X-rays to measure the lungs-outside notice on")

    def fires(rows: pd.DataFrame) -> pd.Series:
        return pd.Series([notice_fires(f, c) for f, c in zip(rows["lung_focus"], rows["chance_focus"])],
                         index=rows.index, dtype=bool)

    threshold = float(np.percentile(correct["lung_focus"], percentile))
    return {"rule": "chance", "method": method, "target": "predicted class", "images": int(len(correct)),
            "fires_on_correct": float(fires(correct).mean()), "fires_on_all": float(fires(table).mean()),
            "all_images": int(len(table)),
            "former_percentile_rule": {"percentile": percentile, "threshold": threshold,
                                       "fires_on_correct": float((correct["lung_focus"] < threshold).mean()),
                                       "fires_on_all": float((table["lung_focus"] < threshold).mean())}}


def hand_drawn_focus(predictor: Predictor, frame: pd.DataFrame, method: str = "gradcam", target: str = "covid",
                     progress: bool = True) -> pd.DataFrame:
    """Lung focus against the hand-drawn lung masks (manifest column `lung_mask`), not against
    our own segmenter: one row per image that has a mask, with the chance level (the share of
    the image the lungs cover: what a map spread evenly would score)."""
    rows = []
    with_masks = frame[frame.get("lung_mask_path", pd.Series("", index=frame.index)).fillna("") != ""]
    for row in tqdm(with_masks.itertuples(), total=len(with_masks), desc="lung focus (hand-drawn masks)",
                    unit="img", disable=not progress):
        explanation = predictor.explain(row.path, method=method, target=target, max_side=SCORING_SIDE)
        mask = np.asarray(Image.open(row.lung_mask_path).convert("L")) > 127
        image_shape = explanation.full_image.shape
        if mask.shape != image_shape:
            raise ValueError(f"{row.filename}: lung mask {mask.shape} and image {image_shape} differ in size")
        # Scored as the app scores lung focus (explain.SCORING_SIDE), against the hand-drawn mask.
        scored = cv2.resize(mask.astype(np.uint8), explanation.scoring_shape[::-1], interpolation=cv2.INTER_NEAREST)
        rows.append({"filename": row.filename, "source_dataset": row.source_dataset,
                     "lung_focus": explanation.focus_on(mask), "chance": float(scored.mean())})
    return pd.DataFrame(rows, columns=["filename", "source_dataset", "lung_focus", "chance"])


def occlusion_frame(predictor: Predictor, frame: pd.DataFrame, positive: str = "covid",
                    progress: bool = True) -> pd.DataFrame:
    """One row per image: its `positive` probability under each of `OCCLUSIONS`."""
    if uses_lungs(predictor.framing_recipe):
        raise ValueError("the occlusion check is for whole-image checkpoints: this one reads only the lungs' box")
    rows = []
    for row in tqdm(frame.itertuples(), total=len(frame), desc="occlusion check", unit="img", disable=not progress):
        gray = load_grayscale(row.path)
        views = occluded_views(gray, predictor.segment_lungs(gray))
        rows.append({"filename": row.filename, "target": row.target, "age_group": row.age_group,
                     "source_dataset": row.source_dataset}
                    | {name: predictor.predict(view).probabilities[positive] for name, view in views.items()})
    return pd.DataFrame(rows)


def occlusion_summary(table: pd.DataFrame, positive: str = "covid") -> pd.DataFrame:
    """COVID-vs-rest AUROC for each occlusion, on all images and on adults."""
    labelled = table[table["target"].fillna("") != ""]
    groups = {"all": labelled, "adults": labelled[labelled["age_group"] == "adult"]}
    summary = {}
    for name, group in groups.items():
        is_positive = group["target"] == positive
        if is_positive.nunique() < 2:
            continue
        summary[name] = {"images": len(group), "positives": int(is_positive.sum())} | {
            occlusion: float(roc_auc_score(is_positive, group[occlusion])) for occlusion in OCCLUSIONS}
    return pd.DataFrame(summary).T.astype({"images": int, "positives": int})


def summary_tables(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    tables = {}
    for title, column in GROUPS.items():
        grouped = table.groupby(column)
        tables[title] = pd.DataFrame({
            "images": grouped.size(),
            "lung focus, mean": grouped["lung_focus"].mean(),
            "lung focus, median": grouped["lung_focus"].median(),
            "focus < 0.5": grouped["lung_focus"].apply(lambda s: float((s < 0.5).mean())),
            "border share": grouped["border_share"].mean(),
            "top-strip share": grouped["top_share"].mean(),
            "lung area (chance)": grouped["lung_area"].mean(),
        })
    tables["all"] = pd.DataFrame({"images": [len(table)], "lung focus, mean": [table["lung_focus"].mean()],
                                  "lung focus, median": [table["lung_focus"].median()],
                                  "focus < 0.5": [float((table["lung_focus"] < 0.5).mean())],
                                  "border share": [table["border_share"].mean()],
                                  "top-strip share": [table["top_share"].mean()],
                                  "lung area (chance)": [table["lung_area"].mean()]}, index=["all"])
    return tables


def randomisation_check(predictor: Predictor, paths: list[str], method: str = "gradcam", seed: int = 0,
                        progress: bool = True) -> dict:
    """Spearman rank correlation between the trained model's heatmaps and a random model's."""
    torch.manual_seed(seed)
    random_model = build_model(predictor.config["arch"], len(predictor.classes))
    randomised = Predictor(random_model, predictor.config, predictor.device)
    randomised.lungs_checkpoint = False  # the maps only
    correlations = []
    for path in tqdm(paths, desc="randomised-weights check", unit="img", disable=not progress):
        trained = predictor.explain(path, method=method, target=predictor.classes[0]).heatmap
        random = randomised.explain(path, method=method, target=predictor.classes[0]).heatmap
        # On a coarse grid: the maps are 7x7 upsampled, so pixels are far from independent.
        with warnings.catch_warnings():  # a flat random map has no ranks: counted as 0
            warnings.simplefilter("ignore")
            rho = spearmanr(_coarse(trained), _coarse(random)).statistic
        correlations.append(0.0 if np.isnan(rho) else float(rho))
    return {"images": len(paths), "method": method, "explained_class": predictor.classes[0],
            "spearman_mean": float(np.mean(correlations)), "spearman_median": float(np.median(correlations)),
            "spearman_abs_mean": float(np.mean(np.abs(correlations)))}


def _coarse(heatmap: np.ndarray, size: int = 28) -> np.ndarray:
    return np.asarray(Image.fromarray(heatmap.astype(np.float32), mode="F").resize((size, size))).ravel()


def write_audit(table: pd.DataFrame, sanity: dict | None, predictor: Predictor, frame: pd.DataFrame,
                out_dir: str | Path, method: str, sheet: bool = True) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "audit.csv", index=False)
    tables = summary_tables(table)
    lines = ["# Shortcut audit", "",
             f"{len(table)} images the model was not trained or tuned on; `{method}` heatmaps. Lung focus: share of "
             "the heatmap's mass inside the predicted lung field; border: the outer 8% frame; top strip: the top 12%. "
             "Lung area: the share of the image the lungs cover, which is the lung focus a heatmap spread evenly "
             "over the image would get (chance level).",
             ""]
    for title, frame_ in tables.items():
        lines += [f"## By {title}" if title != "all" else "## All images", "", frame_.round(3).to_markdown(), ""]
    if sanity:
        lines += ["## Randomised-weights sanity check", "",
                  f"Spearman rank correlation between the trained model's and a randomly initialised model's "
                  f"`{sanity['method']}` maps (class `{sanity['explained_class']}`) on {sanity['images']} images: "
                  f"mean {sanity['spearman_mean']:.3f}, median {sanity['spearman_median']:.3f}, "
                  f"mean |rho| {sanity['spearman_abs_mean']:.3f}. Low values: the maps depend on the learned weights.", ""]
    (out / "audit.md").write_text("\n".join(lines))
    (out / "audit.json").write_text(json.dumps(
        {"tables": {title: frame_.reset_index().to_dict(orient="records") for title, frame_ in tables.items()},
         "sanity": sanity, "method": method}, indent=2, default=str))
    _plot(table, out / "lung_focus.png")
    if sheet:
        _lowest_sheet(predictor, table, frame, out / "lowest_focus.png", method)
    return out


def _plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["source_dataset", "age_group", "label", "correct"]
    figure, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 3.6), sharey=True)
    for axis, column in zip(axes, columns):
        groups = sorted(table[column].unique())
        axis.boxplot([table.loc[table[column] == g, "lung_focus"] for g in groups], showmeans=True)
        axis.set_xticks(range(1, len(groups) + 1), groups, rotation=30, fontsize=8)
        axis.set_title(f"by {column}")
        axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axes[0].set_ylabel("lung focus (share of heatmap on lungs)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _lowest_sheet(predictor: Predictor, table: pd.DataFrame, frame: pd.DataFrame, path: Path, method: str,
                  count: int = 12) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lowest = table.nsmallest(count, "lung_focus")
    paths = dict(zip(frame["filename"], frame["path"]))
    columns = 4
    rows = int(np.ceil(len(lowest) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.6 * rows))
    for axis in np.atleast_1d(axes).ravel():
        axis.axis("off")
    for axis, row in zip(np.atleast_1d(axes).ravel(), lowest.itertuples()):
        explanation = predictor.explain(paths[row.filename], method=method)
        axis.imshow(explanation.overlay)
        axis.set_title(f"{row.label} -> {row.predicted}, {row.source_dataset}\nlung focus {row.lung_focus:.2f}",
                       fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=checkpoint_path, metavar="FILE_OR_NAME", default=None,
                        help="classifier (default: the shipped model)")
    parser.add_argument("--lungs", default=None, help="lung checkpoint (default: the shipped one)")
    parser.add_argument("--data", default=None,
                        help="data folder with manifest.csv (default: $COVIDXR_DATA, else ../shared/data/cxr)")
    parser.add_argument("--manifest", default=None, help="another manifest (default: the data folder's)")
    add_split_options(parser)
    parser.add_argument("--filter", action="append", help="COLUMN=VALUE[,VALUE]")
    parser.add_argument("--limit", type=int, help="only the first N images (smoke runs)")
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--sanity-images", type=int, default=40, help="images for the randomised-weights check")
    parser.add_argument("--out", default="runs/audit")
    parser.add_argument("--split", default=None,
                        help="only the rows of this split of the split file (e.g. val, to choose between runs)")
    parser.add_argument("--hand-masks", action="store_true",
                        help="only measure the COVID map's lung focus against the hand-drawn masks")
    parser.add_argument("--store-focus", action="store_true",
                        help="with --hand-masks: store the result in the description of --checkpoint (its card "
                             "in the app shows it; required: the packaged weights are not rewritten by default)")
    parser.add_argument("--occlusion", action="store_true",
                        help="only the occlusion check: COVID AUROC with the lungs blanked and with all but them blanked")
    parser.add_argument("--store-notice", action="store_true",
                        help="only measure how often the app's lungs-outside notice fires on the X-rays of "
                             "--split (default: val, never test unless asked) of the split file, and store it in "
                             "the description of --checkpoint (required: the packaged weights are not rewritten "
                             "by default)")
    args = parser.parse_args(argv)
    if args.store_focus and not (args.hand_masks and args.checkpoint):
        parser.error("--store-focus stores what --hand-masks measures into the checkpoint named by --checkpoint")
    if args.store_notice:
        if not args.checkpoint:
            parser.error("--store-notice writes into a checkpoint: name it with --checkpoint "
                         "(the packaged weights are not rewritten by default)")
        args.split = args.split or "val"
        if args.split == "test":
            print("tuning the notice on the test split: the test rows are then no longer unseen by it", file=sys.stderr)

    checkpoint = args.checkpoint or SHIPPED_CHECKPOINT
    predictor = Predictor.load(checkpoint)
    predictor.lungs_checkpoint = args.lungs
    label_map = predictor.config.get("label_map") or {c: c for c in predictor.classes}
    manifest = args.manifest or data_dir(args.data) / "manifest.csv"
    frame = select(read_manifest(manifest), parse_filters(args.filter), label_map)
    if args.split:
        split_csv = args.split_csv or split_file_for(checkpoint)
        if split_csv is None:
            parser.error(f"--split {args.split}: {checkpoint} has no split file beside it; pass --split-csv")
        split = pd.read_csv(split_csv, dtype=str, keep_default_na=False)
        frame = frame[frame["filename"].isin(split.loc[split["split"] == args.split, "filename"])]
        frame = frame.reset_index(drop=True)
    else:
        frame, _ = rows_to_score(frame, checkpoint, args.split_csv, args.all_patients)
    if args.limit:
        frame = frame.head(args.limit)
    if args.hand_masks:
        focus = hand_drawn_focus(predictor, frame, args.method)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        focus.to_csv(out / "hand_drawn_focus.csv", index=False)
        summary = {"images": len(focus), "lung_focus_mean": float(focus["lung_focus"].mean()),
                   "chance_mean": float(focus["chance"].mean()),
                   "share_above_half": float((focus["lung_focus"] > 0.5).mean())}
        (out / "hand_drawn_focus.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
        if args.store_focus:
            update_config(checkpoint, {"lung_focus": {
                "mean": summary["lung_focus_mean"], "chance": summary["chance_mean"], "images": summary["images"],
                "method": args.method, "target": "covid", "split": args.split or "unseen rows of the split file",
                "masks": "hand-drawn (manifest column lung_mask)"}})
            print(f"stored in {checkpoint}")
        return {"hand_drawn": focus, "summary": summary, "out": out}
    if args.occlusion:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        occluded = occlusion_frame(predictor, frame)
        occluded.to_csv(out / "occlusion.csv", index=False)
        summary = occlusion_summary(occluded)
        (out / "occlusion.json").write_text(summary.to_json(orient="index", indent=2))
        print("COVID-vs-rest AUROC\n" + summary.to_markdown(floatfmt=".3f"))
        return {"occlusion": occluded, "summary": summary, "out": out}
    table = audit_frame(predictor, frame, args.method)
    if args.store_notice:
        rule = notice_rule(table, args.method) | {"split": args.split}
        update_config(checkpoint, {"lung_focus_notice": rule})
        print(json.dumps(rule, indent=2))
        print(f"stored in {checkpoint}")
        return {"notice": rule, "table": table}
    sample = frame.sample(min(args.sanity_images, len(frame)), random_state=0)["path"].tolist()
    sanity = randomisation_check(predictor, sample, args.method) if args.sanity_images else None
    out = write_audit(table, sanity, predictor, frame, args.out, args.method)
    print((out / "audit.md").read_text())
    return {"tables": summary_tables(table), "sanity": sanity, "out": out}


if __name__ == "__main__":
    main()
