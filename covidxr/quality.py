"""Quality audit: does a model's answer survive a JPEG, a smaller copy or a blur?

Nothing here changes what an X-ray shows: a chest film saved as a JPEG, sent as a smaller copy,
photographed slightly out of focus, exposed a little darker or lighter, or passed around as a
screenshot has the same lungs and the same disease. A model whose answer moves with these reads
the file, not the lungs. In the training data the file's quality predicts the label: every
adult normal is a lossless NIH PNG, most adult COVID films are JPEGs and some are small copies
(data/README.md), so a model can learn "degraded look means COVID".

    covidxr quality --out runs/quality                  # every bundled model, every variant
    covidxr quality --checkpoint lung-reader --sample 20   # a few minutes on 2 cores

Each variant (`VARIANTS`) is made from the decoded image and handed to `Predictor.predict` as an
image, as an upload would be. Measured over the checkpoint's test split (COVID, adult normals,
adult pneumonias: its split file) and each external hospital's people (no COVID):

- the share called COVID, as it is and under each variant;
- the share of decided labels that change;
- the median |change in p(covid)|.

`held(predictor, image)` is the same test on one image, for the app's button, `/quality` and
`covidxr predict --quality`: the verdict of the image as it is and of three variants
(`APP_VARIANTS`), and whether the label held.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from .checkpoint import BUNDLED, checkpoint_path, update_config
from .data import data_dir, load_image, read_manifest

# The blur is given at 512 px a side and scaled to the image's own size, so it blurs the same
# anatomy the same whatever the file's size (a 2,000-px film gets sigma 6 px).
BLUR_SIGMA_AT_512 = 1.5
NOISE_SIGMA = 0.02  # sensor noise: a share of the full range, at 512 px (finer on larger films)
AS_IS = "as it is"


def longer_side(gray: np.ndarray, side: int) -> np.ndarray:
    """A copy whose longer side is `side` pixels (area averaging down, bicubic up)."""
    height, width = gray.shape
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def jpeg(gray: np.ndarray, quality: int) -> np.ndarray:
    """Saved as an 8-bit JPEG at `quality` and read back."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(gray)).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("L"), np.float32) / 255


def blur(gray: np.ndarray, sigma_at_512: float = BLUR_SIGMA_AT_512) -> np.ndarray:
    sigma = sigma_at_512 * max(gray.shape) / 512
    return cv2.GaussianBlur(gray, (0, 0), sigmaX=sigma, sigmaY=sigma)


def gamma(gray: np.ndarray, value: float) -> np.ndarray:
    return np.clip(gray, 0, 1) ** value


def noise(gray: np.ndarray, seed: int = 0) -> np.ndarray:
    """Gaussian sensor noise, NOISE_SIGMA of the range at 512 px: grain of the same size on the
    anatomy whatever the file's size (drawn at 512 px, then scaled to the image)."""
    rng = np.random.default_rng(seed)
    height, width = gray.shape
    scale = 512 / max(height, width)
    grain = rng.normal(0, NOISE_SIGMA, (max(1, round(height * scale)), max(1, round(width * scale))))
    return np.clip(gray + cv2.resize(grain.astype(np.float32), (width, height), interpolation=cv2.INTER_NEAREST), 0, 1)


