"""One way from a config dataclass to flags (ldm.training.config): `ldm train`, `train-vae`, `finetune` and `demo`
list every field with its default in --help, accept every field as a flag, apply a YAML file then the flags, and
keep list items with commas intact. Parsing only: nothing here trains."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest

from ldm.cli import build_parser
from ldm.cli import main as ldm_main
from ldm.diffusion import BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SAMPLING, WEIGHTINGS
from ldm.training.config import config_from_args, field_comments, parse_config
from ldm.training.demo import DemoConfig
from ldm.training.finetune_config import METHODS, FinetuneConfig
from ldm.training.ldm_config import LOSSES, OPTIMIZERS, TrainLDMConfig
from ldm.training.train_text_encoder import TrainTextEncoderConfig
from ldm.training.train_vae import TrainVAEConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# command -> (config class, what a valid config needs besides the defaults)
COMMANDS = {"train": (TrainLDMConfig, {}), "train-vae": (TrainVAEConfig, {}),
            "finetune": (FinetuneConfig, {"model": "base", "data": "images"}), "demo": (DemoConfig, {}),
            "train-text-encoder": (TrainTextEncoderConfig, {})}

# String fields whose validate() accepts only some values: the test picks another allowed one.
CHOICES = {"noise_schedule": BETA_SCHEDULES, "prediction_type": PREDICTION_TYPES, "loss": LOSSES,
           "weighting": WEIGHTINGS, "mixed_precision": ("no", "fp16", "bf16"), "optimizer": OPTIMIZERS,
           "timestep_sampling": TIMESTEP_SAMPLING, "report_to": ("tensorboard", "none"), "rec_loss": ("l1", "l2"),
           "vae_rec_loss": ("l1", "l2"), "method": METHODS,
           "validation_guidance_method": ("cfg", "interval", "apg", "cfg_zero_star", "rescale")}


def shown(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else repr(value)


def base_argv(cls) -> list[str]:
    extra = dict(COMMANDS.values())[cls]
    return [a for k, v in extra.items() for a in (f"--{k}", v)]


def special_cases(cls, tmp_path) -> dict:
    """Returns {field: (value, {other field: value})} where validate() ties a field to another: the companions
    are set too (nothing is skipped)."""
    heads, trunk = tmp_path / "heads.pth", tmp_path / "vgg.pth"
    heads.write_bytes(b"x")
    trunk.write_bytes(b"x")
    vae = tmp_path / "vae"  # a VAE folder's config: validate() checks its latents fit the preset
    vae.mkdir(exist_ok=True)
    (vae / "config.json").write_text('{"latent_channels": 4, "block_out_channels": [32, 64, 64]}')
    return {
        TrainLDMConfig: {"zero_terminal_snr": (True, {"prediction_type": "v_prediction"}), "vae": (str(vae), {})},
        TrainVAEConfig: {"lpips_weights": (str(heads), {"lpips_vgg_weights": str(trunk)}),
                         "lpips_vgg_weights": (str(trunk), {"lpips_weights": str(heads)})},
        FinetuneConfig: {"num_class_images": (3, {"class_prompt": "a painting"})},
        DemoConfig: {"zero_terminal_snr": (True, {"prediction_type": "v_prediction"}), "vae": (str(vae), {})},
    }.get(cls, {})


def candidates(name: str, default) -> list:
    """Returns values other than `default` to try for a field, most telling first."""
    if isinstance(default, bool):
        return [not default]
    if isinstance(default, int):
        return [default + 8, default - 8, default + 1, default - 1]
    if isinstance(default, float):
        return [default * 2 or 0.5, default / 2, default + 0.5, default - 0.5, 0.25]
    if isinstance(default, str):
        return [c for c in CHOICES.get(name, ()) if c != default] + ["a red, round thing"]
    if isinstance(default, list):
        return [["a red, round thing", "a blue square"]]
    raise AssertionError(f"{name}: no test values for {default!r}")


def flag_argv(flag: str, value) -> list[str]:
    if isinstance(value, bool):
        return [flag] if value else [flag, "false"]
    if isinstance(value, list):
        return [a for item in value for a in (flag, item)]
    return [flag, repr(value) if isinstance(value, float) else str(value)]


def other_value(cls, name: str, tmp_path):
    """Returns (value, companions): a value for `name` unlike the default that validate() accepts."""
    base = cls(**dict(COMMANDS.values())[cls])
    special = special_cases(cls, tmp_path)
    if name in special:
        return special[name]
    for value in candidates(name, getattr(base, name)):
        try:
            dataclasses.replace(base, **{name: value}).validate()
            return value, {}
        except (ValueError, OSError):
            continue
    raise AssertionError(f"{cls.__name__}.{name}: no candidate value passes validate()")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_every_field_with_its_default(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: defaults are never wrapped
    cls = COMMANDS[command][0]
    with pytest.raises(SystemExit) as exit_:
        ldm_main([command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--config FILE.yaml" in text
    for f in dataclasses.fields(cls):
        default = getattr(cls(), f.name)
        dashed = f.name.replace("_", "-")
        assert f"--{f.name}" in text, f.name
        assert re.search(rf"--{re.escape(dashed)}(?: \[?[A-Z]+\]?)? \[default: {re.escape(shown(default))}\]",
                         text), f"{command} --help: no '--{dashed} ... [default: {shown(default)}]'"
    comments = field_comments(cls)
    assert comments and all(" ".join(c.split()) in text for c in comments.values())  # '%' in comments survives


def test_field_comments_come_from_the_source():
    comments = field_comments(TrainLDMConfig)
    assert comments["data"].startswith("any ldm.data spec")
    assert comments["aspect_buckets"].endswith("latent cache too")  # continuation lines joined
    assert "center_crop" not in comments and "model" in comments  # a section header is no field's comment
    assert field_comments(DemoConfig)["vae_steps"].startswith("with the L2 loss and cosine decay below")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_field_can_be_set_from_a_flag(command, tmp_path):
    """Each field alone (with the fields validate() ties it to), through `ldm COMMAND`'s parser and through
    parse_config (the train/*.py scripts), alternating --under_score and --dash-ed spellings."""
    cls, extra = COMMANDS[command]
    parser = build_parser([command])
    for i, f in enumerate(dataclasses.fields(cls)):
        value, companions = other_value(cls, f.name, tmp_path)
        assert value != getattr(cls(), f.name)
        argv = base_argv(cls) + [a for k, v in companions.items() for a in flag_argv(f"--{k}", v)]
        argv += flag_argv("--" + (f.name.replace("_", "-") if i % 2 else f.name), value)
        expected = cls(**{**extra, **companions, f.name: value})
        assert config_from_args(cls, parser.parse_args([command, *argv])) == expected, argv
        assert parse_config(cls, argv) == expected, argv


def test_demo_recipe_flags_arrive_in_demo_config():
    args = build_parser(["demo"]).parse_args(["demo", "--vae_steps", "3", "--ldm_steps", "4", "--guidance", "2.5",
                                              "--timestep_sampling", "logit_normal", "--canonical-captions", "false"])
    cfg = config_from_args(DemoConfig, args)
    assert cfg == dataclasses.replace(DemoConfig(), vae_steps=3, ldm_steps=4, guidance=2.5,
                                      timestep_sampling="logit_normal", canonical_captions=False)


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("guidance: 3.0\nvae_steps: 5\nldm_steps: 6\n")
    args = build_parser(["demo"]).parse_args(["demo", "--config", str(path), "--guidance", "2.5"])
    assert config_from_args(DemoConfig, args) == dataclasses.replace(DemoConfig(), guidance=2.5, vae_steps=5,
                                                                     ldm_steps=6)
    path = tmp_path / "finetune.yaml"
    path.write_text("model: base\ndata: images\nlora_rank: 16\nvalidation_prompts: ['from the yaml']\n")
    args = build_parser(["finetune"]).parse_args(["finetune", "--config", str(path), "--lora-rank", "4",
                                                  "--validation-prompts", "a red, round thing"])
    cfg = config_from_args(FinetuneConfig, args)
    assert (cfg.model, cfg.data, cfg.lora_rank) == ("base", "images", 4)
    assert cfg.validation_prompts == ["a red, round thing"]  # the flags replace the YAML's list
    assert parse_config(FinetuneConfig, ["--config", str(path)]).validation_prompts == ["from the yaml"]


def test_list_items_keep_their_commas():
    args = build_parser(["finetune"]).parse_args(["finetune", "--model", "m", "--data", "d",
                                                  "--validation-prompts", "a red, round thing",
                                                  "--validation_prompts", "a blue square, on the left"])
    assert config_from_args(FinetuneConfig, args).validation_prompts == ["a red, round thing",
                                                                         "a blue square, on the left"]
    assert parse_config(TrainLDMConfig, ["--validation_prompts", "a, b"]).validation_prompts == ["a, b"]
    assert parse_config(TrainLDMConfig, ["--validation_prompts", "x", "--validation_prompts", "[]"]) \
        .validation_prompts == []  # [] empties the list (e.g. one from the YAML file)


def test_bool_flags():
    def ema(*argv):
        return parse_config(TrainLDMConfig, list(argv)).use_ema

    assert ema() is True and ema("--use_ema", "false") is False and ema("--use-ema=no") is False
    assert ema("--use_ema", "false", "--use_ema") is True  # alone means true
    cfg = parse_config(TrainLDMConfig, ["--random_flip", "--seed", "3"])  # a bool alone before another flag
    assert cfg.random_flip is True and cfg.seed == 3
    with pytest.raises(ValueError, match="use_ema' wants true/false"):
        ema("--use_ema", "maybe")


@pytest.mark.parametrize("argv, message", [
    (["--learning-rat", "1e-4"], r"unknown flag --learning-rat; did you mean --learning-rate\?"),
    (["--seed=1", "stray"], "unexpected argument 'stray'"),
    (["--batch_size", "--seed", "1"], "flag --batch_size needs a value"),
    (["--learning_rate", "fast"], "learning_rate' wants a number"),
    (["--config"], "flag --config needs a value"),
])
def test_bad_flags_raise_naming_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(TrainLDMConfig, argv)


def test_cli_user_errors_are_messages_not_tracebacks(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that started work would write here
    assert ldm_main(["demo", "--minutes", "-1"]) == 2
    err = capsys.readouterr().err
    assert "minutes=-1.0" in err and "outside the allowed range (0, 1e5]" in err
    (tmp_path / "bad.yaml").write_text("gudance: 2\n")
    assert ldm_main(["demo", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown config key(s) ['gudance']" in capsys.readouterr().err
    assert ldm_main(["finetune", "--model", "m", "--data", "d", "--lora-rank", "big"]) == 2
    assert "lora_rank' wants an integer" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml"]
    with pytest.raises(SystemExit):  # argparse's own message and usage
        ldm_main(["train", "--learning_rat", "1e-4"])
    assert "unrecognized arguments: --learning_rat" in capsys.readouterr().err


def test_demo_runs_run_demo_with_the_config_and_cpu_env(monkeypatch):
    import ldm.training.demo

    seen = []
    monkeypatch.setattr(ldm.training.demo, "run_demo", seen.append)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")
    assert ldm_main(["demo", "--device", "cpu", "--ldm-steps", "4"]) == 0
    assert seen == [dataclasses.replace(DemoConfig(), device="cpu", ldm_steps=4)]
    assert os.environ["ACCELERATE_USE_CPU"] == "true"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")
    assert ldm_main(["demo", "--device", "cuda"]) == 0 and os.environ["ACCELERATE_USE_CPU"] == "false"


def test_finetune_prints_the_memorization_warning(monkeypatch, capsys):
    import ldm.training.finetune

    seen = []

    def fake_main(cfg):
        seen.append(cfg)
        return {"memorization_warning": True, "warnings": ["first", "samples copy the training images"]}

    monkeypatch.setattr(ldm.training.finetune, "main", fake_main)
    assert ldm_main(["finetune", "--model", "m", "--data", "d", "--method", "full"]) == 0
    assert seen == [FinetuneConfig(model="m", data="d", method="full")]
    assert "finetune: samples copy the training images" in capsys.readouterr().out


@pytest.mark.slow
def test_script_help_lists_every_field():
    env = {**os.environ, "COLUMNS": "2000", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, os.path.join(REPO, "train", "train_ldm.py"), "--help"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for f in dataclasses.fields(TrainLDMConfig):
        assert f"--{f.name}" in text and f"[default: {shown(getattr(TrainLDMConfig(), f.name))}]" in text, f.name
