"""train_ldm: short real runs on the tiny preset (CPU) — learning, exact resume, stops, guards, checkpoints."""
import json
import os
import signal

import pytest
import torch
from conftest import nan_loss_at, sigterm_after_step
from safetensors.torch import load_file

from ldm.training import step, train_ldm
from ldm.training.checkpoint import list_checkpoints
from ldm.training.ldm_config import TrainLDMConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(tmp_path, **overrides) -> TrainLDMConfig:
    base = dict(model="tiny", data="shapes:48@32", resolution=32, batch_size=8, max_steps=6, learning_rate=2e-3,
                lr_warmup_steps=0, output_dir=str(tmp_path / "run"), checkpoint_every=1000, validation_every=1000,
                num_validation_prompts=0, val_loss_samples=4, report_to="none", log_every=1, ema_decay=0.9)
    return TrainLDMConfig(**{**base, **overrides})


def run(cfg, **kwargs):
    cfg.validate()
    return train_ldm.main(cfg, **kwargs)


def val_losses(result):
    return [v["val_loss"] for v in result["val"]]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    dict(prediction_type="epsilon", weighting="uniform"),
    dict(prediction_type="v_prediction", weighting="min_snr", loss="huber", noise_schedule="squaredcos_cap_v2"),
    dict(prediction_type="sample", weighting="vlb", loss="l1", noise_schedule="sigmoid", offset_noise=0.05),
    dict(prediction_type="v_prediction", weighting="vlb", zero_terminal_snr=True, noise_schedule="linear",
         beta_start=1e-4, beta_end=0.02, resolution=64, data="shapes:48@64"),
])
def test_short_run_lowers_validation_loss(tmp_path, overrides):
    result = run(tiny_config(tmp_path, max_steps=12, validation_every=1, use_ema=False, **overrides))
    losses = val_losses(result)
    assert len(losses) == 12 and min(losses[-3:]) < losses[0], losses
    assert all(k in result["val"][0] for k in ("val_loss_bin0", "val_loss_bin4"))
    folder = os.path.join(result["checkpoint"], "pipeline")
    scheduler_config = json.load(open(os.path.join(folder, "scheduler", "scheduler_config.json")))
    assert scheduler_config["clip_sample"] is False
    assert scheduler_config["prediction_type"] == overrides["prediction_type"]


def test_checkpoint_pipeline_opens_in_ldm_and_diffusers(tmp_path):
    from diffusers import DiffusionPipeline

    from ldm import Pipeline

    result = run(tiny_config(tmp_path, max_steps=2, validation_prompts=["a red circle on the left"],
                             num_validation_prompts=1, validation_every=2, validation_steps=2))
    folder = os.path.join(result["checkpoint"], "pipeline")
    assert os.path.isfile(os.path.join(tmp_path, "run", "samples", "step-00000002.png"))
    ours = Pipeline.from_pretrained(folder, scheduler="ddim")
    image = ours("a red circle on the left", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
    theirs = DiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    assert type(theirs).__name__ == "StableDiffusionPipeline"
    # EMA weights (decay 0.9 with warmup) differ from the raw training weights saved in the Accelerate state
    raw = load_file(os.path.join(result["checkpoint"], "accelerate", "model.safetensors"))
    name = "conv_in.weight"
    assert not torch.equal(raw[name], ours.unet.state_dict()[name])


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = run(tiny_config(tmp_path / "a", max_steps=6, checkpoint_every=3, caption_dropout=0.3))
    half = run(tiny_config(tmp_path / "b", max_steps=3, caption_dropout=0.3))
    resumed = run(tiny_config(tmp_path / "b", max_steps=6, resume="latest", caption_dropout=0.3))
    assert list(resumed["losses"]) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(resumed["losses"][step] - straight["losses"][step]) <= 1e-6
    for key in ("model.safetensors",):
        a = load_file(os.path.join(straight["checkpoint"], "accelerate", key))
        b = load_file(os.path.join(resumed["checkpoint"], "accelerate", key))
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ema_a = load_file(os.path.join(straight["checkpoint"], "pipeline", "unet", "diffusion_pytorch_model.safetensors"))
    ema_b = load_file(os.path.join(resumed["checkpoint"], "pipeline", "unet", "diffusion_pytorch_model.safetensors"))
    assert max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a) <= 1e-6
    state = json.load(open(os.path.join(resumed["checkpoint"], "trainer_state.json")))
    assert state["step"] == 6 and half["step"] == 3


