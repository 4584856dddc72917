"""train_vae: the discriminator's two passes, GAN training against plain training, and stops across processes."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import two_cpu_processes

from ldm.training import train_vae
from ldm.training.train_vae import TrainVAEConfig
from ldm.training.vae_losses import PatchDiscriminator, hinge_d_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


def test_discriminator_step_sees_no_gradient_from_the_generator_step(tmp_path, monkeypatch):
    made, seen = [], []

    class Recorded(PatchDiscriminator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def recording_d_loss(logits_real, logits_fake):  # called after the generator's step, before the backward
        seen.append([p.grad for p in made[0].parameters()])
        return hinge_d_loss(logits_real, logits_fake)

    monkeypatch.setattr(train_vae, "PatchDiscriminator", Recorded)
    monkeypatch.setattr(train_vae, "hinge_d_loss", recording_d_loss)
    cfg = TrainVAEConfig(model="tiny", data="shapes:16@32", resolution=32, batch_size=4, max_steps=3, disc_start=1,
                         disc_width=16, output_dir=str(tmp_path / "vae"), checkpoint_every=0, val_samples=2)
    result = train_vae.main(cfg)
    assert result["step"] == 3 and len(seen) == 2  # steps 1 and 2 (0-based) train the discriminator
    assert made[0].net[0].out_channels == 16
    assert all(grad is None for grads in seen for grad in grads)


@pytest.mark.slow
def test_gan_reconstructions_are_no_worse_on_held_out_images():
    """benchmarks/bench_vae_gan.py as benchmarks/BENCHMARKS.md runs it (but one timing round): 300 steps with and without the
    discriminator (on from step 50, disc_weight 0.05), scored on images of another seed."""
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_vae_gan.py"), "--steps", "300",
                           "--disc-start", "50", "--disc-weight", "0.05", "--timing-rounds", "1"],
                          capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    values = dict(line.split(": ") for line in done.stdout.strip().splitlines()[-5:])
    assert float(values["psnr_on"]) >= float(values["psnr_off"]), values
    assert float(values["psnr_off"]) > 15, values  # both runs learned something
    assert all(float(values[k]) > 0 for k in ("ratio_step_on_off", "ratio_step_before_off", "ratio_step_taming_on"))


def _rank_pid(launcher: subprocess.Popen, rank: str) -> int | None:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == rank and "train_vae.py" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:  # a helper process that ended meanwhile
            continue
    return None


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_when_only_one_gets_sigterm(tmp_path):
    out = tmp_path / "ddp"
    command = two_cpu_processes("train_vae.py", "--model", "tiny", "--data", "shapes:64@32", "--resolution", "32",
                                "--batch_size", "4", "--max_steps", "100000", "--output_dir", str(out),
                                "--checkpoint_every", "2", "--checkpoints_total_limit", "1", "--val_samples", "2",
                                "--disc_start", "0")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "log", "w") as log:
        launcher = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                    start_new_session=True)
    try:
        deadline = time.time() + 300  # both ranks are in the loop once a checkpoint exists
        while not glob.glob(str(out / "checkpoints" / "checkpoint-????????")) and launcher.poll() is None:
            assert time.time() < deadline, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.5)
        pid = _rank_pid(launcher, "1")
        assert launcher.poll() is None and pid, (tmp_path / "log").read_text()[-3000:]
        os.kill(pid, signal.SIGTERM)  # rank 1 only; rank 0 learns of it from the agreed stop
        launcher.wait(timeout=120)  # a hang (one rank waiting in the checkpoint's barrier) times out here
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    text = (tmp_path / "log").read_text()
    assert launcher.returncode == 0, text[-3000:]
    checkpoints = glob.glob(str(out / "checkpoints" / "checkpoint-*"))
    assert len(checkpoints) == 1, checkpoints
    step = json.load(open(os.path.join(checkpoints[0], "trainer_state.json")))["step"]
    assert checkpoints[0].endswith(f"checkpoint-{step:08d}") and 2 <= step < 100000
    assert f"stopped by SIGTERM at step {step}" in text  # printed by rank 0, which got no signal


# What the shared loop (ldm.training.loop) gives VAE training: exact resume, the non-finite guard, accumulation.

def vae_config(tmp_path, name="vae", **overrides) -> TrainVAEConfig:
    base = dict(model="tiny", data="shapes:16@32", resolution=32, batch_size=4, max_steps=4, learning_rate=1e-3,
                output_dir=str(tmp_path / name), checkpoint_every=0, val_samples=2, log_every=0)
    return TrainVAEConfig(**{**base, **overrides})


def vae_weights(result) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(result["vae_dir"], "diffusion_pytorch_model.safetensors"))


def test_vae_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = train_vae.main(vae_config(tmp_path, "a", disc_start=1, disc_width=8))
    half = train_vae.main(vae_config(tmp_path, "b", disc_start=1, disc_width=8, max_steps=2))
    resumed = train_vae.main(vae_config(tmp_path, "b", disc_start=1, disc_width=8, resume="latest"))
    assert half["step"] == 2 and resumed["step"] == 4 and list(resumed["losses"]) == [3, 4]
    for step in (3, 4):
        assert abs(resumed["losses"][step] - straight["losses"][step]) <= 1e-6
    a, b, first = vae_weights(straight), vae_weights(resumed), vae_weights(half)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max((a[k] - first[k]).abs().max().item() for k in a) > 1e-4  # steps 3-4 moved the weights


def test_vae_nonfinite_loss_skips_the_update_and_is_counted(tmp_path, monkeypatch):
    original, calls = train_vae.vae_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        loss, logs, x_rec = original(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), logs, x_rec

    monkeypatch.setattr(train_vae, "vae_loss", poisoned)
    result = train_vae.main(vae_config(tmp_path))
    assert result["nonfinite_total"] == 1 and result["step"] == 4
    assert all(w.isfinite().all() for w in vae_weights(result).values())


def test_vae_gradient_accumulation_steps_the_optimizer_once_per_micro_batches(tmp_path, monkeypatch):
    import torch

    original, calls = train_vae.vae_loss, {"n": 0}

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(train_vae, "vae_loss", counted)
    result = train_vae.main(vae_config(tmp_path, max_steps=3, gradient_accumulation_steps=2))
    assert calls["n"] == 6 and list(result["losses"]) == [1, 2, 3]
    checkpoint = os.path.dirname(result["vae_dir"])
    optimizer = torch.load(os.path.join(checkpoint, "accelerate", "optimizer.bin"), weights_only=False)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {3}  # AdamW stepped 3 times, not 6


def test_wrong_vae_message_suggests_the_vae_folder_a_real_run_writes(tmp_path):
    import re

    from ldm.models.vae import check_vae_folder

    run = tmp_path / "vae_run"
    result = train_vae.main(vae_config(tmp_path, "vae_run", max_steps=1))
    with pytest.raises(ValueError, match="not a VAE folder") as refused:
        check_vae_folder(str(tmp_path), "tiny", 32)
    suggested = re.search(r"(RUN/\S+/vae)", str(refused.value)).group(1)
    checkpoint = os.path.basename(os.path.dirname(result["vae_dir"]))  # checkpoint-00000001
    path = suggested.replace("RUN", str(run)).replace("checkpoint-N", checkpoint)
    assert os.path.isfile(os.path.join(path, "config.json")) and path == result["vae_dir"], (suggested, result)
    check_vae_folder(path, "tiny", 32)  # the suggested folder is taken
    with pytest.raises(ValueError, match=r"resolution=30 is not a positive multiple of 8 .*use resolution=24 or 32"):
        check_vae_folder(path, "tiny", 30)


def test_train_vae_says_where_it_wrote_the_vae(tmp_path, capsys):
    result = train_vae.main(vae_config(tmp_path, max_steps=1))
    lines = capsys.readouterr().out.splitlines()
    written = next(line for line in lines if line.startswith("train_vae: wrote the VAE folder")).split(": ")[-1]
    assert written == os.path.abspath(result["vae_dir"]) and os.path.isfile(os.path.join(written, "config.json"))
    assert f"train_vae: checkpoints: {os.path.abspath(tmp_path / 'vae' / 'checkpoints')}" in lines
