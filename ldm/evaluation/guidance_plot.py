"""Figures of `ldm eval-guidance` (ldm.evaluation.guidance_sweep): the adherence / distance trade-off curve and a
sample grid per method."""
from __future__ import annotations

GRID_COLUMNS, GRID_ROWS = 10, 3  # a grid shows up to 30 images


def plot_tradeoff(report: dict, path: str) -> str:
    """Writes the trade-off plot: x = FID to the reference, y = adherence, one line per method through its scales
    (each point labelled with its scale), the reference's noise floor as a vertical line and the recommended point
    starred; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = report["settings"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method in settings["methods"]:
        points = sorted((p for p in report["points"] if p["method"] == method), key=lambda p: p["scale"])
        xs, ys = [p["fid"] for p in points], [p["adherence"]["all"] for p in points]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.2, label=method)
        for p, x, y in zip(points, xs, ys):
            ax.annotate(f"{p['scale']:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6.5,
                        color=line.get_color())
    floor = report["noise_floor"]
    ax.axvline(floor["fid"], color="grey", linestyle="--", linewidth=1,
               label=f"noise floor: real images ({floor['n']})")
    best = report["recommended"]
    ax.plot([best["fid"]], [best["adherence"]["all"]], marker="*", markersize=14, color="black", linestyle="none",
            label=f"recommended: {best['method']} {best['scale']:g}")
    ax.set(xlabel=f"FID to {settings['reference']} ({feature_name(settings)})",
           ylabel="adherence (share of images right)",
           title=f"Guidance trade-off: {settings['prompts']} prompts, {settings['steps']} {settings['scheduler']} "
                 f"steps, n={best['n']}")
    ax.set_xscale("log")
    plain_numbers = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}")
    ax.xaxis.set_major_formatter(plain_numbers)
    ax.xaxis.set_minor_formatter(plain_numbers)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def feature_name(settings: dict) -> str:
    """Returns the feature space in words: "8x8 pixels", "tiny", "inception"."""
    if settings["features"] == "pixels":
        return f"{settings['feature_size']}x{settings['feature_size']} RGB pixels"
    return f"{settings['features']} features"


def save_grid(images: list, images_per_prompt: int, path: str) -> str:
    """Writes a grid of a setting's images (prompt-major, images_per_prompt each), 10 a row: one column per prompt
    and one row per image index for the first 10 prompts, or with one image per prompt the first 30; returns the
    path."""
    from ldm.images import image_grid

    num_prompts = len(images) // images_per_prompt
    columns = min(GRID_COLUMNS, num_prompts)
    if images_per_prompt == 1:
        chosen = images[:GRID_COLUMNS * GRID_ROWS]
    else:
        chosen = [images[i * images_per_prompt + r] for r in range(min(GRID_ROWS, images_per_prompt))
                  for i in range(columns)]
    image_grid(chosen, columns=columns).save(path)
    return path
