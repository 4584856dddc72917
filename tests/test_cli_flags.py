"""One way from a config dataclass to flags (ldm.training.config): `ldm train`, `train-vae`, `finetune` and `demo`
list every field with its default in --help, accept every field as a flag, apply a YAML file then the flags, and
keep list items with commas intact. And one convention for every command's flags (ldm/flags.py): dashed, the
underscore spelling a hidden alias, one name per concept, former names deprecated aliases, a misspelt flag refused
with the command's usage. Parsing only: nothing here trains."""
import argparse
import dataclasses
import os
import re
import subprocess
import sys

import pytest

from ldm.cli import COMMANDS as COMMANDS_ALL
from ldm.cli import build_parser
from ldm.cli import main as ldm_main
from ldm.diffusion import BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SAMPLING, WEIGHTINGS
from ldm.flags import underscored
from ldm.training.config import config_from_args, field_comments, flag_name, parse_config
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
           "vae_rec_loss": ("l1", "l2"), "method": METHODS, "lora_type": ("lora", "locon", "loha", "lokr", "dora"),
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
        FinetuneConfig: {"num_class_images": (3, {"class_prompt": "a painting"}),
                         "lora_conv_rank": (4, {"lora_type": "locon"}), "lora_conv_alpha": (2.0, {"lora_type": "loha"})},
        DemoConfig: {"zero_terminal_snr": (True, {"prediction_type": "v_prediction"}), "vae": (str(vae), {})},
    }.get(cls, {}) | (MASK_SETTINGS if cls in (TrainLDMConfig, FinetuneConfig) else {})


