"""Every numeric setting of every command has a declared range: values outside it are refused before any work,
with a message naming the setting and the range; 0 means "off" where the field says so, and a run with those
zeros completes (issue 13, item 12)."""
import dataclasses
import importlib
import math
import os
import pkgutil

import pytest

import ldm.evaluation
import ldm.training
from ldm.cli import main as ldm_main
from ldm.evaluation.guidance_sweep import SweepConfig
from ldm.evaluation.run import EvalConfig
from ldm.ranges import check_ranges, numeric_fields, parse_interval, ranges_of
from ldm.training.base_config import TrainingConfig
from ldm.training.demo import DemoConfig
from ldm.training.finetune_config import FinetuneConfig
from ldm.training.ldm_config import TrainLDMConfig
from ldm.training.train_text_encoder import TrainTextEncoderConfig
from ldm.training.train_vae import TrainVAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# Every command's settings, with what a valid instance needs besides its defaults.
CONFIGS = {TrainingConfig: {}, TrainLDMConfig: {}, TrainVAEConfig: {},
           FinetuneConfig: {"model": "base", "data": "images"},
           DemoConfig: {}, EvalConfig: {}, TrainTextEncoderConfig: {}, SweepConfig: {"reference": "digits:test@32"}}


def numeric_cases():
    """Returns (class, field) for every int/float field of every command config, read now (fields added later count)."""
    return [(cls, name) for cls in CONFIGS for name in numeric_fields(cls)]


def outside_values(spec: str, kind: type) -> list:
    """Returns values just outside the interval `spec` and those of 0, -1, 1e12 that lie outside it."""
    lo, hi, lo_closed, hi_closed = parse_interval(spec)
    step = 1 if kind is int else 1e-9
    values = []
    if math.isfinite(lo):
        values.append(lo - step if lo_closed else lo)
    if math.isfinite(hi):
        values.append(hi + step if hi_closed else hi)
    for probe in (0, -1, 1e12):
        if not (lo < probe < hi or (probe == lo and lo_closed) or (probe == hi and hi_closed)):
            values.append(probe)
    return [int(v) if kind is int else float(v) for v in values]


def field_kind(cls, name: str) -> type:
    default = getattr(cls(**CONFIGS[cls]), name)
    return int if isinstance(default, int) and not isinstance(default, bool) else float


def test_every_command_config_class_is_checked():
    """A new `...Config` dataclass in ldm.training or ldm.evaluation must be added to CONFIGS (and declare ranges)."""
    found = set()
    for package in (ldm.training, ldm.evaluation):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            found |= {obj for obj in vars(module).values()
                      if dataclasses.is_dataclass(obj) and isinstance(obj, type) and obj.__name__.endswith("Config")}
    assert found <= set(CONFIGS), f"add {sorted(c.__name__ for c in found - set(CONFIGS))} to CONFIGS"


@pytest.mark.parametrize("cls", list(CONFIGS), ids=lambda c: c.__name__)
def test_defaults_are_inside_their_ranges_and_no_range_is_stale(cls):
    cls(**CONFIGS[cls]).validate()
    stale = set(ranges_of(cls)) - set(numeric_fields(cls))
    assert not stale, f"{cls.__name__}'s ranges name fields it does not have: {sorted(stale)}"


@pytest.mark.parametrize("cls, name", numeric_cases(), ids=lambda x: getattr(x, "__name__", x))
def test_numeric_field_refuses_values_outside_its_declared_range(cls, name):
    ranges = ranges_of(cls)
    assert name in ranges, (f"{cls.__name__}.{name} has no declared range: declare it `{name}: ... = "
                            f"setting(default, \"[lo, hi]\")` (ldm.ranges; 0 included only where the field's comment "
                            f"says what 0 means)")
    spec, kind = ranges[name], field_kind(cls, name)
    base = cls(**CONFIGS[cls])
    lo, hi, lo_closed, hi_closed = parse_interval(spec)
    for inside in [getattr(base, name)] + [lo] * lo_closed + [hi] * (hi_closed and math.isfinite(hi)):
        check_ranges(dataclasses.replace(base, **{name: kind(inside) if kind is int else float(inside)}))
    values = outside_values(spec, kind)
    assert values, f"{cls.__name__}.{name}: range {spec} refuses nothing; give it finite bounds"
    for value in values:
        with pytest.raises(ValueError) as error:
            dataclasses.replace(base, **{name: value}).validate()
        assert f"{name}=" in str(error.value) and spec in str(error.value), str(error.value)


