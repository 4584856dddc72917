"""configs/accelerate/*.yaml: each is read by Accelerate's own loader and launch checks, picks the launcher its
comment promises, and cpu_2proc.yaml runs the docs' command (docs/src/guides/scale-out.md) on two ranks; FSDP: the
GPU and CPU configs differ only where the device requires, what FSDP refuses (tests/test_fsdp.py runs it)."""
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import types

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, constants
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from ldm.training import train_ldm
from ldm.training.ldm_config import TrainLDMConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "accelerate", "*.yaml")))
# file -> (distributed type, launcher Accelerate's `launch_command` picks for it, processes in all)
EXPECTED = {"cpu_2proc.yaml": ("MULTI_GPU", "torchrun", 2), "cpu_2node.yaml": ("MULTI_GPU", "torchrun", 2),
            "single_gpu.yaml": ("NO", "simple", 1),
            "multi_gpu.yaml": ("MULTI_GPU", "torchrun", 8), "multi_node.yaml": ("MULTI_GPU", "torchrun", 32),
            "deepspeed_zero2.yaml": ("DEEPSPEED", "deepspeed", 8),
            "deepspeed_zero2_cpu.yaml": ("DEEPSPEED", "deepspeed", 2), "fsdp.yaml": ("FSDP", "torchrun", 8),
            "fsdp_cpu_2proc.yaml": ("FSDP", "torchrun", 2)}


