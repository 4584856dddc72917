"""Writing diagnostics: JSON (nested, full precision) and CSV (flat rows, lists expanded per channel)."""
from __future__ import annotations

import csv
import json
import math
import os


def _clean(value):
    # JSON has no NaN/inf: write null so every reader can parse the file.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: str, data) -> str:
    """Writes data as indented JSON (NaN and inf as null) and returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_clean(data), f, indent=1)
    return path


def flatten_row(row: dict) -> dict:
    """Returns the row with each list field expanded to field_0, field_1, ... (per-channel values)."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{key}_{i}": v for i, v in enumerate(value)})
        elif not isinstance(value, dict):
            flat[key] = value
    return flat


def write_csv(path: str, rows: list[dict]) -> str:
    """Writes rows (dicts; lists expanded per element, nested dicts dropped) as CSV and returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    flat = [flatten_row(r) for r in rows]
    fields = list(dict.fromkeys(k for r in flat for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)
    return path
