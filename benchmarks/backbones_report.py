"""Tables and plots of benchmarks/compare_backbones.py's results (the dict it writes to results.json).

Compute time of a run = its steps x its model's measured seconds per training step (costs), so runs line up
on the time axis whatever the machine's load was while they trained.
"""
from __future__ import annotations

import json
import os

COLOURS = {"unet": "tab:blue", "dit": "tab:red", "dit-same-steps": "tab:orange", "dit-adaln": "tab:purple",
           "dit-cross-attention": "tab:green", "dit-in-context": "tab:brown", "pixart": "tab:pink"}
BACKBONE_ARMS = ("unet", "dit", "dit-same-steps")
MECHANISM_ARMS = ("dit", "dit-adaln", "dit-cross-attention", "dit-in-context", "pixart")
MECHANISM = {"dit": "adaLN-Zero", "dit-adaln": "adaLN", "dit-cross-attention": "cross-attention",
             "dit-in-context": "in-context", "pixart": "PixArt-alpha (cross-attn + adaLN-single)",
             "unet": "UNet (cross-attn + pooled text)", "dit-same-steps": "adaLN-Zero"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def graded_steps(available, steps: int, count: int) -> list[int]:
    """Returns the checkpoint steps nearest to 1/count, 2/count, ..., 1 of `steps` (a run of 703 steps saves at
    234, 468, 702 and 703: 702 is not graded)."""
    return sorted({min(available, key=lambda s: abs(s - k * steps / count)) for k in range(1, count + 1)})


def graded_rows(arm: dict, count: int) -> list[dict]:
    """Returns the arm's evaluation rows at its graded checkpoints."""
    keep = set(graded_steps({r["step"] for r in arm["rows"]}, arm["steps"], count))
    return [r for r in arm["rows"] if r["step"] in keep]


def mean(values) -> float:
    return sum(values) / len(values)


def compute_minutes(results: dict, arm: dict, steps: float) -> float:
    return steps * results["costs"][arm["preset"]]["seconds_per_step"] / 60


def seeds(results: dict, dataset: str, arm: str) -> list[dict]:
    """Returns the arm's report of each seed that ran it."""
    return [runs[dataset]["arms"][arm] for runs in results["runs"].values()
            if dataset in runs and arm in runs[dataset]["arms"]]


def final_adherence(arm: dict, guidance: float, key: str = "all") -> float:
    rows = [r for r in arm["rows"] if r["guidance"] == guidance and r["step"] == arm["steps"]]
    return rows[0]["adherence"][key]


def cell(values, fmt: str = "{:.0%}") -> str:
    """Returns "mean (seed values)" or the one value."""
    text = fmt.format(mean(values))
    return text if len(values) == 1 else f"{text} ({' / '.join(fmt.format(v) for v in values)})"


def cost_table(results: dict) -> str:
    unet = results["costs"]["small"]
    lines = ["| preset | parameters | GFLOPs per training step (batch 32) | MFLOPs per image per sampling step "
             "(2 CFG rows) | s per training step | relative time |", "|---|---|---|---|---|---|"]
    for preset, c in sorted(results["costs"].items(), key=lambda kv: kv[1]["seconds_per_step"]):
        lines.append(f"| `{preset}` | {c['parameters']:,} | {c['train_flops'] / 1e9:.1f} | "
                     f"{c['sample_flops'] / 1e6:.1f} | {c['seconds_per_step']:.3f} | "
                     f"{c['seconds_per_step'] / unet['seconds_per_step']:.2f}x |")
    return "\n".join(lines)


def arm_table(results: dict, dataset: str, arms, guidances) -> str:
    head = " | ".join(f"all three, g{g:g}" if dataset == "shapes" else f"right digit, g{g:g}" for g in guidances)
    lines = [f"| arm | conditioning | steps | compute min | held-out val loss | {head} |",
             "|---|---|---|---|---|" + "---|" * len(guidances)]
    for arm in arms:
        reports = seeds(results, dataset, arm)
        if not reports:
            continue
        steps = reports[0]["steps"]
        val = [r["val_loss_history"][-1][1] for r in reports]
        adherence = " | ".join(cell([final_adherence(r, g) for r in reports]) for g in guidances)
        lines.append(f"| {arm} | {MECHANISM[arm]} | {steps} | {compute_minutes(results, reports[0], steps):.1f} | "
                     f"{cell(val, '{:.4f}')} | {adherence} |")
    return "\n".join(lines)


def plot_curves(results: dict, dataset: str, arms, guidances, path: str, title: str) -> None:
    """Left: held-out validation loss against compute minutes; right: adherence (all three / right digit) at each
    saved checkpoint against compute minutes, solid at the highest guidance, dashed at the lowest. First seed."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in arms:
        reports = seeds(results, dataset, arm)
        if not reports:
            continue
        r = reports[0]
        steps, val = zip(*r["val_loss_history"])
        left.plot([compute_minutes(results, r, s) for s in steps], val, color=COLOURS[arm], label=arm)
        for g, style in ((max(guidances), "-"), (min(guidances), "--")):
            rows = sorted((x for x in graded_rows(r, results["settings"]["checkpoints"]) if x["guidance"] == g),
                          key=lambda x: x["step"])
            right.plot([compute_minutes(results, r, x["step"]) for x in rows], [x["adherence"]["all"] for x in rows],
                       style, marker="o", color=COLOURS[arm], label=f"{arm}, g{g:g}")
    left.set(xlabel="compute minutes (steps x s/step)", ylabel="held-out validation loss (eps MSE)", title=title)
    right.set(xlabel="compute minutes (steps x s/step)", ylim=(0, 1.02), title=title,
              ylabel="all three right" if dataset == "shapes" else "right digit")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out: str) -> None:
    """Writes results.json, tables.md and the PNG plots to `out` and prints the tables."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)
    guidances = tuple(results["settings"]["guidances"])
    datasets = sorted({d for runs in results["runs"].values() for d in runs})
    parts = ["Costs (one thread, measured in one process before training):", cost_table(results)]
    for dataset in datasets:
        parts += [f"{dataset}: UNet against DiT", arm_table(results, dataset, BACKBONE_ARMS, guidances)]
        plot_curves(results, dataset, BACKBONE_ARMS, guidances, os.path.join(out, f"backbones_{dataset}.png"),
                    f"{dataset}: UNet against DiT")
    if "shapes" in datasets and any(seeds(results, "shapes", a) for a in MECHANISM_ARMS[1:]):
        parts += ["shapes: DiT conditioning mechanisms at the UNet's compute time",
                  arm_table(results, "shapes", MECHANISM_ARMS, guidances)]
        plot_curves(results, "shapes", MECHANISM_ARMS, guidances, os.path.join(out, "mechanisms_shapes.png"),
                    "shapes: conditioning mechanisms")
    text = "\n\n".join(parts) + "\n"
    with open(os.path.join(out, "tables.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
