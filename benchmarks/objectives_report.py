"""Tables and plots of benchmarks/compare_objectives.py's results: adherence per step count, validation loss per
bin, the drift trace and sample sheets. Reads the results dict that script writes (results.json), nothing else.

`settings` below is compare_objectives.Settings (sample_steps, guidances); a report is one data set's run of one
seed, as run_dataset returns it.
"""
from __future__ import annotations

import os

# Each objective's validation loss is the MSE of its own target, binned in its own time variable
LOSS_UNITS = {"epsilon": "eps MSE, bins in t/T", "v": "v MSE, bins in t/T", "v_zero_snr": "v MSE, bins in t/T",
              "flow": "velocity MSE, bins in sigma"}
COLOURS = {"epsilon": "tab:blue", "v": "tab:orange", "v_zero_snr": "tab:green", "flow": "tab:red"}
STEP_STYLES = ("dotted", "dashed", "solid")   # the fewest steps dotted, the most solid


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def first_sampler_rows(objective: dict) -> list[dict]:
    """Returns the rows of the objective's natural sampler (its first: ddim, or euler for flow)."""
    first = objective["rows"][0]["sampler"]
    return [r for r in objective["rows"] if r["sampler"] == first]


def step_style(steps: int, settings) -> str:
    """Returns the line style of a step count: the most steps solid, fewer dashed, the fewest dotted."""
    rank = len(STEP_STYLES) - len(settings.sample_steps) + settings.sample_steps.index(steps)
    return STEP_STYLES[max(0, rank)]


