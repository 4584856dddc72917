"""Config parsing: defaults in code, then YAML, then --key value; unknown keys and wrong types raise."""
import pytest

from ldm.training.config import parse_config, save_config, load_yaml
from ldm.training.ldm_config import TrainLDMConfig
from ldm.training.train_vae import TrainVAEConfig


def test_yaml_then_flags_override_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-4\nbatch_size: 8\nprediction_type: v_prediction\nuse_ema: false\n")
    cfg = parse_config(TrainLDMConfig, ["--config", str(path), "--batch-size", "4", "--learning_rate=3e-5",
                                        "--gradient_checkpointing", "--validation_prompts", "a red circle",
                                        "--validation-prompts", "a blue square"])
    assert (cfg.batch_size, cfg.learning_rate, cfg.prediction_type) == (4, 3e-5, "v_prediction")
    assert cfg.use_ema is False and cfg.gradient_checkpointing is True
    assert cfg.validation_prompts == ["a red circle", "a blue square"]
    assert cfg.max_steps == TrainLDMConfig().max_steps  # untouched default
    save_config(cfg, str(tmp_path / "saved.yaml"))
    assert parse_config(TrainLDMConfig, ["--config", str(tmp_path / "saved.yaml")]) == cfg  # round trip


@pytest.mark.parametrize("argv, message", [
    (["--learning_rat", "1e-4"], "unknown flag --learning_rat"),
    (["--batch_size", "four"], "batch_size' wants an integer"),
    (["--use_ema", "maybe"], "use_ema' wants true/false"),
    (["--prediction_type", "score"], "prediction_type='score' is not one of"),
    (["--resolution", "60"], "divisible by 8"),
    (["--batch_size"], "needs a value"),
])
def test_bad_flags_raise(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(TrainLDMConfig, argv)


def test_bad_yaml_raises(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("max_steps: 10\nlerning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['lerning_rate'\]"):
        parse_config(TrainLDMConfig, ["--config", str(path)])
    path.write_text("max_steps: 1.5\n")
    with pytest.raises(ValueError, match="max_steps' wants an integer"):
        parse_config(TrainLDMConfig, ["--config", str(path)])


def test_vae_config_and_repo_configs_parse():
    cfg = parse_config(TrainVAEConfig, ["--rec_loss", "l2", "--disc_start", "100"])
    assert cfg.rec_loss == "l2" and cfg.disc_start == 100
    with pytest.raises(ValueError, match="rec_loss"):
        parse_config(TrainVAEConfig, ["--rec_loss", "l3"])
    sd15 = parse_config(TrainLDMConfig, ["--config", "configs/sd15.yaml"])
    assert sd15.model == "sd15" and sd15.resolution == 512 and load_yaml("configs/sd15.yaml")