def launch_args(name: str):
    """Returns (launch args, file config) after Accelerate's own checks of `accelerate launch --config_file`."""
    path = os.path.join(REPO, "configs", "accelerate", name)
    args = launch_command_parser().parse_args(["--config_file", path, "train/train_ldm.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def launcher(args) -> str:
    """Returns the launcher accelerate.commands.launch.launch_command would call for these args."""
    if args.use_deepspeed and not args.cpu:
        return "deepspeed"
    if (args.use_fsdp or args.multi_gpu) and not args.cpu:
        return "torchrun"
    return "simple"  # one process, unless an MPI hostfile is given


def test_every_config_file_is_covered():
    assert sorted(EXPECTED) == CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_picks_the_promised_launcher(name):
    config = load_config_from_file(os.path.join(REPO, "configs", "accelerate", name))  # unknown keys raise
    args, _ = launch_args(name)
    distributed_type, expected_launcher, processes = EXPECTED[name]
    assert config.distributed_type == DistributedType(distributed_type)
    assert launcher(args) == expected_launcher and args.num_processes == processes
    assert args.mixed_precision in ("no", "bf16")


@pytest.mark.parametrize("name", ["fsdp.yaml", "fsdp_cpu_2proc.yaml"])
def test_fsdp_fields_build_accelerates_fsdp2_plugin(name, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    args, _ = launch_args(name)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] in constants.FSDP_AUTO_WRAP_POLICY
    assert env["FSDP_STATE_DICT_TYPE"] in constants.FSDP_STATE_DICT_TYPE
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher sets; raises on bad ones
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    # fully_shard refuses ModuleLists, which size-based wrapping picks in a UNet: one unit per block instead
    assert plugin.transformer_cls_names_to_wrap == ["ResnetBlock2D", "Transformer2DModel"]


def test_fsdp_cpu_config_differs_from_the_gpu_one_only_where_the_device_requires():
    def load(name):
        with open(os.path.join(REPO, "configs", "accelerate", name), encoding="utf-8") as f:
            return yaml.safe_load(f)

    gpu, cpu = load("fsdp.yaml"), load("fsdp_cpu_2proc.yaml")
    differ = {key for key in gpu.keys() | cpu.keys() if gpu.get(key) != cpu.get(key)}
    assert differ == {"num_processes", "mixed_precision", "main_process_port"}, differ
    assert cpu["mixed_precision"] == "no" and cpu["num_processes"] == 2


def test_deepspeed_fields_build_accelerates_plugin_and_match_the_sd15_config(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    args, defaults = launch_args("deepspeed_zero2.yaml")
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* variables the launcher sets
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 2
    with open(os.path.join(REPO, "configs", "sd15.yaml"), encoding="utf-8") as f:
        sd15 = yaml.safe_load(f)
    # the file's comment: its gradient_accumulation_steps must equal the training config's
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == sd15["gradient_accumulation_steps"]


SCALE_OUT = os.path.join(REPO, "docs", "src", "guides", "scale-out.md")  # the docs' Scale out guide


def readme_command(config_name: str) -> list[str]:
    """Returns the Scale out guide's `accelerate launch --config_file configs/accelerate/<name> ...` command as argv."""
    with open(SCALE_OUT, encoding="utf-8") as f:
        text = f.read()
    match = re.search(rf"^accelerate launch --config_file configs/accelerate/{re.escape(config_name)} (?:.*\\\n)*.*$",
                      text, flags=re.M)
    assert match, f"{SCALE_OUT} has no `accelerate launch` line for {config_name}"
    return shlex.split(match.group(0).replace("\\\n", " "), comments=True)


@pytest.mark.slow
def test_cpu_2proc_config_runs_the_readme_command_on_two_ranks(tmp_path):
    argv = readme_command("cpu_2proc.yaml")
    assert argv[:2] == ["accelerate", "launch"]
    argv[argv.index("--out") + 1] = str(tmp_path / "two-ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *argv[2:]], capture_output=True,
                          text=True, timeout=900, env=env, cwd=REPO)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    assert "train_ldm config (2 process(es))" in text
    assert sorted(set(re.findall(r"\[rank (\d)\] first batch keys", text))) == ["0", "1"]
    checkpoint = tmp_path / "two-ranks" / "checkpoints" / "checkpoint-00000004"
    state = json.load(open(checkpoint / "trainer_state.json"))
    assert state["step"] == 4 and len(state["data"]) == 2  # one data position per rank
    assert os.path.isdir(checkpoint / "pipeline")


def test_fsdp2_takes_ema_fsdp1_and_a_trained_text_encoder_are_refused_with_the_fix():
    (line,) = train_ldm.distributed_notes("FSDP", TrainLDMConfig(use_ema=True), fsdp_version=2)
    assert "sharded" in line and "EMA of its own shard" in line
    with pytest.raises(ValueError, match=r"set fsdp_version: 2 .* or train with --use-ema false"):
        train_ldm.distributed_notes("FSDP", TrainLDMConfig(use_ema=True), fsdp_version=1)
    assert len(train_ldm.distributed_notes("FSDP", TrainLDMConfig(use_ema=False), fsdp_version=1)) == 1
    with pytest.raises(ValueError, match=r"--train-text-encoder false, or DDP"):
        train_ldm.distributed_notes("FSDP", TrainLDMConfig(train_text_encoder=True))
    assert train_ldm.distributed_notes("MULTI_GPU", TrainLDMConfig(use_ema=True)) == []


def test_deepspeed_run_says_the_nonfinite_guard_is_off():
    (line,) = train_ldm.distributed_notes("DEEPSPEED", TrainLDMConfig())
    assert "non-finite-loss guard" in line and "off" in line


def test_main_refuses_fsdp1_with_ema_before_any_work(tmp_path, monkeypatch):
    class Fsdp1Accelerator:  # what Accelerator reports under an fsdp_version: 1 config
        distributed_type = DistributedType.FSDP
        is_fsdp2 = False
        state = types.SimpleNamespace(deepspeed_plugin=None)

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr("accelerate.Accelerator", Fsdp1Accelerator)  # what ldm.training.loop.make_accelerator builds
    monkeypatch.setattr("ldm.training.fsdp.allow_fsdp_on_cpu", lambda accelerator: None)
    cfg = TrainLDMConfig(model="tiny", output_dir=str(tmp_path / "run"), use_ema=True)
    with pytest.raises(ValueError, match="use_ema under FSDP needs FSDP2"):
        train_ldm.main(cfg)
    assert not os.path.exists(tmp_path / "run")  # nothing written, nothing built