def drift_legend(fig, report: dict, settings) -> None:
    """Adds one legend below the panels: a colour per objective (with its sampler), a line style per step count."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="grey", linewidth=3, alpha=0.4, label="training latents")]
    handles += [Line2D([], [], color=COLOURS[name], label=f"{name} ({first_sampler_rows(o)[0]['sampler']})")
                for name, o in report["objectives"].items()]
    handles += [Line2D([], [], color="black", linestyle=step_style(n, settings), label=f"{n} steps")
                for n in settings.sample_steps]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)


def plot_drift(title: str, report: dict, settings, path: str) -> None:
    """Plots the latents' mean (top) and std (bottom) over the sampling run, one column per guidance: one colour per
    objective (its natural sampler), one line style per step count; grey: the training latents'."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(settings.guidances), figsize=(5 * len(settings.guidances), 5.6), squeeze=False)
    for col, guidance in enumerate(settings.guidances):
        for row, stat in enumerate(("mean", "std")):
            ax = axes[row][col]
            ax.axhline(report["data_latents"][stat], color="grey", linewidth=3, alpha=0.4)
            for name, objective in report["objectives"].items():
                for r in first_sampler_rows(objective):
                    if r["guidance"] == guidance:
                        ax.plot(r["drift"]["fraction"], r["drift"][stat], color=COLOURS[name],
                                linestyle=step_style(r["steps"], settings))
            ax.set(xlabel="fraction of the sampling run", ylabel=f"latent {stat}",
                   title=f"{title}, guidance {guidance:g}: latent {stat}")
    drift_legend(fig, report, settings)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_samples(title: str, report: dict, folder: str, settings, path: str) -> None:
    """Shows the first row (10 images) of each objective's sample grid at the fewest steps, natural sampler: one
    row per (objective, guidance)."""
    from PIL import Image

    plt = _pyplot()
    steps = settings.sample_steps[0]
    rows = [(name, first_sampler_rows(o)[0]["sampler"], g) for name, o in report["objectives"].items()
            for g in settings.guidances]
    fig, axes = plt.subplots(len(rows), 1, figsize=(6, 0.62 * len(rows)), squeeze=False)
    for ax, (name, sampler, guidance) in zip(axes[:, 0], rows):
        grid = Image.open(os.path.join(folder, name, f"samples_{sampler}_g{guidance:g}_{steps}.png"))
        ax.imshow(grid.crop((0, 0, grid.width, grid.width // 10)), interpolation="nearest")  # the first row of 10
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(f"{name}\n{sampler}, g{guidance:g}", rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"{title}, {steps} sampling steps", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def aggregate(results: dict) -> dict:
    """Returns {dataset: {"pixel_mean": [per seed], "objectives": {name: {"val_loss", "val_loss_bins", "minutes":
    [per seed], "rows": {(sampler, guidance, steps): {"all", "pixel_mean", "mean_gap", "std_ratio": [per seed]}}}}}}:
    mean_gap is the distance |final latents' mean - training latents' mean|, std_ratio the final latents' std over
    the training latents' (each seed has its own VAE, so only these relative figures average across seeds)."""
    table: dict = {}
    for runs in results["runs"].values():
        for dataset, report in runs.items():
            entry = table.setdefault(dataset, {"pixel_mean": [], "objectives": {}})
            entry["pixel_mean"].append(report["data_pixel_mean"])
            data = report["data_latents"]
            for name, o in report["objectives"].items():
                agg = entry["objectives"].setdefault(name, {"val_loss": [], "val_loss_bins": [], "minutes": [],
                                                            "rows": {}})
                for key in ("val_loss", "val_loss_bins", "minutes"):
                    agg[key].append(o[key])
                for r in o["rows"]:
                    cell = agg["rows"].setdefault((r["sampler"], r["guidance"], r["steps"]),
                                                  {"all": [], "pixel_mean": [], "mean_gap": [], "std_ratio": []})
                    for key, value in (("all", r["adherence"]["all"]), ("pixel_mean", r["pixel_mean"]),
                                       ("mean_gap", abs(r["drift"]["mean"][-1] - data["mean"])),
                                       ("std_ratio", r["drift"]["std"][-1] / data["std"])):
                        cell[key].append(value)
    return table


def mean(values) -> float:
    return sum(values) / len(values)


def seeds_cell(values, fmt: str = "{:.0%}") -> str:
    """Returns "mean (seed 0/seed 1/...)" for several seeds, the value alone for one."""
    if len(values) == 1:
        return fmt.format(values[0])
    return fmt.format(mean(values)) + " (" + "/".join(fmt.format(v).rstrip("%") for v in values) + ")"


def samplers_of(objective: dict) -> list[str]:
    return list(dict.fromkeys(key[0] for key in objective["rows"]))


def plot_adherence(table: dict, settings, path: str) -> None:
    """Plots adherence (mean over seeds; band: lowest to highest seed) against sampling steps: one panel per
    (data set, guidance), one line per objective and sampler (dashed: Heun)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(table), len(settings.guidances), figsize=(4.5 * len(settings.guidances),
                                                                           3.2 * len(table)), squeeze=False)
    for i, (dataset, entry) in enumerate(table.items()):
        for j, guidance in enumerate(settings.guidances):
            ax = axes[i][j]
            for name, o in entry["objectives"].items():
                for sampler in samplers_of(o):
                    cells = [o["rows"][(sampler, guidance, n)]["all"] for n in settings.sample_steps]
                    style = "dashed" if sampler == "heun" else "solid"
                    ax.plot(settings.sample_steps, [mean(c) for c in cells], marker="o", color=COLOURS[name],
                            linestyle=style, label=f"{name} ({sampler})")
                    if len(cells[0]) > 1:
                        ax.fill_between(settings.sample_steps, [min(c) for c in cells], [max(c) for c in cells],
                                        color=COLOURS[name], alpha=0.1)
            ax.set(xlabel="sampling steps", ylabel="adherence", ylim=(-0.02, 1.02), xticks=settings.sample_steps,
                   title=f"{dataset}, guidance {guidance:g}")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_val_loss(table: dict, path: str) -> None:
    """Plots each objective's final validation loss per bin (mean over seeds; its own units and bins), one panel per
    data set."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(table), figsize=(4.5 * len(table), 3.2), squeeze=False)
    for ax, (dataset, entry) in zip(axes[0], table.items()):
        for name, o in entry["objectives"].items():
            bins = [mean(b) for b in zip(*o["val_loss_bins"])]
            ax.plot(range(len(bins)), bins, marker="o", color=COLOURS[name], label=f"{name}: {LOSS_UNITS[name]}")
        ax.set(xlabel="bin (0 = least noise)", ylabel="validation MSE (own units)", yscale="log",
               title=f"{dataset}: validation loss per bin")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def loss_table(table: dict) -> str:
    """Returns the final validation losses as markdown: one row per (data set, objective), in the objective's units;
    per bin the mean over seeds."""
    bins = max(len(b) for e in table.values() for o in e["objectives"].values() for b in o["val_loss_bins"])
    lines = ["| data | objective | loss (units, bins) | val loss | " + " | ".join(f"bin {b}" for b in range(bins))
             + " | train min |", "|---|---|---|---|" + "---|" * bins + "---|"]
    for dataset, entry in table.items():
        for name, o in entry["objectives"].items():
            cells = " | ".join(f"{mean(b):.4f}" for b in zip(*o["val_loss_bins"]))
            lines.append(f"| {dataset} | {name} | {LOSS_UNITS[name]} | {seeds_cell(o['val_loss'], '{:.4f}')} | "
                         f"{cells} | {mean(o['minutes']):.1f} |")
    return "\n".join(lines)


def adherence_table(table: dict, settings) -> str:
    """Returns adherence (the "all" fraction; mean and per seed) as markdown: one row per (data set, objective,
    sampler), one column per (guidance, steps)."""
    columns = [(g, n) for g in settings.guidances for n in settings.sample_steps]
    lines = ["| data | objective | sampler | " + " | ".join(f"g{g:g}, {n} steps" for g, n in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for dataset, entry in table.items():
        for name, o in entry["objectives"].items():
            for sampler in samplers_of(o):
                cells = " | ".join(seeds_cell(o["rows"][(sampler, g, n)]["all"]) for g, n in columns)
                lines.append(f"| {dataset} | {name} | {sampler} | {cells} |")
    return "\n".join(lines)


def drift_table(table: dict, settings) -> str:
    """Returns, per guidance and each objective's natural sampler, the final latents' mean gap (distance) and std
    ratio to the training latents and the images' mean brightness at each step count (means over seeds)."""
    steps = settings.sample_steps
    lines = ["| data | objective | guidance | " + " | ".join(f"mean gap / std ratio, {n} steps" for n in steps)
             + " | " + " | ".join(f"brightness, {n} steps" for n in steps) + " |",
             "|---|---|---|" + "---|" * 2 * len(steps)]
    for dataset, entry in table.items():
        lines.append(f"| {dataset} | training data | | " + " | ".join(["0 / 1"] * len(steps)) + " | "
                     + " | ".join([f"{mean(entry['pixel_mean']):.2f}"] * len(steps)) + " |")
        for guidance in settings.guidances:
            for name, o in entry["objectives"].items():
                sampler = samplers_of(o)[0]
                cells = [o["rows"][(sampler, guidance, n)] for n in steps]
                latents = " | ".join(f"{mean(c['mean_gap']):.3f} / {mean(c['std_ratio']):.2f}" for c in cells)
                bright = " | ".join(f"{mean(c['pixel_mean']):.2f}" for c in cells)
                lines.append(f"| {dataset} | {name} ({sampler}) | {guidance:g} | {latents} | {bright} |")
    return "\n".join(lines)
