"""`ldm finetune` has `ldm train`'s guarantees (issue 13, item 7): the non-finite guard, gradient accumulation,
checkpoints with an exact `--resume`, and SIGTERM writing a checkpoint. Tiny random model, 32 px, a few steps."""
import json
import os
import signal

import pytest
import torch
from conftest import nan_loss_at, sigterm_after_step
from safetensors.torch import load_file

from ldm.training import finetune, loop, step
from ldm.training.checkpoint import list_checkpoints
from ldm.training.finetune_config import FinetuneConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """Five 32 px pictures, uncaptioned (4 train, 1 held out)."""
    from ldm.data.shapes import SceneObject, render_scene

    folder = tmp_path_factory.mktemp("art")
    for i in range(5):
        render_scene([SceneObject("circle", "red", "left")], 32, (20 + 30 * i, 20, 30)).save(folder / f"img{i}.png")
    return str(folder)


def run(tiny_folder, art, out, **overrides) -> dict:
    # lr 1e-2: the LoRA moves by far more than the 1e-6 the resume test allows, so a wrong resume shows
    base = dict(model=tiny_folder, data=art, out=str(out), instance_prompt="sks art", resolution=32, max_steps=4,
                batch_size=2, learning_rate=1e-2, lr_warmup_steps=1, validation_every=100, num_validation_samples=1,
                validation_sample_steps=2, checkpoint_every=0, device="cpu")
    cfg = FinetuneConfig(**{**base, **overrides})
    cfg.validate()
    return finetune.main(cfg)


def lora(folder) -> dict:
    return load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tiny_folder, art, tmp_path):
    # accumulation, caption dropout, flips, LoRA dropout (global RNG) and prior batches all have to resume exactly
    common = dict(gradient_accumulation_steps=2, caption_dropout=0.3, random_flip=True, lora_dropout=0.1,
                  class_prompt="art", num_class_images=2, class_sample_steps=2, validation_every=3, checkpoint_every=3)
    straight = run(tiny_folder, art, tmp_path / "a", max_steps=6, **common)
    half = run(tiny_folder, art, tmp_path / "b", max_steps=3, **common)
    first = lora(tmp_path / "b")
    resumed = run(tiny_folder, art, tmp_path / "b", max_steps=6, resume="latest", **common)
    assert half["steps"] == 3 and resumed["steps"] == 6
    assert list(resumed["losses"]) == [1, 2, 3, 4, 5, 6]  # the report covers the whole run
    assert [r["step"] for r in resumed["history"]] == [3, 6]
    for step in (4, 5, 6):
        assert abs(resumed["losses"][step] - straight["losses"][step]) <= 1e-6
    assert max_difference(lora(tmp_path / "a"), lora(tmp_path / "b")) <= 1e-6
    assert max_difference(lora(tmp_path / "a"), first) > 1e-3  # steps 4-6 moved the weights: the check can fail
    state = json.load(open(os.path.join(resumed["checkpoint"], "trainer_state.json")))
    assert state["step"] == 6 and state["data"] == [12] and state["nonfinite_total"] == 0
    # the Accelerate state holds the adapters only: the frozen UNet comes from the base model at resume
    saved = load_file(os.path.join(resumed["checkpoint"], "accelerate", "model.safetensors"))
    assert len(saved) == len(lora(tmp_path / "a")) and all(".lora_A." in k or ".lora_B." in k for k in saved)


@pytest.mark.slow
def test_a_lora_checkpoint_refuses_to_resume_into_other_trainable_parameters(tiny_folder, art, tmp_path):
    run(tiny_folder, art, tmp_path, max_steps=2, checkpoint_every=2, lora_rank=4)
    with pytest.raises(ValueError, match=r"not the \d+ trainable parameters of this run's model \(names and shapes\)"):
        run(tiny_folder, art, tmp_path, max_steps=4, resume="latest", lora_rank=2)
    with pytest.raises(ValueError, match="model_1.safetensors is missing: the checkpoint trained fewer models"):
        run(tiny_folder, art, tmp_path, max_steps=4, resume="latest", lora_rank=4, train_text_encoder=True)


