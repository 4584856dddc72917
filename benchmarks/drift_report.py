"""Tables and plots of benchmarks/compare_drift.py's results.json: drift, per-t bias and quality per (case, training
remedy, sampling remedy, steps), the mean over seeds with the spread. Reads results.json only:

    python benchmarks/drift_report.py runs/drift            # prints the tables, writes the PNGs beside results.json
"""
from __future__ import annotations

import json
import os
import sys
from statistics import mean

from objectives_report import _pyplot

METRICS = {"final_mean_gap": "final x0 mean gap", "peak_w2": "peak W2(x_t, q(x_t))", "quality": "quality",
           "brightness_gap": "brightness gap"}


def rows_of(results: dict) -> dict:
    """Returns {(case, training, sampling, steps): [row per seed]} with each row's "peak_w2" added."""
    table = {}
    for case, seeds in results["runs"].items():
        for runs in seeds.values():
            for training, result in runs.items():
                for row in result["rows"]:
                    row = {**row, "peak_w2": max(row["w2"] + [row["final_w2"]])}
                    table.setdefault((case, training, row["sampling"], row["steps"]), []).append(row)
    return table


def cell(rows: list[dict], key: str, percent: bool = False) -> str:
    """Returns the seeds' mean of `key`, with the range when there are several: "0.31 (0.28-0.35)"."""
    values = [r[key] for r in rows]
    f = (lambda v: f"{v:.0%}") if percent else (lambda v: f"{v:+.2f}" if "gap" in key else f"{v:.2f}")
    spread = f" ({f(min(values))}..{f(max(values))})" if len(values) > 1 else ""
    return f"{f(mean(values))}{spread}"


