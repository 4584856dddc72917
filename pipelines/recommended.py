"""A model folder's recommended guidance: guidance.json, written by `ldm eval-guidance --save`, read by
Pipeline.from_pretrained and `ldm generate`.

    {"method": "interval", "guidance_scale": 3.0, "params": {"guidance_interval": [80, 800]},
     "measured": {...}, "sweep": {...}, "date": "..."}

"params" holds Pipeline.__call__ keywords (CALL_DEFAULTS' keys), so a call uses them as they are. A call that gives
no guidance_scale takes the recommended scale and params; one that gives a scale takes neither, and without
guidance.json the scale is DEFAULT_GUIDANCE_SCALE, as before the file existed.
"""
from __future__ import annotations

import json
import numbers
import os

GUIDANCE_FILE = "guidance.json"
DEFAULT_GUIDANCE_SCALE = 7.5
RECOMMENDED_SOURCE = f"recommended ({GUIDANCE_FILE})"
# Pipeline.__call__'s guidance-method keywords and their defaults (every method off)
CALL_DEFAULTS = {"guidance_rescale": 0.0, "guidance_interval": None, "apg": None, "cfg_zero_star": False,
                 "cfg_zero_init_steps": 0}


def check_recommended(record, where: str) -> dict:
    """Returns a guidance.json record after checking the fields a pipeline call reads; raises ValueError naming
    `where` and the field otherwise."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} must hold a JSON object, not {type(record).__name__}")
    scale = record.get("guidance_scale")
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not 0 <= scale <= 100:
        raise ValueError(f"{where}: guidance_scale={scale!r} must be a number in [0, 100]; rewrite the file with "
                         "`ldm eval-guidance --save` or delete it")
    params = record.get("params", {})
    unknown = sorted(set(params) - set(CALL_DEFAULTS)) if isinstance(params, dict) else None
    if unknown is None or unknown:
        raise ValueError(f"{where}: params must be an object with keys among {', '.join(CALL_DEFAULTS)}; "
                         f"got {params!r}")
    return record


def read_recommended_guidance(folder: str | os.PathLike) -> dict | None:
    """Returns the folder's guidance.json record (checked), or None when there is none."""
    path = os.path.join(str(folder), GUIDANCE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); rewrite it with `ldm eval-guidance --save` or "
                             "delete it") from e
    return check_recommended(record, path)


def resolve_guidance(recommended: dict | None, guidance_scale: float | None, methods: dict) -> tuple[float, dict]:
    """Returns (guidance_scale, methods) for one call. methods: the call's guidance-method keywords (any of
    CALL_DEFAULTS' keys). An explicit scale wins and keeps the call's methods as they are; without one, the
    recommended scale is used and its params fill every method keyword the call left at its default (no
    recommendation: DEFAULT_GUIDANCE_SCALE, methods unchanged)."""
    if guidance_scale is not None:
        return guidance_scale, methods
    if recommended is None:
        return DEFAULT_GUIDANCE_SCALE, methods
    params = recommended.get("params", {})
    filled = {k: (params[k] if k in params and v == CALL_DEFAULTS[k] else v) for k, v in methods.items()}
    return float(recommended["guidance_scale"]), filled
