"""FSDP2 on two CPU ranks (configs/accelerate/fsdp_cpu_2proc.yaml): the UNet really sharded, checkpoints, exact
resume, a pipeline folder that ours and diffusers open, and the sharded EMA equal to the one-process EMA."""
import copy
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ldm.training import step, train_ldm
from ldm.training.ldm_config import TrainLDMConfig
from ldm.training.stream import BatchStream

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs", "accelerate")
# one latent cache (map-style: BatchStream's permutation split by rank), 64 images, 2 ranks x 8 = 16 per step
RUN = ["--model", "tiny", "--data", "shapes:64@32", "--resolution", "32", "--batch-size", "8",
       "--learning-rate", "5e-4", "--lr-warmup-steps", "0", "--ema-decay", "0.9", "--num-validation-prompts", "0",
       "--val-loss-samples", "4", "--report-to", "none", "--log-every", "1"]


def launch_fsdp(tmp_path, out, *extra) -> str:
    """Runs train/train_ldm.py on two CPU ranks under the FSDP config; returns the log (asserts it ran)."""
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            os.path.join(CONFIGS, "fsdp_cpu_2proc.yaml"), "train/train_ldm.py", *RUN,
            "--latent-cache", str(tmp_path / "cache"), "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=REPO, start_new_session=True)
    try:
        text, _ = process.communicate(timeout=400)  # a hang in a collective fails here instead of blocking CI
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, text[-4000:]
    return text


def losses(out) -> dict[int, float]:
    with open(os.path.join(out, "losses.jsonl"), encoding="utf-8") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def checkpoint(out, step_: int) -> str:
    return os.path.join(out, "checkpoints", f"checkpoint-{step_:08d}")


def pipeline_unet(folder) -> dict:
    return load_file(os.path.join(folder, "pipeline", "unet", "diffusion_pytorch_model.safetensors"))


