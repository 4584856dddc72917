"""PNG metadata: the "parameters" text in the AUTOMATIC1111 web UI's format, and our JSON "ldm" chunk."""
import json
import re

import PIL.Image
import pytest

from ldm.images import WEBUI_NAMES, read_png_params, save_png
from ldm.pipelines.schedulers import SCHEDULERS

# One "Key: value" pair of the last line: a key of word characters, spaces, "-" or "/", then a value that is
# either double-quoted (JSON escapes) or runs to the next comma.
PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
NEGATIVE = "Negative prompt: "


def parse_infotext(text: str) -> tuple[str, str | None, dict]:
    """Returns (prompt, negative prompt or None, {key: value}), read as the format is published: the last line
    holds comma-separated "Key: value" pairs (quoted values allowed); a line starting with "Negative prompt: "
    starts the negative prompt; everything before it is the prompt."""
    *lines, last = text.split("\n")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE) and not in_negative:
            in_negative, line = True, line[len(NEGATIVE):]
        (negative if in_negative else prompt).append(line)
    pairs = {key: json.loads(value) if value.startswith('"') else value for key, value in PAIR.findall(last)}
    return "\n".join(prompt), ("\n".join(negative) if in_negative else None), pairs


def _params(**overrides) -> dict:
    """Parameters as `ldm generate` records them."""
    return {"prompt": "a red circle, on the left\nand a blue square", "negative_prompt": "blurry, dark",
            "model": "/models/my-model, v2: final", "scheduler": "euler_a", "steps": 20, "guidance_scale": 7.5,
            "guidance_rescale": 0.0, "eta": 0.0, "clip_skip": 2, "height": 48, "width": 64, "device": "cpu",
            "dtype": "float32", "ldm_version": "0.1.0", "seed": 1234, "seconds": 0.25, **overrides}


def test_parameters_round_trip_through_the_webui_format(tmp_path):
    params = _params()
    path = save_png(PIL.Image.new("RGB", (64, 48)), str(tmp_path / "a.png"), params)
    text = PIL.Image.open(path).text["parameters"]
    prompt, negative, pairs = parse_infotext(text)
    assert (prompt, negative) == (params["prompt"], params["negative_prompt"])
    assert list(pairs)[:6] == ["Steps", "Sampler", "CFG scale", "Seed", "Size", "Model"]
    assert pairs["Steps"] == "20" and pairs["Sampler"] == "Euler a" and pairs["CFG scale"] == "7.5"
    assert pairs["Seed"] == "1234" and pairs["Size"] == "64x48"  # width x height
    assert pairs["Model"] == "my-model, v2: final" and pairs["Clip skip"] == "2"
    assert text.splitlines()[-1].startswith("Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1234, Size: 64x48, ")
    assert read_png_params(path) == params  # our own JSON chunk, unchanged


def test_no_negative_prompt_line_without_one(tmp_path):
    path = save_png(PIL.Image.new("RGB", (8, 8)), str(tmp_path / "b.png"),
                    _params(prompt="one line", negative_prompt=None, clip_skip=None))
    text = PIL.Image.open(path).text["parameters"]
    assert NEGATIVE.strip() not in text and "Clip skip" not in text
    prompt, negative, pairs = parse_infotext(text)
    assert (prompt, negative, pairs["Steps"]) == ("one line", None, "20")


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_sampler_has_a_webui_name(tmp_path, name):
    path = save_png(PIL.Image.new("RGB", (8, 8)), str(tmp_path / "c.png"), _params(scheduler=name))
    assert parse_infotext(PIL.Image.open(path).text["parameters"])[2]["Sampler"] == WEBUI_NAMES[name]
