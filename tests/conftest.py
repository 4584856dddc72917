"""Shared fixtures: tiny random models, built and saved once per session."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a hub

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the slow tier (tests marked @pytest.mark.slow); LDM_SLOW=1 does the same")


def run_slow(config) -> bool:
    """Returns whether this run includes the slow tier: `--runslow` or LDM_SLOW=1 (any value but '', '0')."""
    return config.getoption("--runslow") or os.environ.get("LDM_SLOW", "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    """The fast tier (a plain `pytest`) deselects the tests marked slow: trainings of more than a few steps,
    multi-process launches, the browser. Deselected, not skipped: no slow test reads as passed-by-skipping, and
    `--runslow -m slow` runs the slow tier alone."""
    if run_slow(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_report_header(config):
    if run_slow(config):
        return "ldm test tiers: fast and slow (--runslow / LDM_SLOW=1)"
    return "ldm test tiers: fast only; tests marked slow are deselected (add --runslow or set LDM_SLOW=1)"


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny random pipeline saved by our save_pretrained; returns its path."""
    from ldm import Pipeline
    from ldm.models.presets import build_components

    path = tmp_path_factory.mktemp("models") / "tiny"
    Pipeline(**build_components("tiny", seed=0)).save_pretrained(path)
    return str(path)


@pytest.fixture()
def tiny_pipe(tiny_folder):
    from ldm import Pipeline

    pipe = Pipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def one_thread():
    """Runs a module's tests on one torch thread: tiny models on two shared cores are up to 10x slower otherwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def short_demo(tmp_path_factory):
    """`ldm demo` shortened (700 VAE and 600 LDM steps, the prompts' wording only, DDIM only), run once per
    session: the demo test grades it and the fine-tuning tests start from its pipeline. Its VAE also saw the scenes
    on a dark background (vae_dark_fraction) and crops of photographs (vae_photo_fraction), so that a LoRA can
    teach the model a dark style or the look of a folder of photographs."""
    from ldm.training.demo import DemoConfig, run_demo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # minutes only caps each phase's time (the VAE gets 12%): at 30 the step counts decide, not the machine's load
    cfg = DemoConfig(out=str(tmp_path_factory.mktemp("demo") / "demo"), minutes=30.0, num_samples=2000,
                     vae_steps=700, ldm_steps=600, num_prompts=30, sample_steps=25, vae_dark_fraction=0.5,
                     vae_photo_fraction=0.5, canonical_captions=True, num_pair_prompts=10, threads=1)
    report = run_demo(cfg, samplers=("ddim",))
    torch.set_num_threads(threads)
    return cfg, report


def diffusers_pair(folder):
    """Returns (our Pipeline, diffusers' StableDiffusionPipeline) loaded from the same folder, progress bars off."""
    from diffusers import StableDiffusionPipeline

    from ldm import Pipeline

    ours = Pipeline.from_pretrained(folder)
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def nan_loss_at(module, calls_to_poison):
    """Returns a stand-in for module.diffusion_loss whose loss is NaN on the given call numbers (1-based; None:
    every call): a non-finite loss as fp16 overflow or bad data would give."""
    original = module.diffusion_loss
    calls = {"n": 0}

    def loss_fn(*args, **kwargs):
        loss, per_sample = original(*args, **kwargs)
        calls["n"] += 1
        if calls_to_poison is None or calls["n"] in calls_to_poison:
            loss = loss * float("nan")
        return loss, per_sample

    return loss_fn


def sigterm_after_step(monkeypatch, stop_step: int) -> None:
    """Makes the shared training loop send this process a real SIGTERM right after optimiser step `stop_step`
    (1-based), whichever trainer runs it."""
    import signal

    from ldm.training import loop

    original = loop.accumulated_step

    def step_then_signal(accelerator, trainer, settings, state):
        result = original(accelerator, trainer, settings, state)
        if state["step"] + 1 == stop_step:  # state["step"] counts up after the call returns
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(loop, "accumulated_step", step_then_signal)


def two_cpu_processes(script: str, *args: str) -> list[str]:
    """Returns the command that runs train/SCRIPT under `accelerate launch` as two CPU processes (gloo)."""
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            os.path.join(repo, "train", script), *args]