def screenshot(gray: np.ndarray) -> np.ndarray:
    """What a screenshot of a viewer makes of it: shown at a third of its size, scaled back up,
    saved as a JPEG."""
    height, width = gray.shape
    small = longer_side(gray, max(64, max(height, width) // 3))
    return jpeg(cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR), 80)


def to_uint8(gray: np.ndarray) -> np.ndarray:
    return (np.clip(gray, 0, 1) * 255).round().astype(np.uint8)


VARIANTS = {
    "longer side 128 px": lambda g: longer_side(g, 128),
    "longer side 256 px": lambda g: longer_side(g, 256),
    "longer side 1024 px": lambda g: longer_side(g, 1024),
    "JPEG quality 95": lambda g: jpeg(g, 95),
    "JPEG quality 75": lambda g: jpeg(g, 75),
    "JPEG quality 50": lambda g: jpeg(g, 50),
    "JPEG quality 30": lambda g: jpeg(g, 30),
    "blur (sigma 1.5 px at 512 px)": blur,
    "gamma 0.7": lambda g: gamma(g, 0.7),
    "gamma 1.4": lambda g: gamma(g, 1.4),
    "sensor noise": noise,
    "screenshot (a third, back up, JPEG 80)": screenshot,
}
# The ship rule's variants (issue 35): no more than 10% of labels may change under any of them.
RULE_VARIANTS = ("longer side 256 px", "longer side 1024 px", "JPEG quality 30", "blur (sigma 1.5 px at 512 px)")
# The app's one-click test: compressed, smaller, blurred.
APP_VARIANTS = {"compressed (JPEG quality 30)": "JPEG quality 30", "smaller (longer side 256 px)": "longer side 256 px",
                "blurred (sigma 1.5 px at 512 px)": "blur (sigma 1.5 px at 512 px)"}


def variant(gray: np.ndarray, name: str) -> Image.Image:
    """The variant `name` of a decoded image, as an 8-bit image a person could upload."""
    return Image.fromarray(to_uint8(VARIANTS[name](np.asarray(gray, np.float32))))


@dataclass
class Held:
    """One image's quality test: the verdict as it is and under each variant, by name."""

    verdicts: dict  # AS_IS and each variant's name -> report.Verdict
    target: str  # the class whose probability is followed (covid, when the model has it)

    @property
    def changed(self) -> list[str]:
        """The variants under which the shown label is not the one of the image as it is."""
        label = self.verdicts[AS_IS].shown_label
        return [name for name, verdict in self.verdicts.items() if verdict.shown_label != label]

    @property
    def label_held(self) -> bool:
        return not self.changed

    def words(self) -> str:
        """What it means, in a sentence."""
        if self.verdicts[AS_IS].status != "result":
            return "The image as it is gets no result, so there is no answer to hold."
        if self.label_held:
            # Holding is necessary, not sufficient: the 2020 recipe holds by reading what is outside the lungs.
            return ("The answer holds: compressed, smaller and blurred, this model gives the same label, so the "
                    "file's quality does not decide it here. Holding alone does not show that it reads the lungs: "
                    "the map test shows where its evidence lies.")
        return (f"The answer changes when this image is {' or '.join(name.split(' (')[0] for name in self.changed)}: "
                "the X-ray shows the same lungs either way, so this model is reading the file's quality here, "
                "not only the lungs. Give its answer less weight.")


def held(predictor, image, variants: dict[str, str] | None = None) -> Held:
    """The verdict of `image` as it is and of each of `variants` (shown name: VARIANTS name;
    default APP_VARIANTS): does the label hold? An image that gets no result as it is (refused,
    as a photo is) has no label to hold: its variants are not asked."""
    gray, _ = load_image(image)
    variants = variants or APP_VARIANTS
    verdicts = {AS_IS: predictor.predict(image).verdict}
    if verdicts[AS_IS].status == "result":  # the copies in one batch: one pass of the network
        copies = predictor.predict_batch([variant(gray, name) for name in variants.values()], batch_size=len(variants))
        verdicts |= {shown: prediction.verdict for shown, prediction in zip(variants, copies)}
    return Held(verdicts, "covid" if "covid" in predictor.classes else predictor.classes[0])


# -- the audit ----------------------------------------------------------------------------------

def audit_rows(predictor, paths: list[str], groups: list[str], variants: list[str], progress: bool = True
               ) -> pd.DataFrame:
    """One row per image and variant (AS_IS included): its group, p(covid) and the decided class."""
    rows = []
    covid = predictor.classes.index("covid") if "covid" in predictor.classes else 0
    for path, group in tqdm(list(zip(paths, groups)), desc="quality variants", unit="img", disable=not progress):
        gray, _ = load_image(path)
        images = [path] + [variant(gray, name) for name in variants]
        for name, prediction in zip([AS_IS, *variants], predictor.predict_batch(images, batch_size=len(images))):
            rows.append({"path": str(path), "group": group, "variant": name, "decided": prediction.decided,
                         "p_covid": prediction.probabilities[predictor.classes[covid]]})
    return pd.DataFrame(rows)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Per group and variant: share called COVID, share of decided labels changed from the image
    as it is, median |change in p(covid)|."""
    base = rows[rows["variant"] == AS_IS].set_index("path")
    out = []
    for (group, name), part in rows.groupby(["group", "variant"], sort=False):
        before = base.loc[part["path"]]
        out.append({"group": group, "variant": name, "images": len(part),
                    "called_covid": float((part["decided"] == "covid").mean()),
                    "labels_changed": float((part["decided"].to_numpy() != before["decided"].to_numpy()).mean()),
                    "median_abs_change_p_covid": float(np.median(np.abs(part["p_covid"].to_numpy()
                                                                        - before["p_covid"].to_numpy())))})
    return pd.DataFrame(out)


def flagged(summary: pd.DataFrame, bar: float = 0.10, variants=RULE_VARIANTS) -> list[tuple[str, str, float]]:
    """(group, variant, share of labels changed) wherever a variant of the ship rule changes more
    than `bar` of a group's labels: where the model reads the file rather than the lungs."""
    over = summary[summary["variant"].isin(variants) & (summary["labels_changed"] > bar)]
    return [(row.group, row.variant, row.labels_changed) for row in over.itertuples()]


def stored(summary: pd.DataFrame) -> dict:
    """What a checkpoint keeps of its audit (its card in the app shows it): the largest share of
    labels a variant of the ship rule changes among the test COVID, the test adult normals and
    each hospital's people, where, and the share called COVID as it is and at worst."""
    rule = summary[summary["variant"].isin(RULE_VARIANTS) & ~summary["group"].str.contains("pneumonias")]
    worst = rule.loc[rule["labels_changed"].idxmax()]
    as_is = summary[summary["variant"] == AS_IS].set_index("group")["called_covid"]
    return {"worst_labels_changed": float(worst["labels_changed"]), "worst_variant": worst["variant"],
            "worst_group": worst["group"], "variants": list(RULE_VARIANTS),
            "called_covid_as_is": {group: float(share) for group, share in as_is.items()},
            "measured_on": "the test split's COVID, adult normals and adult pneumonias, and each external hospital",
            "images": int(summary[summary["variant"] == AS_IS]["images"].sum())}


def audit_sets(checkpoint, data: Path, external: Path, sample: int | None, seed: int = 0, split_name: str = "test",
               hospitals: list[str] | None = None) -> tuple[list, list]:
    """(paths, groups): the checkpoint's `split_name` split's COVID, adult normals and adult
    pneumonias (cxr images only), and each external hospital's people (those named in
    `hospitals`, default every one); at most `sample` a group. Choosing a recipe reads the
    validation split ("val") and the hospital left out; the test split is for the one shipped."""
    split = Path(checkpoint).with_suffix(".split.csv")
    if not split.is_file():
        split = Path(checkpoint).parent / "split.csv"
    frame = pd.read_csv(split, dtype=str, keep_default_na=False)
    folders = sorted(p for p in external.iterdir() if (p / "manifest.csv").is_file()) if external.is_dir() else []
    # A hospital trained on has rows in the split too (train --external): its own folder's, not the data's.
    frame = frame[(frame["split"] == split_name) & ~frame["source_dataset"].isin([f.name for f in folders])]
    groups = {f"{split_name}: COVID": frame[frame["label"] == "covid"],
              f"{split_name}: adult normals": frame[(frame["label"] == "normal") & (frame["age_group"] == "adult")],
              f"{split_name}: adult pneumonias": frame[(frame["label"] == "pneumonia") & (frame["age_group"] == "adult")]}
    paths, names = [], []
    for name, part in groups.items():
        part = part.sample(min(sample, len(part)), random_state=seed) if sample else part
        paths += [str(data / f) for f in part["filename"]]
        names += [name] * len(part)
    for folder in [f for f in folders if hospitals is None or f.name in hospitals]:
        hospital = read_manifest(folder / "manifest.csv")
        hospital = hospital.sample(min(sample, len(hospital)), random_state=seed) if sample else hospital
        paths += list(map(str, hospital["path"]))
        names += [f"{folder.name}: adults, no COVID"] * len(hospital)
    return paths, names


def plot(summaries: dict[str, pd.DataFrame], path: Path) -> Path:
    """Labels changed per variant, one bar per model, for COVID and adult normals of the test split
    and each hospital's people."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(g for s in summaries.values() for g in s["group"]))
    variants = [v for v in VARIANTS if any(v in set(s["variant"]) for s in summaries.values())]
    figure, axes = plt.subplots(len(groups), 1, figsize=(10, 2.4 * len(groups)), sharex=True, squeeze=False)
    width = 0.8 / max(1, len(summaries))
    for axis, group in zip(axes[:, 0], groups):
        for index, (model, summary) in enumerate(summaries.items()):
            shares = summary[summary["group"] == group].set_index("variant")["labels_changed"]
            axis.bar(np.arange(len(variants)) + index * width, [shares.get(v, np.nan) for v in variants], width,
                     label=model)
        axis.axhline(0.10, color="black", linewidth=0.8, linestyle="--")
        axis.set_ylim(0, 1)
        axis.set_ylabel("labels changed")
        axis.set_title(group, fontsize=10)
        axis.yaxis.set_major_formatter("{x:.0%}")
    axes[-1, 0].set_xticks(np.arange(len(variants)) + 0.4 - width / 2, variants, rotation=30, ha="right")
    axes[0, 0].legend(fontsize=8, ncols=len(summaries))
    figure.suptitle("Labels changed by a change of file quality (dashed: the 10% bar)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def markdown(summary: pd.DataFrame) -> str:
    """The summary as a table: a row per variant, for each group the share called COVID and the
    labels changed."""
    table = summary.pivot_table(index="variant", columns="group", values=["called_covid", "labels_changed"],
                                sort=False)
    groups = list(dict.fromkeys(summary["group"]))
    lines = ["| variant | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for name in dict.fromkeys(summary["variant"]):
        cells = [f"{table.loc[name, ('called_covid', g)]:.0%} / {table.loc[name, ('labels_changed', g)]:.0%}"
                 for g in groups]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nEach cell: called COVID / labels changed from the image as it is."


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="covidxr quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=checkpoint_path, action="append", metavar="FILE_OR_NAME", default=None,
                        help="a model to audit (repeatable; default: every bundled model)")
    parser.add_argument("--data", default=None, help="data folder (default: $COVIDXR_DATA, else ../shared/data/cxr)")
    parser.add_argument("--external-dir", default=None, help="the hospitals (default: 'external' beside the data)")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), default=None,
                        help="only these variants (repeatable; default: all)")
    parser.add_argument("--sample", type=int, default=None, help="at most N images a group (a few minutes)")
    parser.add_argument("--split", default="test", choices=("test", "val"),
                        help="the checkpoint's split to read (val: to choose a recipe without the test split)")
    parser.add_argument("--hospital", action="append", default=None,
                        help="only this external hospital (repeatable; default: every one)")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--store", action="store_true",
                        help="store each model's result in its checkpoint's description (its card in the app says how "
                             "it fares); needs the full test split, every variant and every hospital")
    args = parser.parse_args(argv)
    if args.store and (args.sample or args.variant or args.hospital or args.split != "test"):
        parser.error("--store keeps what the full audit measured: no --sample, --variant, --hospital or --split val")
    from .predictor import Predictor

    checkpoints = args.checkpoint or [checkpoint_path(name) for name in BUNDLED]
    data = data_dir(args.data)
    external = Path(args.external_dir) if args.external_dir else data.parent / "external"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries, result = {}, {}
    for checkpoint in checkpoints:
        predictor = Predictor.load(checkpoint)
        name = (predictor.config.get("card") or {}).get("name") or Path(checkpoint).stem
        paths, groups = audit_sets(checkpoint, data, external, args.sample, split_name=args.split,
                                   hospitals=args.hospital)
        rows = audit_rows(predictor, paths, groups, args.variant or list(VARIANTS))
        rows.assign(path=[Path(p).name for p in rows["path"]]).to_csv(out / f"{name}.csv", index=False)
        summary = summarise(rows)
        summaries[name] = summary
        result[name] = summary.to_dict("records")
        (out / f"{name}.md").write_text(markdown(summary) + "\n")
        print(f"\n## {name}\n\n{markdown(summary)}")
        if args.store:
            update_config(checkpoint, {"quality": stored(summary)})
            print(f"stored in {checkpoint}")
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    print(f"\nplot: {plot(summaries, out / 'quality.png')}")
    return result


if __name__ == "__main__":
    main()
