"""How each part of the schedule learns: training's per-bin validation loss as a heatmap (bins by training step).

Training (ldm.training.validation.validation_loss) reports {"step", "val_loss", "val_loss_bin0", ...} every
validation_every steps and logs them through Accelerate; this reads a list of those reports, a .json / .jsonl file
of them, or a training run's TensorBoard log folder (e.g. RUN/logs), whose val_loss_bin<k> scalars it collects.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from ldm.diagnostics.plots import heatmap

BIN_KEY = re.compile(r"val_loss_bin(\d+)$")


def read_tensorboard(folder: str, keys: re.Pattern = BIN_KEY) -> list[dict]:
    """Returns [{"step", "val_loss_bin<k>": ...}] from every TensorBoard event file under folder; `keys` chooses
    other scalars (the last part of their tag), e.g. the training loss for the web UI's run page."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step: dict[int, dict] = {}
    for root, _, files in os.walk(folder):
        if not any(f.startswith("events.out.tfevents") for f in files):
            continue
        events = EventAccumulator(root, size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            key = tag.rsplit("/", 1)[-1]
            if keys.match(key):
                for e in events.Scalars(tag):
                    by_step.setdefault(e.step, {"step": e.step})[key] = e.value
    return [by_step[s] for s in sorted(by_step)]


def read_history(path: str) -> list[dict]:
    """Returns the validation reports stored in a .jsonl (one per line) or .json (a list, or {"val": [...]}) file,
    or logged under a TensorBoard folder."""
    if os.path.isdir(path):
        return read_tensorboard(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no validation history at {path}; pass the run's TensorBoard folder (RUN/logs) "
                                "or a .jsonl/.json file of {\"step\", \"val_loss_bin0\", ...} reports")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    return data["val"] if isinstance(data, dict) and "val" in data else data


def history_matrix(history: list[dict]) -> tuple[np.ndarray, list[int], list[int]]:
    """Returns (loss (bins, steps), bin indices, steps) from per-bin validation reports."""
    reports = sorted((r for r in history if any(BIN_KEY.match(k) for k in r)), key=lambda r: r["step"])
    if not reports:
        raise ValueError("the validation history has no val_loss_bin<k> values; train with val_loss_bins > 0 and "
                         "let at least one validation (every validation_every steps) run")
    bins = sorted({int(BIN_KEY.match(k).group(1)) for r in reports for k in r if BIN_KEY.match(k)})
    matrix = np.array([[r.get(f"val_loss_bin{b}", np.nan) for r in reports] for b in bins], dtype=float)
    return matrix, bins, [int(r["step"]) for r in reports]


def training_heatmap(history: list[dict] | str, path: str, relative: bool = True) -> str:
    """Writes the heatmap PNG of per-bin validation loss over training; relative=True divides each bin's row by
    its first value, so every part of the schedule starts at 1 and one can see which parts learn first."""
    history = read_history(history) if isinstance(history, str) else history
    matrix, bins, steps = history_matrix(history)
    if relative:
        matrix = matrix / matrix[:, :1]
    label = "val loss / first val loss" if relative else "val loss"
    return heatmap(path, matrix, [f"bin {b}" for b in bins], steps, "Validation loss per timestep bin over training",
                   label, xlabel="training step", ylabel="timestep bin (0 = least noise)", log=True)
