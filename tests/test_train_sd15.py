"""configs/sd15.yaml is real: SD 1.5-sized training (860M-parameter UNet) at 512 px runs 2 steps on CPU.

Slow (minutes; ~17 GB of RAM: fp32 weights, gradients and AdamW states of 860M parameters; EMA off here):
marked slow, for a runner with >= 24 GB of RAM and >= 16 GB of free disk (the checkpoint, deleted after).
"""
import math
import os
import shutil

import pytest
from PIL import Image

from ldm.training import train_ldm
from ldm.training.config import parse_config
from ldm.training.ldm_config import TrainLDMConfig


@pytest.mark.slow
def test_sd15_config_runs_two_steps_at_512px(tmp_path):
    _require_free_disk(tmp_path, gigabytes=16)
    try:
        _train_two_steps(tmp_path)
    finally:
        shutil.rmtree(tmp_path / "run", ignore_errors=True)


def _require_free_disk(path, gigabytes: float) -> None:
    """The final checkpoint is ~14 GB (Accelerate state with AdamW moments, plus the pipeline folder). On a machine
    without that much disk the test cannot say anything about the config, so it says why it did not run instead of
    failing half-written with ENOSPC; CI (CI=true) must have the disk, so there it is an error, never a skip."""
    free_gb = shutil.disk_usage(path).free / 2**30
    if free_gb < gigabytes:
        message = (f"needs {gigabytes} GB of free disk under {path} for a ~14 GB checkpoint; {free_gb:.1f} GB free. "
                   "Free some disk or point --basetemp at a larger one.")
        if os.environ.get("CI"):
            pytest.fail(f"CI machine too small: {message}", pytrace=False)
        pytest.skip(message)


def _train_two_steps(tmp_path):
    folder = tmp_path / "two_images"
    folder.mkdir()
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (512, 512), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} picture")
    cfg = parse_config(TrainLDMConfig, ["--config", "configs/sd15.yaml", "--data", str(folder), "--batch_size", "1",
                                        "--max_steps", "2", "--mixed_precision", "no", "--num_workers", "0",
                                        "--output_dir", str(tmp_path / "run"), "--resume", "", "--report_to", "none",
                                        "--num_validation_prompts", "0", "--val_loss_samples", "1",
                                        "--lr_warmup_steps", "1",
                                        "--checkpoint_every", "1000000", "--use_ema", "false"])
    assert cfg.model == "sd15" and cfg.resolution == 512 and cfg.gradient_checkpointing
    result = train_ldm.main(cfg)
    assert result["step"] == 2 and list(result["losses"]) == [1, 2]
    assert all(math.isfinite(loss) for loss in result["losses"].values()), result["losses"]
    assert os.path.isfile(os.path.join(result["checkpoint"], "pipeline", "unet", "config.json"))