def test_sigterm_writes_a_checkpoint_and_stops_cleanly(tmp_path, monkeypatch):
    from ldm.training import loop

    original = loop.accumulated_step
    sigterm_after_step(monkeypatch, 2)  # the second step: a real signal to this process, mid-run
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    result = run(tiny_config(tmp_path, max_steps=50))
    # the run's handlers are gone: the process's own ones are back, the very same objects
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert result["stopped_by"] == "SIGTERM" and result["step"] == 2
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "run"))] == ["checkpoint-00000002"]
    monkeypatch.setattr(loop, "accumulated_step", original)
    resumed = run(tiny_config(tmp_path, max_steps=3, resume="latest"))
    assert list(resumed["losses"]) == [3]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_nonfinite_loss_skips_the_update_and_is_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(step, "diffusion_loss", nan_loss_at(step, {2}))
    result = run(tiny_config(tmp_path, max_steps=4))
    assert result["nonfinite_total"] == 1 and result["step"] == 4
    weights = load_file(os.path.join(result["checkpoint"], "accelerate", "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nonfinite_losses_in_a_row_stop_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(step, "diffusion_loss", nan_loss_at(step, None))
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row at step 3"):
        run(tiny_config(tmp_path, max_steps=10, max_nonfinite_steps=3))


def test_checkpoint_total_limit_keeps_the_newest(tmp_path):
    result = run(tiny_config(tmp_path, max_steps=4, checkpoint_every=1, checkpoints_total_limit=2,
                             gradient_accumulation_steps=2))
    root = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(root)) == ["checkpoint-00000003", "checkpoint-00000004"]  # no .tmp leftovers
    assert result["checkpoint"].endswith("checkpoint-00000004")
    state = json.load(open(root / "checkpoint-00000004" / "trainer_state.json"))
    assert state["step"] == 4 and state["data"][0]["batch_in_epoch"] == 2  # 4 steps x 2 micro-batches of 8 = 64 > 48


def test_latent_cache_option_builds_on_first_use_then_reuses(tmp_path, caplog):
    import logging

    cache = str(tmp_path / "latents")
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        first = run(tiny_config(tmp_path, latent_cache=cache, max_steps=3, output_dir=str(tmp_path / "a")))
    assert "rebuilding" in caplog.text and os.path.isfile(os.path.join(cache, "cache.json"))
    shards = {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        second = run(tiny_config(tmp_path, latent_cache=cache, max_steps=3, output_dir=str(tmp_path / "b")))
    assert "rebuilding" not in caplog.text  # valid cache: reused, not re-encoded
    assert shards == {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)}
    assert first["losses"] == second["losses"]  # same latents, same randomness


def test_frozen_token_table_trains_the_rest_of_the_text_encoder(tmp_path):
    from ldm.models.presets import build_components

    result = run(tiny_config(tmp_path, max_steps=3, train_text_encoder=True, train_token_embeddings=False))
    from transformers import CLIPTextModel

    before = build_components("tiny", seed=0)["text_encoder"].state_dict()
    after = CLIPTextModel.from_pretrained(os.path.join(result["checkpoint"], "pipeline", "text_encoder")).state_dict()
    token_key = next(k for k in after if k.endswith("token_embedding.weight"))
    assert torch.equal(after[token_key], before[token_key])  # the 49408-row table is untouched ...
    changed = [k for k in after if k != token_key and not torch.equal(after[k], before[k])]
    assert any("layers.0" in k for k in changed)             # ... and the transformer layers learned


def test_optimizer_settings_are_checked_and_explained(tmp_path):
    with pytest.raises(ValueError, match="optimizer"):
        tiny_config(tmp_path, optimizer="sgd").validate()
    if not torch.cuda.is_available():  # refused at validation, before any model is built (tests/test_optimizers.py)
        with pytest.raises(ValueError, match="adamw_8bit needs a CUDA GPU"):
            run(tiny_config(tmp_path, optimizer="adamw_8bit"))


def test_channels_last_gives_the_same_losses(tmp_path):
    plain = run(tiny_config(tmp_path / "a", max_steps=3, use_ema=False))
    fast = run(tiny_config(tmp_path / "b", max_steps=3, use_ema=False, channels_last=True))
    assert list(plain["losses"]) == list(fast["losses"]) == [1, 2, 3]
    for a, b in zip(plain["losses"].values(), fast["losses"].values()):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a))