MASK_SETTINGS = {"masked_loss_floor": (0.5, {"masked_loss": True}), "mask_dir": ("masks", {"masked_loss": True})}


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
        return [flag, *value]
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
        flag = flag_name(cls, f.name)
        assert re.search(rf"{re.escape(flag)}(?: \[?[A-Z]+\]?(?: \[[A-Z]+ \.\.\.\])?)? \[default: {re.escape(shown(default))}\]",
                         text), f"{command} --help: no '{flag} ... [default: {shown(default)}]'"
        if "-" in flag[2:]:  # the underscore spelling parses (test_every_field_can_be_set_from_a_flag) but is hidden
            assert f"{underscored(flag)} " not in text, flag
        assert f"--{f.name} " not in text or f"--{f.name}" == flag, f.name  # a former flag is hidden too
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
    parse_config (the train/*.py scripts), alternating the --dash-ed flag and its --under_score spelling."""
    cls, extra = COMMANDS[command]
    parser = build_parser([command])
    for i, f in enumerate(dataclasses.fields(cls)):
        value, companions = other_value(cls, f.name, tmp_path)
        assert value != getattr(cls(), f.name)
        argv = base_argv(cls) + [a for k, v in companions.items() for a in flag_argv(flag_name(cls, k), v)]
        argv += flag_argv(underscored(flag_name(cls, f.name)) if i % 2 else flag_name(cls, f.name), value)
        expected = cls(**{**extra, **companions, f.name: value})
        assert config_from_args(cls, parser.parse_args([command, *argv])) == expected, argv
        assert parse_config(cls, argv) == expected, argv


def test_demo_recipe_flags_arrive_in_demo_config():
    args = build_parser(["demo"]).parse_args(["demo", "--vae_steps", "3", "--ldm-steps", "4", "--guidance-scale", "2.5",
                                              "--timestep_sampling", "logit_normal", "--canonical-captions", "false"])
    cfg = config_from_args(DemoConfig, args)
    assert cfg == dataclasses.replace(DemoConfig(), vae_steps=3, ldm_steps=4, guidance=2.5,
                                      timestep_sampling="logit_normal", canonical_captions=False)


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("guidance: 3.0\nvae_steps: 5\nldm_steps: 6\n")
    args = build_parser(["demo"]).parse_args(["demo", "--config", str(path), "--guidance-scale", "2.5"])
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
    spaced = ["--validation-prompts", "a red, round thing", "a blue square", "--seed", "3"]  # the one list form
    assert parse_config(TrainLDMConfig, spaced).validation_prompts == ["a red, round thing", "a blue square"]
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
    (["--batch_size", "--seed", "1"], "flag --batch-size needs a value"),
    (["--validation-prompts", "--seed", "1"], "flag --validation-prompts needs a value"),
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
        flag = flag_name(TrainLDMConfig, f.name)
        assert f"{flag} " in text and f"[default: {shown(getattr(TrainLDMConfig(), f.name))}]" in text, f.name


# --- one convention for every command's flags (issue 30, item 4) ---------------------------------------------------

# Every renamed flag, per command: former flag -> canonical flag (the former one still parses, with a message).
RENAMED = {
    "train": {"--output_dir": "--out", "--output-dir": "--out", "--validation_guidance": "--validation-guidance-scale",
              "--val_loss_samples": "--num-validation-loss-images", "--val_loss_bins": "--validation-loss-bins"},
    "train-vae": {"--output_dir": "--out", "--output-dir": "--out", "--val_samples": "--num-validation-images"},
    "train-text-encoder": {"--output_dir": "--out", "--output-dir": "--out",
                           "--val_samples": "--num-validation-images"},
    "finetune": {"--validation_sample_steps": "--validation-steps", "--validation-sample-steps": "--validation-steps",
                 "--validation_guidance": "--validation-guidance-scale", "--class_sample_steps": "--class-image-steps",
                 "--val_loss_bins": "--validation-loss-bins"},
    "demo": {"--guidance": "--guidance-scale", "--sample_steps": "--steps", "--sample-steps": "--steps",
             "--preset": "--model"},
    "create-model": {"--preset": "--model"},
    "merge-lora": {"--scale": "--lora-scale"},
    "eval": {"--inception-weights": "--feature-weights"},
    "eval-guidance": {"--methods": "--guidance-methods", "--scales": "--guidance-scales",
                      "--interval": "--guidance-interval", "--rescale": "--guidance-rescale",
                      "--grid-scale": "--grid-guidance-scale"},
    "diagnose schedule": {"--beta-schedule": "--noise-schedule"},
}

# Concept -> its one flag; every other spelling in the list must not be a visible flag of any command.
CONCEPTS = {
    "output folder": ("--out", ["--output-dir", "--output", "--outdir", "--out-dir"]),
    "model or preset": ("--model", ["--preset", "--model-dir", "--pretrained"]),
    "sampling steps": ("--steps", ["--sample-steps", "--num-inference-steps", "--inference-steps"]),
    "validation sampling steps": ("--validation-steps", ["--validation-sample-steps", "--val-steps"]),
    "class image sampling steps": ("--class-image-steps", ["--class-sample-steps"]),
    "guidance scale": ("--guidance-scale", ["--guidance", "--cfg-scale", "--cfg"]),
    "validation guidance scale": ("--validation-guidance-scale", ["--validation-guidance", "--val-guidance"]),
    "guidance scales swept": ("--guidance-scales", ["--scales"]),
    "guidance methods swept": ("--guidance-methods", ["--methods"]),
    "guidance interval": ("--guidance-interval", ["--interval"]),
    "guidance rescale": ("--guidance-rescale", ["--rescale"]),
    "LoRA strength": ("--lora-scale", ["--scale"]),
    "noise schedule": ("--noise-schedule", ["--beta-schedule"]),
    "feature extractor weights": ("--feature-weights", ["--inception-weights"]),
}

# What each command needs to parse at all (required flags and positionals), as argv after the command's name.
REQUIRED = {
    "generate": ["a red circle", "--model", "m"], "create-model": ["--out", "o"],
    "merge-lora": ["--model", "m", "--lora", "l", "--out", "o"], "convert": ["--model", "m", "--out", "o"], "prepare-data": ["shapes:8", "--out", "o"],
    "cache-latents": ["shapes:8", "--vae", "v", "--out", "o"],
    "diagnose timesteps": ["--model", "m", "--data", "d", "--out", "o"],
    "diagnose sampling": ["--model", "m", "--prompt", "p", "--out", "o"], "diagnose schedule": ["--out", "o"],
    "diagnose training": ["--history", "h", "--out", "o"], "diagnose all": ["--model", "m", "--out", "o"],
    "eval": ["--model", "m", "--prompts", "p", "--out", "o"],
    "eval-guidance": ["--model", "m", "--prompts", "p", "--reference", "r", "--out", "o"],
}


def command_parsers() -> dict:
    """Returns {'generate': parser, ..., 'diagnose timesteps': parser, ...}: every command's own parser."""
    found = {}

    def walk(parser, path):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for action in subs:
            for name, child in action.choices.items():
                walk(child, f"{path} {name}".strip())
        if not subs:
            found[path] = parser

    for command in COMMANDS_ALL:
        top = build_parser([command])
        sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        walk(sub.choices[command], command)
    return found


def visible_flags(parser) -> list[str]:
    return [s for a in parser._actions if a.help is not argparse.SUPPRESS for s in a.option_strings
            if s.startswith("--") and s != "--help"]


def sample_argv(action) -> list[str]:
    """Returns a value the option `action` accepts, as argv after its flag."""
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(next(iter(action.choices)))] * (action.nargs if isinstance(action.nargs, int) else 1)
    text = "x"
    for candidate in ("8", "1", "0.5", "x"):  # the first that the option's type (and range) accepts
        try:
            if action.type is None or action.type(candidate) is not None:
                text = candidate
                break
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            continue
    return [text] * (action.nargs if isinstance(action.nargs, int) else 1)


def parse(command: str, argv: list[str]):
    return build_parser([command.split()[0]]).parse_args([*command.split(), *REQUIRED.get(command, []), *argv])


def test_every_command_is_walked():
    assert set(command_parsers()) == {*COMMANDS_ALL, *REQUIRED} - {"diagnose"}


@pytest.mark.parametrize("command", sorted(command_parsers()))
def test_flags_are_dashed_and_both_spellings_parse_alike(command):
    """No visible flag has an underscore; every flag's underscore spelling is the same option, hidden."""
    parser = command_parsers()[command]
    for flag in visible_flags(parser):
        assert "_" not in flag, f"ldm {command}: {flag} is not dashed"
        assert not flag.startswith("--val-"), f"ldm {command}: {flag}: the prefix is --validation-"
        action = parser._option_string_actions[flag]
        assert parser._option_string_actions.get(underscored(flag)) is action, f"ldm {command}: {underscored(flag)}"
        if action.dest in ("help", "version"):
            continue
        value = sample_argv(action)
        dashed_ns, under_ns = parse(command, [flag, *value]), parse(command, [underscored(flag), *value])
        assert vars(dashed_ns) == vars(under_ns), f"ldm {command}: {flag} and {underscored(flag)} differ"


def test_no_concept_is_spelled_two_ways_across_commands():
    """The synonym table above, and one flag per destination: a setting that two commands share has one name."""
    parsers = command_parsers()
    flags_of = {command: set(visible_flags(p)) for command, p in parsers.items()}
    for concept, (canonical, synonyms) in CONCEPTS.items():
        users = [c for c, flags in flags_of.items() if canonical in flags]
        assert users, f"{concept}: no command has {canonical}"
        for command, flags in flags_of.items():
            assert not flags & set(synonyms), f"ldm {command}: {sorted(flags & set(synonyms))} for {concept}: " \
                                              f"write {canonical}"
    names = {}  # destination -> {visible flag: commands}
    for command, parser in parsers.items():
        for action in parser._actions:
            long = [s for s in action.option_strings if s.startswith("--")]
            if long and action.help is not argparse.SUPPRESS:
                names.setdefault(action.dest, {}).setdefault(long[0], []).append(command)
    two_ways = {dest: spellings for dest, spellings in names.items() if len(spellings) > 1}
    assert not two_ways, f"one setting, several flags: {two_ways}"


@pytest.mark.parametrize("command, old, new", [(c, o, n) for c, table in RENAMED.items() for o, n in table.items()])
def test_former_flags_still_work_and_say_they_are_deprecated(command, old, new, capsys):
    parser = command_parsers()[command]
    assert old not in visible_flags(parser) and new in visible_flags(parser)
    value = sample_argv(parser._option_string_actions[new])
    assert vars(parse(command, [old, *value])) == vars(parse(command, [new, *value]))
    assert f"{old} is deprecated, use {new}" in capsys.readouterr().err
    parse(command, [new, *value])
    assert "deprecated" not in capsys.readouterr().err


@pytest.mark.parametrize("command, cls", [("train", TrainLDMConfig), ("train-vae", TrainVAEConfig),
                                          ("train-text-encoder", TrainTextEncoderConfig), ("finetune", FinetuneConfig)])
def test_train_scripts_take_the_same_flags_as_their_commands(command, cls, capsys):
    """train/*.py (accelerate launch) parse with parse_config: the same flags, aliases and deprecations."""
    from ldm.training.config import ConfigArgumentParser, add_config_arguments

    script = ConfigArgumentParser(prog="train/x.py")
    add_config_arguments(script, cls)
    ours = command_parsers()[command]
    assert set(script._option_string_actions) == set(ours._option_string_actions)
    assert visible_flags(script) == visible_flags(ours)
    for old, new in RENAMED.get(command, {}).items():
        value = "7" if old.endswith(("steps", "samples", "bins")) else ("3.5" if "guidance" in old else "runs/x")
        extra = base_argv(cls)
        assert parse_config(cls, [*extra, old, value]) == parse_config(cls, [*extra, new, value])
        assert f"{old} is deprecated, use {new}" in capsys.readouterr().err


def test_output_dir_lands_in_the_output_dir_field_and_yaml_key(tmp_path, capsys):
    cfg = parse_config(TrainLDMConfig, ["--out", str(tmp_path / "a")])
    assert cfg.output_dir == str(tmp_path / "a")
    assert parse_config(TrainLDMConfig, ["--output_dir", str(tmp_path / "a")]) == cfg
    assert "train_ldm" not in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text(f"output_dir: {tmp_path / 'b'}\n")  # YAML keys stay the field names
    assert parse_config(TrainLDMConfig, ["--config", str(tmp_path / "c.yaml")]).output_dir == str(tmp_path / "b")


def test_generate_takes_the_underscore_spelling():
    args = parse("generate", ["--guidance_scale", "5", "--num_images", "2", "--negative_prompt", "blur"])
    assert (args.guidance_scale, args.num_images, args.negative_prompt) == (5.0, 2, "blur")


def test_list_flags_are_space_separated_and_take_the_former_commas(capsys):
    args = parse("diagnose sampling", ["--schedulers", "ddim", "lms"])
    assert args.schedulers == ["ddim", "lms"] and "deprecated" not in capsys.readouterr().err
    args = parse("diagnose schedule", ["--schedulers", "ddim,lms", "--noise-schedule", "linear", "scaled_linear"])
    assert args.schedulers == ["ddim", "lms"] and args.beta_schedule == ["linear", "scaled_linear"]
    assert "--schedulers a,b is deprecated, write the items space-separated: --schedulers ddim lms" in \
        capsys.readouterr().err
    args = parse("eval-guidance", ["--guidance-scales", "1", "3.5", "--guidance-methods", "cfg", "apg"])
    assert args.scales == [1.0, 3.5] and args.methods == ["cfg", "apg"]


@pytest.mark.parametrize("argv, usage, flag, nearest", [
    (["generate", "a cat", "--model", "m", "--guidence-scale", "5"], "ldm generate", "--guidence-scale",
     "--guidance-scale"),
    (["generate", "a cat", "--model", "m", "--guidence_scale", "5"], "ldm generate", "--guidence_scale",
     "--guidance-scale"),
    (["train", "--learning_rat", "1e-4"], "ldm train", "--learning_rat", "--learning-rate"),
    (["diagnose", "timesteps", "--model", "m", "--data", "d", "--out", "o", "--per-bins"], "ldm diagnose timesteps",
     "--per-bins", "--per-bin"),
    (["create-model", "--out", "o", "--preset-name", "tiny"], "ldm create-model", "--preset-name", None),
])
def test_a_misspelt_flag_prints_the_commands_usage(argv, usage, flag, nearest, capsys):
    with pytest.raises(SystemExit) as exit_:
        ldm_main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith(f"usage: {usage} "), err
    assert f"{usage}: error: unrecognized arguments: {flag}" in err, err
    assert (f"did you mean {nearest}?" in err) if nearest else "did you mean" not in err, err


def test_abbreviations_are_refused_everywhere(capsys):
    with pytest.raises(SystemExit):
        parse("generate", ["--guidance", "5"])  # once an abbreviation of --guidance-scale
    assert "unrecognized arguments: --guidance" in capsys.readouterr().err
