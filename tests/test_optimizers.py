"""`--optimizer` (issue 33, item 3): every optimiser lowers a tiny UNet's loss through the shared loop, resumes
exactly (its state in Accelerate's checkpoint: Prodigy's d, schedule-free's z and mode), and 8-bit AdamW is refused
on a CPU before any model is built."""
import pytest
import torch
import torch.nn.functional as F

from ldm.models.presets import build_components
from ldm.training import loop
from ldm.training.finetune_config import FinetuneConfig, resolve_defaults
from ldm.training.ldm_config import TrainLDMConfig
from ldm.training.optimizers import OPTIMIZERS, is_schedule_free, set_mode

pytestmark = pytest.mark.usefixtures("one_thread")
ON_CPU = [kind for kind in OPTIMIZERS if kind != "adamw_8bit"]
LEARNING_RATES = {"adamw": 1e-3, "adafactor": 1e-3, "schedule_free_adamw": 2e-3, "prodigy": 1.0}
STEPS = {"prodigy": 60}  # Prodigy's d grows from d0 = 1e-6 (with bias correction: slowly at first); others: 12


class FixedBatch(loop.Trainer):
    """The tiny UNet's eps-prediction loss on one fixed batch: fixed latents, noise, timesteps and text states,
    so the loss is a function of the weights alone."""

    def __init__(self, unet, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        size, width = unet.config.sample_size, unet.config.cross_attention_dim
        self.noisy = torch.randn(4, unet.config.in_channels, size, size, generator=g)  # (B, 4, h, w)
        self.noise = torch.randn(self.noisy.shape, generator=g)
        self.timesteps = torch.randint(0, 1000, (4,), generator=g)
        self.text = torch.randn(4, 8, width, generator=g)  # (B, tokens, cross_attention_dim)

    def loss(self) -> torch.Tensor:
        return F.mse_loss(self.model(self.noisy, self.timesteps, encoder_hidden_states=self.text).sample, self.noise)

    def micro_loss(self, step, micro):
        return self.loss(), {}


def train(kind: str, out, max_steps: int, resume: str = "", checkpoint_every: int = 0, warmup: int = 2):
    """Trains the tiny UNet (seed 0) for max_steps with optimiser `kind`; returns (result, trainer)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(out)))
    unet = build_components("tiny", seed=0)["unet"].train()
    params = [p for p in unet.parameters()]
    optimizer = loop.make_optimizer(params, LEARNING_RATES[kind], "cpu", weight_decay=1e-2, kind=kind,
                                    warmup_steps=warmup)
    lr_scheduler = loop.make_lr_scheduler("constant_with_warmup", optimizer, warmup, max_steps, 1)
    trainer = FixedBatch(unet)
    trainer.model, trainer.optimizer, trainer.lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    trainer.params = params
    settings = loop.LoopSettings(output_dir=str(out), max_steps=max_steps, checkpoint_every=checkpoint_every,
                                 checkpoint_at_end=False, keep_losses=True, resume=resume, name=kind)
    return loop.train(accelerator, trainer, settings), trainer


@pytest.mark.parametrize("kind", ON_CPU)
def test_each_optimizer_lowers_the_loss_of_a_fixed_batch(kind, tmp_path):
    steps = STEPS.get(kind, 12)
    result, trainer = train(kind, tmp_path, max_steps=steps)
    losses = list(result["losses"].values())
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    with torch.no_grad():  # the loop ends in eval mode: schedule-free's weights are its averaged sequence x
        final = trainer.loss().item()
    assert final < 0.7 * losses[0], (kind, losses, final)
    assert min(losses[-3:]) < losses[0], (kind, losses)


@pytest.mark.parametrize("kind", ON_CPU)
def test_each_optimizer_resumes_exactly(kind, tmp_path):
    straight, plain = train(kind, tmp_path / "a", max_steps=6, checkpoint_every=3)
    train(kind, tmp_path / "b", max_steps=3, checkpoint_every=3)
    resumed, again = train(kind, tmp_path / "b", max_steps=6, checkpoint_every=3, resume="latest")
    assert list(resumed["losses"]) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed["losses"][step] == straight["losses"][step], (kind, step)
    moved = max((a - b).abs().max().item() for a, b in zip(plain.model.parameters(), again.model.parameters()))
    assert moved == 0.0, (kind, moved)
    assert straight["losses"][6] != straight["losses"][4]  # steps 4-6 changed the weights: the check can fail
    inner = plain.optimizer.optimizer
    if kind == "prodigy":  # the step-size estimate's sums came back
        group, straight_group = again.optimizer.optimizer.param_groups[0], inner.param_groups[0]
        assert group["d"] == straight_group["d"] and group["d_numerator"] == straight_group["d_numerator"] > 0
    if kind == "schedule_free_adamw":  # checkpoints and the end hold the averaged weights x (eval mode), not y
        from safetensors.torch import load_file

        assert is_schedule_free(again.optimizer) and not again.optimizer.optimizer.param_groups[0]["train_mode"]
        saved = load_file(f"{resumed['checkpoint']}/accelerate/model.safetensors")
        x = dict(again.model.named_parameters())
        assert all(torch.equal(saved[name], x[name]) for name in saved)
        set_mode(again.optimizer, training=True)
        assert any(not torch.equal(saved[name], x[name]) for name in saved)


def test_schedule_free_modes_swap_between_y_and_x(tmp_path):
    _, trainer = train("schedule_free_adamw", tmp_path, max_steps=3)
    x = [p.detach().clone() for p in trainer.model.parameters()]
    set_mode(trainer.optimizer, training=True)
    y = [p.detach().clone() for p in trainer.model.parameters()]
    set_mode(trainer.optimizer, training=True)  # idempotent
    assert all(torch.equal(a, p) for a, p in zip(y, trainer.model.parameters()))
    assert max((a - b).abs().max().item() for a, b in zip(x, y)) > 0
    set_mode(trainer.optimizer, training=False)
    assert max((a - p).abs().max().item() for a, p in zip(x, trainer.model.parameters())) < 1e-6


def test_schedule_free_takes_a_constant_schedule_and_warms_up_itself():
    with pytest.raises(ValueError, match="--lr-scheduler constant"):
        TrainLDMConfig(optimizer="schedule_free_adamw", lr_scheduler="cosine").validate()
    TrainLDMConfig(optimizer="schedule_free_adamw", lr_scheduler="constant_with_warmup").validate()
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = loop.make_optimizer([param], 1e-3, "cpu", kind="schedule_free_adamw", warmup_steps=7)
    scheduler = loop.make_lr_scheduler("constant_with_warmup", optimizer, 7, 10, 1)
    assert optimizer.param_groups[0]["warmup_steps"] == 7
    assert scheduler.get_last_lr() == [1e-3]  # the lr scheduler does not warm up a second time


def test_unknown_optimizers_get_the_list_of_choices():
    with pytest.raises(ValueError, match="adamw_8bit.*prodigy.*adafactor.*schedule_free_adamw"):
        TrainLDMConfig(optimizer="adamw8bit").validate()
    with pytest.raises(ValueError, match="is not one of"):
        FinetuneConfig(model="m", data="d", optimizer="sgd").validate()


def test_prodigy_learning_rate_defaults_to_one_in_finetune_and_is_checked_in_train():
    cfg = FinetuneConfig(model="m", data="d", optimizer="prodigy")
    cfg.validate()
    assert resolve_defaults(cfg, 10, 32).learning_rate == 1.0
    assert resolve_defaults(FinetuneConfig(model="m", data="d"), 10, 32).learning_rate == 1e-4
    with pytest.raises(ValueError, match="--learning-rate 1.0"):
        TrainLDMConfig(optimizer="prodigy").validate()  # ldm train's AdamW default lr 1e-4
    TrainLDMConfig(optimizer="prodigy", learning_rate=1.0, prodigy_d_coef=0.5).validate()


def test_adamw_8bit_on_a_cpu_is_refused_before_any_model_is_built(tmp_path, monkeypatch, capsys):
    from ldm.cli import main
    from ldm.models import presets
    from ldm.training import finetune, train_ldm

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the optimizer was checked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(presets, "build_components", no_model)
    monkeypatch.setattr(train_ldm, "build_models", no_model)
    monkeypatch.setattr(finetune, "main", no_model)
    for argv in (["train", "--optimizer", "adamw_8bit", "--out", str(tmp_path / "t")],
                 ["finetune", "--model", str(tmp_path), "--data", str(tmp_path), "--optimizer", "adamw_8bit"]):
        assert main(argv) != 0
        assert "adamw_8bit needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs a CUDA GPU.*use --optimizer adamw"):
        FinetuneConfig(model="m", data="d", optimizer="adamw_8bit", device="cpu").validate()


@pytest.mark.parametrize("kind", ["prodigy", "schedule_free_adamw", "adafactor"])
def test_ldm_train_runs_each_optimizer(kind, tmp_path):
    from safetensors.torch import load_file

    from ldm.training import train_ldm

    cfg = TrainLDMConfig(model="tiny", data="shapes:16@32", resolution=32, batch_size=4, max_steps=3,
                         learning_rate=1.0 if kind == "prodigy" else 1e-3, optimizer=kind, lr_warmup_steps=1,
                         lr_scheduler="constant", output_dir=str(tmp_path), checkpoint_every=1000,
                         validation_every=1000, num_validation_prompts=0, val_loss_samples=2, report_to="none",
                         use_ema=False)
    cfg.validate()
    result = train_ldm.main(cfg)
    assert list(result["losses"]) == [1, 2, 3] and result["nonfinite_total"] == 0
    saved = load_file(f"{result['checkpoint']}/pipeline/unet/diffusion_pytorch_model.safetensors")
    base = build_components("tiny", seed=0)["unet"].state_dict()
    assert max((saved[k] - base[k]).abs().max().item() for k in base) > 0  # the weights moved


@pytest.mark.parametrize("kind", ["prodigy", "schedule_free_adamw"])
def test_finetune_runs_each_optimizer_with_its_recommended_learning_rate(kind, tiny_folder, tmp_path):
    from ldm.data.shapes import SceneObject, render_scene
    from ldm.training import finetune

    for i in range(3):
        render_scene([SceneObject("circle", "red", "left")], 32, (20 + 40 * i, 20, 30)).save(tmp_path / f"{i}.png")
    cfg = FinetuneConfig(model=tiny_folder, data=str(tmp_path), out=str(tmp_path / "out"), instance_prompt="sks",
                         resolution=32, max_steps=3, batch_size=2, optimizer=kind, validation_every=100,
                         num_validation_samples=1, validation_sample_steps=2, checkpoint_every=2, device="cpu")
    cfg.validate()
    report = finetune.main(cfg)
    assert report["steps"] == 3 and report["nonfinite_total"] == 0 and report["outputs"]["lora"]
    assert report["config"]["learning_rate"] == (1.0 if kind == "prodigy" else 1e-4)


@pytest.mark.slow
def test_bench_optimizers_smoke(tmp_path):
    import json
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "bench_optimizers.py")
    out = subprocess.run([sys.executable, script, "--preset", "tiny", "--steps", "3", "--optimizers", "adamw",
                          "schedule_free_adamw", "--json", str(tmp_path / "r.json")], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.load(open(tmp_path / "r.json"))["rows"]
    assert [r["optimizer"] for r in rows] == ["adamw", "schedule_free_adamw"]
    assert all(r["state_mib"] > 0 and r["loss_after"] < r["loss_before"] for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["prodigy", "schedule_free_adamw", "adafactor"])
def test_finetune_resumes_exactly_with_each_optimizer(kind, tiny_folder, tmp_path):
    # validation at steps 2 and 4 and the checkpoint at 2 put schedule-free in eval mode and back
    import os

    from safetensors.torch import load_file

    from ldm.data.shapes import SceneObject, render_scene
    from ldm.training import finetune

    art = tmp_path / "art"
    art.mkdir()
    for i in range(3):
        render_scene([SceneObject("circle", "red", "left")], 32, (20 + 40 * i, 20, 30)).save(art / f"{i}.png")

    def run(out, max_steps, **extra):
        cfg = FinetuneConfig(model=tiny_folder, data=str(art), out=str(tmp_path / out), instance_prompt="sks",
                             resolution=32, max_steps=max_steps, batch_size=2, optimizer=kind, lr_warmup_steps=1,
                             learning_rate=0.0 if kind == "prodigy" else 1e-2, validation_every=2,
                             num_validation_samples=1, validation_sample_steps=2, checkpoint_every=2, device="cpu",
                             **extra)
        cfg.validate()
        return finetune.main(cfg)

    straight = run("a", 4)
    run("b", 2)
    resumed = run("b", 4, resume="latest")
    assert [resumed["losses"][s] for s in (3, 4)] == [straight["losses"][s] for s in (3, 4)]
    a, b = (load_file(os.path.join(tmp_path, out, "pytorch_lora_weights.safetensors")) for out in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