@pytest.fixture()
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state whose mixed precision cannot change: reset it around the test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_runs_the_frozen_vae_and_text_encoder_in_bf16_and_keeps_their_weights(tmp_path, monkeypatch,
                                                                                   fresh_accelerator_state):
    seen, build_models = {}, train_ldm.build_models

    def record(name):
        def hook(module, inputs, out):  # returns None: a forward hook's return value would replace the output
            seen.setdefault(name, set()).add(out.dtype)
        return hook

    def build_with_hooks(cfg):
        parts = build_models(cfg)
        first_linear = next(m for m in parts["text_encoder"].modules() if isinstance(m, torch.nn.Linear))
        first_linear.register_forward_hook(record("text_encoder"))
        parts["vae"].encoder.conv_in.register_forward_hook(record("vae"))
        return parts

    monkeypatch.setattr(train_ldm, "build_models", build_with_hooks)
    result = run(tiny_config(tmp_path, max_steps=2, use_ema=False, mixed_precision="bf16"))
    # the train steps encode in bf16, as diffusers' script does (the validation set, encoded once, in float32)
    assert torch.bfloat16 in seen["vae"] and torch.bfloat16 in seen["text_encoder"], seen
    assert all(torch.isfinite(torch.tensor(v)) for v in result["losses"].values())
    folder = os.path.join(result["checkpoint"], "pipeline")
    for part in ("vae", "text_encoder"):  # autocast, not a cast: the saved frozen weights stay float32
        weights = load_file(next(os.path.join(folder, part, f) for f in os.listdir(os.path.join(folder, part))
                                 if f.endswith(".safetensors")))
        assert {w.dtype for w in weights.values()} == {torch.float32}, part


def test_train_says_where_it_wrote_the_pipeline_and_its_checkpoints(tmp_path, capsys):
    result = run(tiny_config(tmp_path, max_steps=1))
    lines = capsys.readouterr().out.splitlines()
    pipeline = next(line for line in lines if line.startswith("train_ldm: wrote the pipeline folder")).split(": ")[-1]
    checkpoints = next(line for line in lines if line.startswith("train_ldm: checkpoints: ")).split(": ")[-1]
    assert pipeline == os.path.abspath(os.path.join(result["checkpoint"], "pipeline"))
    assert os.path.isfile(os.path.join(pipeline, "model_index.json"))
    assert checkpoints == os.path.abspath(tmp_path / "run" / "checkpoints") and os.path.dirname(pipeline) in [
        os.path.join(checkpoints, name) for name in os.listdir(checkpoints)]


def test_skipped_samples_report_starts_on_its_own_line_below_the_progress_bar(tmp_path, capsys, monkeypatch):
    import logging

    import PIL.Image

    monkeypatch.setattr(logging.root, "handlers", [])  # as in a terminal: no handler, warnings go to stderr

    data = tmp_path / "data"
    data.mkdir()
    for i, colour in enumerate(("red", "blue", "green", "yellow")):
        PIL.Image.new("RGB", (32, 32), colour).save(data / f"{colour}.png")
        (data / f"{colour}.txt").write_text(f"a {colour} square")
    (data / "broken.png").write_bytes(b"not a png")  # skipped at each epoch: the report comes mid-run
    run(tiny_config(tmp_path, data=str(data), batch_size=2, max_steps=4, log_every=0, ema_decay=0.0,
                    use_ema=False))
    err = capsys.readouterr().err
    reports = [line for line in err.split("\n") if "skipped 1 samples" in line]
    assert reports and "train" in err  # the bar was drawn, and the report written while it was
    for line in reports:  # what is left on the screen's line after the carriage returns: the report alone
        assert line.split("\r")[-1].startswith("epoch "), repr(line)
