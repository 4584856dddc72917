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