@pytest.mark.parametrize("argv, option, spec", [
    (["generate", "a red circle", "--model", "m", "--steps", "0"], "--steps", "[1, 1000]"),
    (["generate", "a red circle", "--model", "m", "--guidance-scale", "-1"], "--guidance-scale", "[0, 100]"),
    (["generate", "a red circle", "--model", "m", "--height", "7"], "--height", "[8, 8192]"),
    (["eval", "--model", "m", "--prompts", "p.txt", "--out", "o", "--steps", "0"], "--steps", "[1, 1000]"),
    (["diagnose", "timesteps", "--model", "m", "--data", "shapes:8", "--out", "o", "--bins", "0"], "--bins",
     "[1, 1000]"),
    (["cache-latents", "shapes:8", "--vae", "v", "--out", "o", "--batch-size", "0"], "--batch-size", "[1, 4096]"),
    (["prepare-data", "shapes:8", "--out", "o", "--shard-size", "-1"], "--shard-size", "[1, 1e7]"),
])
def test_cli_numeric_options_are_refused_before_any_work(argv, option, spec, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that started work would write here
    with pytest.raises(SystemExit) as exit_:
        ldm_main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {option}: " in err and f"outside the allowed range {spec}" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flag, value", [("--validation_every", "-1"), ("--max_steps", "0"), ("--learning_rate", "0"),
                                         ("--batch_size", "1000000000000"), ("--seed", "-1")])
def test_ldm_train_refuses_bad_numbers_before_any_work(flag, value, tmp_path, capsys):
    code = ldm_main(["train", flag, value, "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and not os.path.exists(tmp_path / "run")
    assert f"{flag[2:]}=" in err and "is outside the allowed range" in err, err


def test_ldm_train_completes_with_zero_meaning_off(tmp_path):
    """--validation_every 0 once died with ZeroDivisionError after the first step; 0 now turns each of these off."""
    out = tmp_path / "run"
    code = ldm_main(["train", "--model", "tiny", "--data", "shapes:16@32", "--resolution", "32", "--batch_size", "2",
                     "--max_steps", "3", "--output_dir", str(out), "--validation_every", "0", "--log_every", "0",
                     "--checkpoint_every", "0", "--checkpoints_total_limit", "0", "--max_minutes", "0",
                     "--lr_warmup_steps", "0", "--max_grad_norm", "0", "--max_token_length", "0",
                     "--val_loss_samples", "2"])
    assert code == 0
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-00000003"]  # only the final one
    assert not os.path.exists(out / "samples")  # validation off: no grid, not even at the end


def test_train_vae_checkpoint_every_zero_checkpoints_only_at_the_end(tmp_path):
    from ldm.training import train_vae

    cfg = TrainVAEConfig(model="tiny", data="shapes:8@32", resolution=32, batch_size=2, max_steps=2,
                         checkpoint_every=0, val_samples=2, output_dir=str(tmp_path / "vae"))
    cfg.validate()
    result = train_vae.main(cfg)
    assert result["step"] == 2
    assert sorted(os.listdir(tmp_path / "vae" / "checkpoints")) == ["checkpoint-00000002"]


TRAINERS = (TrainLDMConfig, TrainVAEConfig, TrainTextEncoderConfig, FinetuneConfig)


def test_settings_every_trainer_has_are_declared_once_in_the_base_config():
    """Issue 30 item 3: the settings the four trainers share live in TrainingConfig, each with its range there; a
    trainer sets one again only to change its default, range or help, never to repeat it."""
    from ldm.training.config import field_comments

    shared = set.intersection(*({f.name for f in dataclasses.fields(c)} for c in TRAINERS))
    assert shared == {f.name for f in dataclasses.fields(TrainingConfig)}, sorted(shared)
    assert len(shared) >= 16 and all(issubclass(c, TrainingConfig) for c in TRAINERS)
    base, base_ranges, base_help = TrainingConfig(), ranges_of(TrainingConfig), field_comments(TrainingConfig)
    for cls in TRAINERS:
        for name in set(vars(cls)["__annotations__"]) & shared:  # declared again in the trainer's own body
            changed = (getattr(cls(**CONFIGS[cls]), name) != getattr(base, name) or
                       ranges_of(cls).get(name) != base_ranges.get(name) or
                       field_comments(cls).get(name) != base_help.get(name))
            assert changed, f"{cls.__name__}.{name} repeats TrainingConfig's declaration: delete it"


@pytest.mark.parametrize("cls", [c for c in CONFIGS if c.__module__.startswith("ldm.training")],
                         ids=lambda c: c.__name__)
def test_training_ranges_sit_next_to_their_fields(cls):
    """No separate string table: every numeric field's range is in its own declaration (ldm.ranges.setting)."""
    assert "RANGES" not in vars(cls)
    declared = {f.name for f in dataclasses.fields(cls) if "range" in f.metadata}
    inherited = {n for n in numeric_fields(cls) if n not in declared and n in ranges_of(TrainingConfig)}
    assert set(numeric_fields(cls)) == declared | inherited
