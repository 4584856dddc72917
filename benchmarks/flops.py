"""Counted FLOPs and timed steps of a denoiser, shared by compare_backbones.py and bench_dit.py.

FLOPs are counted by PyTorch's own FlopCounterMode (torch.utils.flop_counter: every matmul, convolution and
attention kernel the call runs, forward and, for a training step, backward), not estimated from a formula.
Element-wise work (norms, activations, the optimiser) is not counted, as in every MFU figure.
"""
from __future__ import annotations

import statistics
import time

import torch

from ldm.models.denoiser import denoise


def inputs(model, batch: int, latent: int, tokens: int, width: int, device="cpu", dtype=torch.float32):
    """Returns (latents (B, C, h, h), times (B,), text (B, L, E)): random inputs of the model's shape."""
    g = torch.Generator().manual_seed(0)
    channels = model.config.in_channels
    x = torch.randn(batch, channels, latent, latent, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    text = torch.randn(batch, tokens, width, generator=g).to(device, dtype)
    return x, t, text


def train_step(model, optimizer, x, t, text) -> None:
    """One epsilon-MSE training step (forward, backward, AdamW)."""
    loss = (denoise(model, x, t, text).float() - x.float()).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count_flops(fn) -> int:
    """Returns the FLOPs that `fn()` runs (matmuls, convolutions, attention; forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def seconds_per_call(fn, repeats: int = 10, warmup: int = 3, sync=None) -> float:
    """Returns the median wall-clock seconds of `fn()` over `repeats` calls after `warmup` untimed ones."""
    times = []
    for i in range(warmup + repeats):
        started = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


class TrainStep:
    """One model's training step on fixed random inputs (batch, latent side, text tokens, text width): call it to
    step; flops() counts one training step and one guided sampling call per image (2 rows, the CFG branches)."""

    def __init__(self, model, batch: int, latent: int, tokens: int, width: int):
        self.model = model.train()
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.x, self.t, self.text = inputs(model, batch, latent, tokens, width)

    def __call__(self) -> None:
        train_step(self.model, self.optimizer, self.x, self.t, self.text)

    def flops(self) -> dict:
        train = count_flops(self)
        with torch.no_grad():
            sample = count_flops(lambda: denoise(self.model, self.x[:2], self.t[:2], self.text[:2]))
        return {"train_flops": train, "sample_flops": sample}


def interleaved_seconds(steps: dict, repeats: int = 10, warmup: int = 3) -> dict:
    """Returns {name: median seconds of steps[name]()}, the calls taken round-robin (a, b, c, a, b, c, ...), so
    that a change in the machine's load during the measurement slows every model alike."""
    times = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}
