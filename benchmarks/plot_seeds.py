"""Seeds of the lung-reader recipes side by side: does a lever win across seeds, or in one?

    python -m benchmarks.plot_seeds                      # benchmarks/lung_reader_seeds.csv -> docs/lung-reader-seeds.png

Each row of the table is one training run judged by `benchmarks/judge_run.py` (MODEL_CARD.md,
"Seeds"): its JSON keys, with the left-out hospital H named `left_out` (`H_auroc_vs_test_covid` ->
`left_out_auroc_vs_test_covid`, `H_normal_threshold` -> `left_out_normals_called`, `H_other_threshold`
-> `left_out_other_called`, the `_argmax` keys alike), `spec` as `test_specificity` and
`test_tuned_spec` as `test_tuned_specificity` (blank for the runs whose weights were not kept);
`threshold_from` says which threshold the rates are at (the run's validation proxy, or a reference
run's out-of-fold one given with `--threshold` and `--temperature`). Runs judged before the table
existed carry MODEL_CARD's numbers, with blanks where it gave none. One panel per measure and
left-out hospital: a dot per run, a bar at each architecture's mean. Only measures every run has
are drawn; the table holds the rest.
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).parent
MEASURES = {  # column: what the panel's axis says
    "test_auroc": "test split: COVID AUROC",
    "left_out_auroc_vs_test_covid": "left-out hospital's adults\nagainst test COVID: AUROC",
    "adult_normals_called": "test adult normals called COVID at the\nthreshold judged (table: threshold_from)",
}
BARS = {"test_auroc": 0.965, "adult_normals_called": 0.10}  # issue 24: the shipped model's AUROC; 10%


def plot(table: pd.DataFrame, out: Path) -> None:
    hospitals = list(dict.fromkeys(table["left_out"]))
    archs = sorted(table["arch"].unique())
    figure, axes = plt.subplots(len(hospitals), len(MEASURES), figsize=(4 * len(MEASURES), 2.6 * len(hospitals)),
                                squeeze=False)
    for row, hospital in enumerate(hospitals):
        runs = table[table["left_out"] == hospital]
        for column, (measure, label) in enumerate(MEASURES.items()):
            axis = axes[row][column]
            for place, arch in enumerate(archs):
                values = runs.loc[runs["arch"] == arch, measure].dropna()
                axis.scatter(values, [place] * len(values), s=36, alpha=0.75, zorder=3)
                # One label per value (runs that tie share it), above and below in turn along the
                # axis, so that runs with close values stay legible.
                names = runs.loc[values.index, "run"].groupby(values.round(4)).agg(", ".join)
                for order, (value, name) in enumerate(names.items()):
                    axis.annotate(name, (value, place), textcoords="offset points",
                                  xytext=(0, 6 if order % 2 == 0 else -13), ha="center", fontsize=7)
                if len(values):
                    axis.plot([values.mean()] * 2, [place - 0.3, place + 0.3], color="black", lw=1.5)
            if measure in BARS:
                axis.axvline(BARS[measure], color="red", ls="--", lw=1, label="issue 24's bar")
                axis.legend(fontsize=7, loc="best")
            axis.set_yticks(range(len(archs)), [a.replace("efficientnet_", "") for a in archs])
            axis.set_ylim(-0.6, len(archs) - 0.4)
            axis.grid(axis="x", alpha=0.3)
            axis.set_xlabel(label, fontsize=8)
            if column == 0:
                axis.set_ylabel(f"{hospital} left out", fontsize=9)
    figure.suptitle("Lung readers, one dot per seed (bar: the mean); judged by benchmarks/judge_run.py", fontsize=10)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=HERE / "lung_reader_seeds.csv")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "lung-reader-seeds.png")
    args = parser.parse_args()
    plot(pd.read_csv(args.table), args.out)
    print(args.out)
