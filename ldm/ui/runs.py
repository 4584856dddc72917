"""Training runs for the page: what an `ldm train` or `ldm finetune` folder holds, read again at every refresh so
that a run in progress shows its latest numbers.

A run folder (output_dir / --out) holds, as the run goes on:
    logs/                          TensorBoard scalars (ldm train, report_to=tensorboard): loss every log_every
                                   steps; val_loss and val_loss_bin<k> every validation_every steps
    samples/step-<N>.png           the validation grid of step N (both trainers)
    checkpoints/checkpoint-<N>/trainer_state.json
                                   "history" (the validation records) and, for ldm finetune, "losses" per step
and when it ends losses.jsonl (ldm train) or report.json (ldm finetune: "losses" and "history", whose records carry
the memorisation guard's numbers: per-bin loss of training and held-out images, their ratio, near copies).
"""
from __future__ import annotations

import json
import os
import re

from ldm.diagnostics.training_heatmap import BIN_KEY, read_tensorboard

RUN_MARKERS = ("config.yaml", "logs", "samples", "checkpoints", "report.json", "losses.jsonl")
TENSORBOARD_KEYS = re.compile(r"(loss|val_loss|val_loss_bin\d+)$")
GRID = re.compile(r"step-(\d+)\.png$")


def is_run(folder: str) -> bool:
    return os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, m)) for m in RUN_MARKERS)


def list_runs(runs_dir: str) -> list[str]:
    """Returns runs_dir itself when it is a run, and its sub-folders that are runs."""
    if not os.path.isdir(runs_dir):
        raise FileNotFoundError(f"runs folder {runs_dir!r} does not exist; start `ldm ui --runs DIR` with the folder "
                                "that holds your training runs' output folders")
    subs = [os.path.join(runs_dir, n) for n in sorted(os.listdir(runs_dir))]
    return [runs_dir] * is_run(runs_dir) + [p for p in subs if is_run(p)]


def _read_json(path: str) -> dict:
    """Returns a JSON file's content, or {} while it is missing or half written."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _latest_state(folder: str) -> dict:
    from ldm.training.checkpoint import list_checkpoints

    found = list_checkpoints(folder)
    return _read_json(os.path.join(found[-1], "trainer_state.json")) if found else {}


def _jsonl_losses(path: str) -> dict[int, float]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {int(r["step"]): float(r["loss"]) for r in rows}


def read_run(folder: str) -> dict:
    """Returns {"losses": {step: loss}, "validation": [{"step", "val_loss", "val_loss_bin<k>"}], "heldout": [...]
    (fine-tuning's held-out images), "guard": [memorisation guard rows], "grids": [(step, path)]}, merging every
    source the folder has so far (later sources win for the same step)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"run folder {folder!r} does not exist")
    state, report = _latest_state(folder), _read_json(os.path.join(folder, "report.json"))
    scalars = read_tensorboard(os.path.join(folder, "logs"), TENSORBOARD_KEYS) if os.path.isdir(
        os.path.join(folder, "logs")) else []
    losses = {r["step"]: r["loss"] for r in scalars if "loss" in r}
    for source in (state.get("losses", {}), _jsonl_losses(os.path.join(folder, "losses.jsonl")), report.get("losses", {})):
        losses.update({int(k): float(v) for k, v in source.items()})
    history = {r["step"]: r for r in [*state.get("history", []), *report.get("history", [])]}
    validation = {r["step"]: {k: v for k, v in r.items() if k == "step" or k.startswith("val_loss")}
                  for r in scalars if any(k.startswith("val_loss") for k in r)}
    validation.update({s: {"step": s, **_bins(r.get("val_train", r))} for s, r in history.items()})
    heldout = [{"step": s, **_bins(r["val_heldout"])} for s, r in sorted(history.items()) if "val_heldout" in r]
    return {"losses": dict(sorted(losses.items())), "validation": [validation[s] for s in sorted(validation)],
            "heldout": heldout, "guard": [_guard_row(history[s]) for s in sorted(history) if "memorization" in history[s]],
            "grids": _grids(folder)}


def _bins(record: dict) -> dict:
    return {k: v for k, v in record.items() if k == "val_loss" or BIN_KEY.match(k)}


def _grids(folder: str) -> list[tuple[int, str]]:
    samples = os.path.join(folder, "samples")
    names = sorted(os.listdir(samples)) if os.path.isdir(samples) else []
    return sorted((int(m.group(1)), os.path.join(samples, n)) for n in names if (m := GRID.match(n)))


def _guard_row(record: dict) -> dict:
    """Returns one validation of `ldm finetune`'s memorisation guard as a flat row for the page's table."""
    memo = record["memorization"]
    ratios = memo.get("ratios") or []
    return {"step": record["step"], "train_loss": record.get("train_loss"),
            "val_train": record.get("val_train", {}).get("val_loss"),
            "val_heldout": record.get("val_heldout", {}).get("val_loss"),
            "gap": {k: round(v, 3) for k, v in record.get("gap", {}).items()},
            "nearest_ratio_min": min(ratios) if ratios else None, "near_copy_ratio": memo.get("near_copy_ratio"),
            "near_copies": memo.get("near_copies"), "warning": memo.get("warning"), "message": memo.get("message")}


def plot_run(run: dict, out_dir: str) -> dict:
    """Writes the loss curve and the per-bin validation loss of a read_run result; returns {"loss_plot",
    "validation_plot"} (None where there is nothing to plot yet)."""
    from ldm.diagnostics.plots import line_plot
    from ldm.ui.inside import PLOT_LOCK

    plots = {"loss_plot": None, "validation_plot": None}
    with PLOT_LOCK:
        if run["losses"]:
            plots["loss_plot"] = line_plot(os.path.join(out_dir, "loss.png"), list(run["losses"]),
                                           {"training loss": list(run["losses"].values())}, "step", "loss",
                                           "Training loss", logy=True, markers=False)
        if run["validation"]:
            steps = [r["step"] for r in run["validation"]]
            keys = sorted({k for r in run["validation"] for k in r if BIN_KEY.match(k)}, key=lambda k: int(k[12:]))
            series = {k.replace("val_loss_", ""): [r.get(k, float("nan")) for r in run["validation"]] for k in keys}
            held = {"held-out " + k.replace("val_loss_", ""): [r.get(k, float("nan")) for r in run["heldout"]] for k in keys}
            if run["heldout"] and len(run["heldout"]) == len(steps):
                series.update(held)
            plots["validation_plot"] = line_plot(os.path.join(out_dir, "validation.png"), steps, series, "step",
                                                 "validation loss", "Validation loss per timestep bin "
                                                 "(bin 0 = least noise)", logy=True)
    return plots
