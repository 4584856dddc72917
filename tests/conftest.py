"""Shared fixtures: tiny random models, built and saved once per session."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a hub

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny random pipeline saved by our save_pretrained; returns its path."""
    from ldm import Pipeline
    from ldm.presets import build_components

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
    """`ldm demo` shortened (about 2.5 minutes: 400 VAE and 600 LDM steps, DDIM only), run once per session:
    the demo test grades it and the fine-tuning test starts from its pipeline. Its VAE also saw the scenes on a
    dark background (vae_dark_fraction), so that a LoRA can teach the model a dark style."""
    from ldm.training.demo import DemoConfig, run_demo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # minutes only caps each phase's time (the VAE gets 12%): at 30 the step counts decide, not the machine's load
    cfg = DemoConfig(out=str(tmp_path_factory.mktemp("demo") / "demo"), minutes=30.0, num_samples=2000,
                     vae_steps=400, ldm_steps=600, num_prompts=30, sample_steps=25, vae_dark_fraction=0.5,
                     threads=1)
    report = run_demo(cfg, samplers=("ddim",))
    torch.set_num_threads(threads)
    return cfg, report