def metric_table(results: dict, key: str) -> str:
    """Returns a markdown table of one metric: a row per (case, training, sampling), a column per step count."""
    table, steps = rows_of(results), results["settings"]["sample_steps"]
    lines = [f"| case | training | sampling | " + " | ".join(f"{n} steps" for n in steps) + " |",
             "|---" * (3 + len(steps)) + "|"]
    for case, training, sampling in dict.fromkeys(k[:3] for k in table):
        cells = [cell(table[(case, training, sampling, n)], key, key == "quality")
                 if (case, training, sampling, n) in table else "-" for n in steps]
        lines.append(f"| {case} | {training} | {sampling} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def effect(rows: list[dict], base: list[dict]) -> str:
    """Returns a remedy's effect against the plain run, seeds' means: the final x0's W2 to the data and its
    quality, "W2 0.89->0.30, 30%->60%"."""
    w2, w2_base = (mean(r["final_w2"] for r in x) for x in (rows, base))
    q, q_base = (mean(r["quality"] for r in x) for x in (rows, base))
    return f"W2 {w2_base:.2f}->{w2:.2f}, {q_base:.0%}->{q:.0%}"


def verdict_table(results: dict, steps: int) -> str:
    """Returns a markdown table, a row per remedy and a column per case: its effect at `steps` sampling steps
    against plain training and plain DDIM (effect)."""
    table = rows_of(results)
    names = list(results["runs"])
    remedies = [("training", tr) for tr in dict.fromkeys(k[1] for k in table) if tr != "none"]
    remedies = [("sampling", s) for s in dict.fromkeys(k[2] for k in table) if s != "none"] + remedies
    lines = ["| remedy | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
    for kind, name in remedies:
        cells = []
        for case in names:
            key = (case, "none", name, steps) if kind == "sampling" else (case, name, "none", steps)
            base = table.get((case, "none", "none", steps))
            cells.append(effect(table[key], base) if key in table and base else "-")
        lines.append(f"| {name} ({kind}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bias_table(results: dict) -> str:
    """Returns a markdown table of the per-t bias (mean over channels, first seed) per (case, training remedy)."""
    lines, header = [], None
    for case, seeds in results["runs"].items():
        for training, result in next(iter(seeds.values())).items():
            bias = result["bias"]
            if header is None:
                header = "| case | training | " + " | ".join(f"t/T {t:.2f}" for t in bias["t"]) + " | max abs z |"
                lines += [header, "|---" * (3 + len(bias["t"])) + "|"]
            lines.append(f"| {case} | {training} | " + " | ".join(f"{b:+.3f}" for b in bias["bias"])
                         + f" | {max(bias['max_z']):.0f} |")
    return "\n".join(lines)


def plot_traces(results: dict, case: str, steps: int, path: str) -> None:
    """Plots the mean gap of x_t per sampling step (first seed) at `steps`: left, each training remedy sampled
    plainly; right, the plain model under each sampling remedy."""
    plt = _pyplot()
    runs = next(iter(results["runs"][case].values()))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    for ax, pick, title in ((axes[0], lambda tr, s: s == "none", "training remedies (plain DDIM)"),
                            (axes[1], lambda tr, s: tr == "none", "sampling remedies (plain training)")):
        for training, result in runs.items():
            for row in result["rows"]:
                if row["steps"] == steps and pick(training, row["sampling"]):
                    label = training if ax is axes[0] else row["sampling"]
                    x = [i / len(row["mean_gap"]) for i in range(len(row["mean_gap"]) + 1)]
                    ax.plot(x, row["mean_gap"] + [row["final_mean_gap"]], label=label)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set(title=title, xlabel="fraction of the sampling run")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("mean of x_t - mean of q(x_t)")
    fig.suptitle(f"{case}: {steps} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_bias(results: dict, path: str) -> None:
    """Plots the per-t bias (first seed), one panel per case, one line per training remedy."""
    plt = _pyplot()
    names = list(results["runs"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    for ax, case in zip(axes[0], names):
        for training, result in next(iter(results["runs"][case].values())).items():
            ax.plot(result["bias"]["t"], result["bias"]["bias"], marker=".", label=training)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set(title=case, xlabel="t/T (flow: sigma)")
    axes[0][0].set_ylabel("mean of eps_pred - eps")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_samples(results: dict, out: str, steps: int, path: str) -> None:
    """Shows the first seed's sample grids at `steps` of each case: plain, dynamic thresholding, and flow where
    trained (compare_drift writes them to OUT/seed<k>/<case>/<training>/samples_<sampling>_<steps>.png)."""
    from PIL import Image

    seed = results["seeds"][0]
    picks = [(case, training, sampling) for case in results["runs"]
             for training, sampling in (("none", "none"), ("none", "dynamic_thresholding"), ("flow", "none"))
             if os.path.isfile(os.path.join(out, f"seed{seed}", case, training, f"samples_{sampling}_{steps}.png"))]
    plt = _pyplot()
    fig, axes = plt.subplots(len(picks), 1, figsize=(6, 0.75 * len(picks) + 0.3), squeeze=False)
    for ax, (case, training, sampling) in zip(axes[:, 0], picks):
        grid = Image.open(os.path.join(out, f"seed{seed}", case, training, f"samples_{sampling}_{steps}.png"))
        ax.imshow(grid, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{case}, training {training}, sampling {sampling}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(results: dict, out: str) -> None:
    """Writes the plots to `out` and prints the tables."""
    steps = results["settings"]["sample_steps"]
    plot_samples(results, out, steps[min(2, len(steps) - 1)], os.path.join(out, "samples.png"))
    for case in results["runs"]:
        plot_traces(results, case, steps[min(2, len(steps) - 1)], os.path.join(out, f"trace_{case}.png"))
    plot_bias(results, os.path.join(out, "bias.png"))
    print(f"\n### effect of each remedy at {steps[min(2, len(steps) - 1)]} steps (plain -> remedy)\n\n"
          f"{verdict_table(results, steps[min(2, len(steps) - 1)])}")
    for key, title in METRICS.items():
        print(f"\n### {title}\n\n{metric_table(results, key)}")
    print(f"\n### per-t bias\n\n{bias_table(results)}\n")


if __name__ == "__main__":
    folder = sys.argv[1] if len(sys.argv) > 1 else "runs/drift"
    with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
        write_report(json.load(f), folder)
