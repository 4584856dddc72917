"""The optimiser step every training loop shares: gradient accumulation, clipping and the non-finite guard.

`state` is the loop's trainer state (saved in each checkpoint's trainer_state.json); the guard keeps its
counters there: "nonfinite_in_a_row" (reset by every good update) and "nonfinite_total".
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def new_state(**extra) -> dict:
    """Returns a fresh trainer state: step 0, no non-finite updates, plus `extra` (e.g. the data position)."""
    return {"step": 0, "nonfinite_total": 0, "nonfinite_in_a_row": 0, **extra}


def guarded_update(accelerator, params, max_grad_norm: float, optimizer, lr_scheduler, state: dict) -> None:
    """Clips the gradients to max_grad_norm (<= 0: no clipping) and steps the optimiser, or, when their norm is not
    finite (a NaN/inf loss or overflow), skips the update and counts it; the lr schedule advances either way."""
    norm = accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    if torch.isfinite(torch.as_tensor(norm)):  # the same on every rank: gradients are all-reduced
        optimizer.step()
        state["nonfinite_in_a_row"] = 0
    else:
        state["nonfinite_in_a_row"] += 1
        state["nonfinite_total"] += 1
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def accumulated_step(accelerator, model, micro_loss: Callable[[int], torch.Tensor], accumulation_steps: int, params,
                     max_grad_norm: float, optimizer, lr_scheduler, state: dict) -> float:
    """Runs one optimiser step over `accumulation_steps` micro-batches; returns the mean loss over them and ranks.

    micro_loss(micro) returns the loss of micro-batch `micro`; accelerator.backward divides it by the number of
    micro-batches (the Accelerator must have been built with gradient_accumulation_steps=accumulation_steps), so
    the update is that of their mean.
    """
    total = 0.0
    for micro in range(accumulation_steps):
        with accelerator.accumulate(model):
            loss = micro_loss(micro)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                guarded_update(accelerator, params, max_grad_norm, optimizer, lr_scheduler, state)
        total += accelerator.reduce(loss.detach(), "mean").item() / accumulation_steps
    return total


def stop_if_nonfinite(state: dict, max_in_a_row: int) -> None:
    """Raises RuntimeError once `max_in_a_row` updates in a row were skipped for non-finite gradients."""
    if state["nonfinite_in_a_row"] >= max_in_a_row:
        raise RuntimeError(f"stopped: {state['nonfinite_in_a_row']} non-finite losses in a row at step {state['step']} "
                           f"(skipped {state['nonfinite_total']} in all); lower the learning rate, use bf16 rather "
                           "than fp16, or check the data")