@pytest.mark.slow
def test_gradient_accumulation_steps_the_optimizer_once_per_micro_batches(tiny_folder, art, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = step.diffusion_loss

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(step, "diffusion_loss", counted)
    report = run(tiny_folder, art, tmp_path, max_steps=3, gradient_accumulation_steps=2, checkpoint_every=3)
    assert calls["n"] == 6 and list(report["losses"]) == [1, 2, 3]
    optimizer = torch.load(os.path.join(report["checkpoint"], "accelerate", "optimizer.bin"), weights_only=False)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {3}  # AdamW stepped 3 times, not 6
    scheduler = torch.load(os.path.join(report["checkpoint"], "accelerate", "scheduler.bin"), weights_only=False)
    assert scheduler["last_epoch"] == 3


def test_nonfinite_loss_skips_the_update_and_is_counted(tiny_folder, art, tmp_path, monkeypatch):
    monkeypatch.setattr(step, "diffusion_loss", nan_loss_at(step, {2}))
    report = run(tiny_folder, art, tmp_path, max_steps=4)
    assert report["nonfinite_total"] == 1 and report["steps"] == 4 and report["stopped_by"] is None
    weights = lora(tmp_path)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(w.abs().max() > 0 for w in weights.values())  # the three good steps did update (LoRA B starts at 0)


def test_nonfinite_losses_in_a_row_stop_with_a_clear_message(tiny_folder, art, tmp_path, monkeypatch):
    monkeypatch.setattr(step, "diffusion_loss", nan_loss_at(step, None))
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row at step 3"):
        run(tiny_folder, art, tmp_path, max_steps=10, max_nonfinite_steps=3)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_the_run_resumes(tiny_folder, art, tmp_path, monkeypatch):
    sigterm_after_step(monkeypatch, 2)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    report = run(tiny_folder, art, tmp_path, max_steps=50, checkpoint_every=0)
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the run's handlers are gone again
    assert report["stopped_by"] == "SIGTERM" and report["steps"] == 2
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["checkpoint-00000002"]
    assert os.path.isfile(os.path.join(report["checkpoint"], "pytorch_lora_weights.safetensors"))  # usable weights
    assert report["outputs"] == {"lora": None, "webui": None, "pipeline": None}  # unfinished: no final outputs
    assert json.load(open(tmp_path / "report.json"))["stopped_by"] == "SIGTERM"
    monkeypatch.undo()
    resumed = run(tiny_folder, art, tmp_path, max_steps=3, resume="latest")
    assert list(resumed["losses"]) == [1, 2, 3] and resumed["outputs"]["lora"]


@pytest.mark.slow
def test_memorization_early_stop_after_resume_restores_the_checkpointed_snapshot(tiny_folder, art, tmp_path,
                                                                                monkeypatch):
    """Checks at steps 2 and 4; a warning at 4 restores the step-2 weights, also when the run resumed at step 3."""
    original, original_step = finetune.validate, loop.accumulated_step

    def warn_at_4(cfg, step, *args):
        record = original(cfg, step, *args)
        record["memorization"].update(warning=step == 4, message=f"test warning at step {step}")
        return record

    monkeypatch.setattr(finetune, "validate", warn_at_4)
    common = dict(max_steps=6, validation_every=2, checkpoint_every=0, early_stop_on_memorization=True)
    straight = run(tiny_folder, art, tmp_path / "a", **common)
    assert straight["stopped_by"] == "memorization" and straight["steps"] == 4
    sigterm_after_step(monkeypatch, 3)
    stopped = run(tiny_folder, art, tmp_path / "b", **common)
    assert stopped["stopped_by"] == "SIGTERM" and stopped["steps"] == 3
    monkeypatch.setattr(loop, "accumulated_step", original_step)
    resumed = run(tiny_folder, art, tmp_path / "b", resume="latest", **common)
    assert resumed["stopped_by"] == "memorization" and [r["step"] for r in resumed["history"]] == [2, 4]
    # without the snapshot in the checkpoint the resumed run would restore its step-3 weights instead
    assert max_difference(lora(tmp_path / "a"), lora(tmp_path / "b")) <= 1e-6
    step3 = lora(stopped["checkpoint"])
    assert max_difference(lora(tmp_path / "b"), step3) > 1e-3


def test_help_lists_the_new_flags(capsys):
    from ldm.cli import main as ldm

    with pytest.raises(SystemExit):
        ldm(["finetune", "--help"])
    text = capsys.readouterr().out
    for flag in ("--gradient-accumulation-steps", "--max-nonfinite-steps", "--checkpoint-every",
                 "--checkpoints-total-limit", "--resume", "--max-minutes"):
        assert flag in text, flag