def dcp_tensors(folder) -> dict:
    """Returns the whole tensors of a torch.distributed.checkpoint folder (every rank's shards joined)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = folder.rstrip("/") + ".pt"
    dcp_to_torch_save(folder, target)
    return flat_tensors(torch.load(target, weights_only=False))


def flat_tensors(tree, prefix: str = "") -> dict:
    """Returns {"a.b.c": tensor} for every tensor in nested dicts (the optimizer's state is nested)."""
    if isinstance(tree, torch.Tensor):
        return {prefix.rstrip("."): tree}
    if not isinstance(tree, dict):
        return {}
    return {k: v for key, sub in tree.items() for k, v in flat_tensors(sub, f"{prefix}{key}.").items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """A straight 4-step FSDP run (checkpoints at 2 and 4) and a 2-step run resumed to 4."""
    tmp = tmp_path_factory.mktemp("fsdp")
    straight = launch_fsdp(tmp, tmp / "straight", "--max-steps", "4", "--checkpoint-every", "2")
    launch_fsdp(tmp, tmp / "resumed", "--max-steps", "2")
    resumed = launch_fsdp(tmp, tmp / "resumed", "--max-steps", "4", "--resume", "latest")
    return {"tmp": tmp, "straight": straight, "resumed": resumed}


@pytest.mark.slow
def test_two_fsdp_ranks_each_hold_half_of_the_unet(fsdp_runs):
    text = fsdp_runs["straight"]
    assert "train_ldm config (2 process(es))" in text
    assert "FSDP2: the UNet's parameters, gradients and optimizer states are sharded" in text
    assert "DDP" not in text  # Accelerate's MULTI_CPU path would have wrapped the UNet in DDP instead
    held = {int(r): (int(n), int(total)) for r, n, total in
            re.findall(r"\[rank (\d)\] FSDP: holds (\d+) of the UNet's (\d+) parameters", text)}
    assert sorted(held) == [0, 1]
    (whole,) = {total for _, total in held.values()}
    assert held[0][0] + held[1][0] == whole  # every element on exactly one rank
    assert all(abs(n - whole / 2) <= 0.01 * whole for n, _ in held.values())  # about half each


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_exactly(fsdp_runs):
    tmp = fsdp_runs["tmp"]
    assert "resumed from" in fsdp_runs["resumed"]
    a, b = losses(tmp / "straight"), losses(tmp / "resumed")
    assert sorted(b) == [1, 2, 3, 4]
    for s in (3, 4):
        assert abs(a[s] - b[s]) <= 1e-6, (a, b)
    straight, resumed = checkpoint(tmp / "straight", 4), checkpoint(tmp / "resumed", 4)
    for part in ("pytorch_model_fsdp_0", "optimizer_0", "ema_sharded"):  # every rank's shards, joined
        x = dcp_tensors(os.path.join(straight, "accelerate", part))
        y = dcp_tensors(os.path.join(resumed, "accelerate", part))
        assert x and max_diff(x, y) <= 1e-6, part
    assert max_diff(pipeline_unet(straight), pipeline_unet(resumed)) <= 1e-6


@pytest.mark.slow
def test_fsdp_pipeline_folder_holds_the_gathered_ema_and_opens_in_ldm_and_diffusers(fsdp_runs):
    from conftest import diffusers_pair

    folder = checkpoint(fsdp_runs["tmp"] / "straight", 4)
    saved = pipeline_unet(folder)
    ema = dcp_tensors(os.path.join(folder, "accelerate", "ema_sharded"))
    weights = dcp_tensors(os.path.join(folder, "accelerate", "pytorch_model_fsdp_0"))
    weights = {k.removeprefix("model."): v for k, v in weights.items()}
    assert max_diff(saved, ema) == 0.0  # the pipeline's UNet: the EMA, gathered from both ranks' shards
    assert max_diff(saved, weights) > 1e-4  # ... not the training weights (EMA decay 0.9 over 4 steps)
    ours, theirs = diffusers_pair(os.path.join(folder, "pipeline"))
    call = dict(prompt="a red circle on the left", num_inference_steps=3, height=32, width=32, output_type="np")
    a = ours(**call, generator=torch.Generator().manual_seed(0)).images
    b = theirs(**call, generator=torch.Generator().manual_seed(0)).images
    assert a.shape == b.shape == (1, 32, 32, 3) and a.std() > 0.01
    assert abs(a - b).max() < 1e-4  # the same weights and scheduler give the same image


class TwoRankStream(BatchStream):
    """One process reading what ranks 0 and 1 of 2 read: micro-batch m of each step is rank m's batch."""

    def __init__(self, dataset, batch_size, rank=0, world_size=1, seed=0, num_workers=0, pin_memory=False):
        super().__init__(dataset, batch_size, 0, 1, seed, num_workers, pin_memory)
        self.ranks = [BatchStream(dataset, batch_size, r, 2, seed, num_workers) for r in (0, 1)]

    def __iter__(self):
        for pair in zip(*self.ranks):
            yield from pair


@pytest.mark.slow
def test_sharded_ema_equals_the_one_process_ema_on_the_same_samples(fsdp_runs, monkeypatch):
    """One process, 2 micro-batches of 8 per step (gradient accumulation: the mean of both, as FSDP's averaged
    gradient), micro-batch m reading rank m's batch of the 2-rank run and drawing its noise, timesteps and caption
    dropout from rank m's generator: the same samples and draws per step as the two FSDP ranks."""
    tmp = fsdp_runs["tmp"]
    original = step.step_generator
    monkeypatch.setattr(train_ldm, "step_generator", lambda seed, s, micro, rank: original(seed, s, 0, micro))
    monkeypatch.setattr(train_ldm, "BatchStream", TwoRankStream)
    cfg = TrainLDMConfig(model="tiny", data="shapes:64@32", resolution=32, batch_size=8, gradient_accumulation_steps=2,
                         learning_rate=5e-4, lr_warmup_steps=0, ema_decay=0.9, num_validation_prompts=0,
                         val_loss_samples=4, report_to="none", max_steps=4, latent_cache=str(tmp / "cache"),
                         output_dir=str(tmp / "one-process"))
    cfg.validate()
    torch.set_num_threads(1)
    one = train_ldm.main(cfg)
    for s, loss in losses(tmp / "straight").items():
        assert abs(one["losses"][s] - loss) <= 1e-5, (s, one["losses"], loss)
    # the same trajectory: the training weights agree (gradients summed in another order: float noise, which
    # Adam turns into differences up to ~lr where a gradient is near 0, hence a moderate learning rate here)
    fsdp_weights = dcp_tensors(os.path.join(checkpoint(tmp / "straight", 4), "accelerate", "pytorch_model_fsdp_0"))
    weights = load_file(os.path.join(one["checkpoint"], "accelerate", "model.safetensors"))
    assert max_diff({k.removeprefix("model."): v for k, v in fsdp_weights.items()}, weights) <= 1e-5
    sharded = pipeline_unet(checkpoint(tmp / "straight", 4))  # gathered from the two ranks' shards
    single = pipeline_unet(one["checkpoint"])  # EMAModel's full copy
    assert max_diff(single, weights) > 1e-4  # the EMA is not just the weights
    assert max_diff(sharded, single) <= 1e-5


@pytest.fixture
def one_rank_group():
    """A one-process gloo group (what fully_shard and torch.distributed.checkpoint need), removed afterwards."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sharded_ema_matches_emamodel_and_survives_a_checkpoint(one_rank_group, tmp_path):
    from diffusers.training_utils import EMAModel
    from torch.distributed.fsdp import fully_shard

    from ldm.training.fsdp import ShardedEMA, shard_sizes, unsharded_class

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    plain[1].bias.requires_grad_(False)  # frozen: EMAModel copies it instead of averaging
    reference = EMAModel(plain.parameters(), decay=0.9)
    sharded_model = fully_shard(copy.deepcopy(plain))
    assert unsharded_class(sharded_model) is torch.nn.Sequential and shard_sizes(sharded_model) == (58, 58)
    ema = ShardedEMA(sharded_model, decay=0.9)
    for step_ in range(5):  # the same updates on both copies; EMAModel's warm-up schedule on both EMAs
        delta = {k: torch.randn_like(v) * 0.1 for k, v in plain.state_dict().items()}
        with torch.no_grad():
            for (name, p), q in zip(plain.named_parameters(), sharded_model.parameters()):
                p.add_(delta[name])
                q.to_local().add_(delta[name])
        reference.step(plain.parameters())
        ema.step(sharded_model.parameters())
        if step_ == 2:
            ema.save(str(tmp_path))
    whole = ema.gathered()
    for name, shadow in zip(whole, reference.shadow_params):
        assert torch.allclose(whole[name], shadow, atol=1e-7), name
    assert not torch.equal(whole["0.weight"], plain[0].weight.detach())  # an average, not the weights
    ema.load(str(tmp_path))  # back to step 3, in place
    assert ema.ema.optimization_step == 3 and not torch.equal(ema.gathered()["0.weight"], whole["0.weight"])
    with pytest.raises(FileNotFoundError, match="--use-ema false"):
        ema.load(str(tmp_path / "elsewhere"))
