"""The optimisers every trainer can use (`--optimizer`), their recommended settings, and the train/eval modes of
schedule-free AdamW.

    adamw                PyTorch's AdamW, fused kernel on CUDA and CPU (Loshchilov & Hutter 2019, arXiv:1711.05101)
    adamw_8bit           bitsandbytes' 8-bit AdamW (Dettmers et al. 2022, arXiv:2110.02861); CUDA GPUs only
    prodigy              prodigyopt.Prodigy (Mishchenko & Defazio 2023, arXiv:2306.06101): estimates the step size
                         d itself; the learning rate is a multiplier on it (1.0), d_coef scales the estimate
    adafactor            transformers' Adafactor (Shazeer & Stern 2018, arXiv:1804.04235) with an external learning
                         rate: factored second moments, no first moment (the least optimiser memory)
    schedule_free_adamw  schedulefree.AdamWScheduleFree (Defazio et al. 2024, arXiv:2405.15682): no lr schedule (the
                         lr scheduler must be constant; its warm-up runs inside the optimiser); the weights are the
                         averaged sequence x only in eval mode, so the loop switches modes around validation,
                         checkpoints and the end (set_mode)

Exact resume: each keeps all it needs in `state_dict()` (Prodigy's d, d_numerator and step k in its param groups;
schedule-free's z and the weight sum, its train_mode flag in the groups), which Accelerate's save_state writes.
"""
from __future__ import annotations

import torch

OPTIMIZERS = ("adamw", "adamw_8bit", "prodigy", "adafactor", "schedule_free_adamw")
CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")  # what schedule-free takes (its warm-up is its own)
PRODIGY_LEARNING_RATE = 1.0  # Prodigy's docstring: "Leave LR set to 1 unless you encounter instability"


def recommended_learning_rate(kind: str, usual: float) -> float:
    """Returns the learning rate to start from with optimiser `kind`: 1.0 for Prodigy (a multiplier on its own
    estimate), else `usual` (the trainer's AdamW default; Adafactor and schedule-free AdamW start there too)."""
    return PRODIGY_LEARNING_RATE if kind == "prodigy" else usual


def check_optimizer(kind: str, learning_rate: float, on_gpu: bool) -> None:
    """Raises ValueError (before any work) for an unknown optimiser, 8-bit AdamW without a CUDA GPU or without
    bitsandbytes, and Prodigy with a learning rate meant for AdamW; learning_rate 0 means "not set yet"."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"--optimizer {kind!r} is not one of {OPTIMIZERS}")
    if kind == "adamw_8bit" and not on_gpu:
        raise ValueError("--optimizer adamw_8bit needs a CUDA GPU (bitsandbytes' 8-bit AdamW has no CPU kernel) and "
                         "this run has none; use --optimizer adamw, or adafactor for the least optimiser memory")
    if kind == "adamw_8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("--optimizer adamw_8bit needs bitsandbytes: pip install bitsandbytes (CUDA GPUs); or "
                             "use --optimizer adamw") from None
    if kind == "prodigy" and 0 < learning_rate < 0.1:
        raise ValueError(f"--optimizer prodigy estimates the step size itself and its learning rate multiplies that "
                         f"estimate: {learning_rate:g} would train ~{1 / learning_rate:.0f}x too slowly; pass "
                         "--learning-rate 1.0 (recommended) and scale with --prodigy-d-coef instead")


def check_schedule(kind: str, lr_scheduler: str) -> None:
    """Raises ValueError when schedule-free AdamW is given a decaying lr schedule (it replaces the schedule)."""
    if kind == "schedule_free_adamw" and lr_scheduler not in CONSTANT_SCHEDULES:
        raise ValueError(f"--optimizer schedule_free_adamw replaces the lr schedule (Defazio et al. 2024) and needs "
                         f"a constant one, got --lr-scheduler {lr_scheduler}; pass --lr-scheduler constant "
                         "(--lr-warmup-steps still warms up, inside the optimiser)")


def make_optimizer(params, learning_rate: float, device, betas=(0.9, 0.999), weight_decay: float = 0.0,
                   eps: float = 1e-8, kind: str = "adamw", warmup_steps: int = 0,
                   d_coef: float = 1.0) -> torch.optim.Optimizer:
    """Returns optimiser `kind` (OPTIMIZERS) over `params` (tensors or param groups) with these settings; AdamW
    uses PyTorch's fused kernel on CUDA and CPU (faster steps than the per-tensor loop; benchmarks/BENCHMARKS.md).
    warmup_steps is used by schedule-free AdamW only (the others warm up through the lr scheduler)."""
    check_optimizer(kind, learning_rate, torch.device(device).type == "cuda")
    adam = dict(lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps)
    if kind == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **adam)
    if kind == "prodigy":
        from prodigyopt import Prodigy

        # the Prodigy README's advice for diffusion models: safeguard_warmup (d does not overshoot while the lr
        # warms up) and use_bias_correction (d grows more slowly over the first ~50 steps); AdamW-style decay
        return Prodigy(params, **adam, decouple=True, use_bias_correction=True, safeguard_warmup=True, d_coef=d_coef)
    if kind == "adafactor":
        from transformers.optimization import Adafactor

        # an external lr: relative_step, scale_parameter and warmup_init off (transformers' Adafactor docstring);
        # beta1 None keeps no first moment
        return Adafactor(params, lr=learning_rate, weight_decay=weight_decay, relative_step=False,
                         scale_parameter=False, warmup_init=False)
    if kind == "schedule_free_adamw":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(params, **adam, warmup_steps=warmup_steps)
    return torch.optim.AdamW(params, fused=True if torch.device(device).type in ("cuda", "cpu") else None, **adam)


def lr_schedule_for(optimizer, name: str, warmup_steps: int) -> tuple[str, int]:
    """Returns the (lr schedule name, warm-up steps) the lr scheduler gets: schedule-free AdamW warms up inside
    the optimiser and takes a constant schedule; the others take (name, warmup_steps) unchanged."""
    if not is_schedule_free(optimizer):
        return name, warmup_steps
    check_schedule("schedule_free_adamw", name)
    return "constant", 0


def is_schedule_free(optimizer) -> bool:
    """Returns whether `optimizer` (or the one an Accelerate wrapper holds) has schedule-free train/eval modes."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return any("train_mode" in group for group in inner.param_groups)


def set_mode(optimizer, training: bool) -> None:
    """Puts schedule-free AdamW in train mode (the weights are the gradient point y) or eval mode (the averaged x,
    what validation, sampling and saved weights use), as its README asks; does nothing for the other optimisers."""
    if is_schedule_free(optimizer):
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.train() if training else inner.eval()
