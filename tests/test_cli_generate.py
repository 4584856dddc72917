"""The `ldm` command: help, generate (PNG metadata, reproducible seeds), create-model, clear errors."""
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from ldm.cli import COMMANDS, main
from ldm.images import read_png_params


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "ldm.cli", "--help"], capture_output=True, text=True, check=True).stdout
    from ldm.cli import available_commands

    for name in available_commands():
        assert name in out
    assert {"generate", "create-model"} <= set(available_commands()) <= set(COMMANDS)


@pytest.mark.slow
def test_generate_writes_pngs_with_parameters_and_reproducible_seeds(tiny_folder, tmp_path, capsys):
    args = ["generate", "a red circle on the left", "--model", tiny_folder, "--steps", "3", "--num-images", "2",
            "--seed", "11", "--scheduler", "ddim", "--negative-prompt", "blue", "--guidance-scale", "5",
            "--out", str(tmp_path / "out")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    paths = sorted((tmp_path / "out").glob("*.png"))
    assert len(paths) == 2 and all(f"wrote {p}" in printed for p in paths)
    params = read_png_params(str(paths[1]))
    assert params["prompt"] == "a red circle on the left" and params["negative_prompt"] == "blue"
    assert (params["seed"], params["steps"], params["scheduler"], params["guidance_scale"]) == (12, 3, "ddim", 5.0)
    assert {"model", "height", "width", "device", "dtype", "eta", "guidance_rescale", "ldm_version"} <= set(params)
    webui = PIL.Image.open(paths[1]).text["parameters"].splitlines()  # the web UIs' format (test_png_metadata.py)
    assert webui[:2] == ["a red circle on the left", "Negative prompt: blue"]
    assert webui[2].startswith("Steps: 3, Sampler: DDIM, CFG scale: 5.0, Seed: 12, Size: 64x64, Model: tiny, ")

    # The second image alone, from its own recorded seed, is the same picture (batch 1 vs 2 kernels differ by
    # float rounding only: at most one 8-bit level on a few pixels).
    again = tmp_path / "again.png"
    assert main(args[:-6] + ["--num-images", "1", "--seed", "12", "--negative-prompt", "blue", "--guidance-scale",
                             "5", "--out", str(again)]) == 0
    diff = np.abs(np.asarray(PIL.Image.open(again), dtype=int) - np.asarray(PIL.Image.open(paths[1]), dtype=int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.slow
def test_create_model_then_generate(tmp_path):
    assert main(["create-model", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    assert main(["generate", "x", "--model", str(tmp_path / "m"), "--steps", "1", "--out", str(tmp_path / "a.png"),
                 "--height", "32", "--width", "48"]) == 0
    assert PIL.Image.open(tmp_path / "a.png").size == (48, 32)


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--model", "/no/such/model"], "does not exist"),
    (["generate", "x", "--model", "{tiny}", "--height", "30"], "height=30 is not a positive multiple of 8"),
    (["create-model", "--preset", "huge", "--out", "/tmp/x"], "unknown model preset 'huge'"),
])
def test_errors_are_one_clear_line(tiny_folder, capsys, argv, message):
    argv = [a.replace("{tiny}", tiny_folder) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [  # refused by argparse (ldm.ranges.int_in) before loading
    (["--steps", "0"], "argument --steps: 0 is outside the allowed range [1, 1000]"),
    (["--num-images", "0"], "argument --num-images: 0 is outside the allowed range [1, 100000]"),
])
def test_out_of_range_numbers_are_refused_before_loading(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "x", "--model", "/no/such/model", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_unknown_scheduler_flag_lists_choices(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "x", "--model", "m", "--scheduler", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def _generate_parser():
    import argparse

    from ldm.cli.generate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def _accepts(convert, value) -> bool:
    import argparse

    try:
        convert(repr(value))
        return True
    except argparse.ArgumentTypeError:
        return False


def test_every_generate_flag_fills_a_field_of_the_generate_request():
    import dataclasses

    from ldm.pipelines.generate import GenerateRequest

    dests = {a.dest for a in _generate_parser()._actions if a.dest != "help"}
    assert dests == {f.name for f in dataclasses.fields(GenerateRequest)}


def test_generate_flags_take_the_generate_requests_ranges():
    """The web page checks its fields with GenerateRequest.RANGES: each flag must allow exactly the same numbers
    (probed at and just past both ends of each interval)."""
    from ldm.pipelines.generate import GenerateRequest
    from ldm.ranges import parse_interval

    checked = []
    for action in _generate_parser()._actions:
        spec = GenerateRequest.RANGES.get(action.dest) or (
            GenerateRequest.INTERVAL_RANGE if action.dest == "guidance_interval" else None)
        if action.type is None or spec is None:
            continue
        lo, hi, lo_closed, hi_closed = parse_interval(spec)
        step = 1 if action.type.__name__ == "int" else 1e-6
        kind = int if step == 1 else float
        for end, closed, outward in ((lo, lo_closed, -step), (hi, hi_closed, step)):
            if abs(end) != float("inf"):
                assert _accepts(action.type, kind(end)) == closed, (action.dest, spec, end)
                assert not _accepts(action.type, kind(end) + outward), (action.dest, spec, end + outward)
                assert _accepts(action.type, kind(end) - outward) or lo == hi, (action.dest, spec)
        checked.append(action.dest)
    numeric = set(GenerateRequest.RANGES) | {"guidance_interval"}
    assert set(checked) == numeric, numeric - set(checked)


@pytest.mark.parametrize("field,value,words", [
    ("steps", 0, "steps (--steps): 0 is outside the allowed range [1, 1000]"),
    ("guidance_scale", -1.0, "--guidance-scale"), ("apg_momentum", 1.0, "--apg-momentum"),
    ("scheduler", "nope", "scheduler (--scheduler): 'nope' is not one of"), ("prompt", " ", "prompt: empty"),
    ("apg_eta", 0.5, "--apg-eta set adaptive projected guidance, which is off; add --apg"),
    ("guidance_interval", (-1.0, 5.0), "--guidance-interval")])
def test_a_generate_request_refuses_a_bad_field_naming_it_and_its_flag(field, value, words):
    from ldm.pipelines.generate import GenerateRequest, prepare

    request = GenerateRequest(**{"prompt": "a red circle", "model": "/no/such/model", field: value})
    with pytest.raises(ValueError, match=re.escape(words)):
        prepare(request)  # before any model is read
