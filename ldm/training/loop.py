"""The one training loop, shared by `ldm train`, `ldm train-vae`, `ldm finetune` and the demo (which runs the first
two). It owns what every trainer needs and none should write twice: gradient accumulation, clipping, the
non-finite guard, the progress bar, tracker logging, validation at fixed steps, stops agreed across ranks (max_steps,
max_minutes, SIGTERM/Ctrl-C), atomic checkpoints with a total limit, and exact resume.

A trainer supplies only its models, its loss and its validation, as a `Trainer` (build it, `accelerator.prepare` its
models, then call `train(accelerator, trainer, settings)`):

    class MyTrainer(Trainer):
        def micro_loss(self, step, micro): return loss, {"rec": ...}   # one micro-batch of optimiser step `step`
        def validate(self, state): return {...}                          # every validation_every steps
        def write_extra(self, folder, state): ...                        # the inference folder of a checkpoint

`state` is the trainer state saved in each checkpoint's trainer_state.json: "step", the non-finite counters
("nonfinite_in_a_row", reset by every good update, and "nonfinite_total"), "data" (each rank's data position),
"history" (validation records) and, with keep_losses, "losses".
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ldm.training.checkpoint import read_state, resolve_resume, save_checkpoint
from ldm.training.config import every
from ldm.training.optimizers import lr_schedule_for, set_mode
from ldm.training.optimizers import make_optimizer  # noqa: F401  (re-exported: the trainers call loop.make_optimizer)
from ldm.training.ranks import collective_timeout, lost_ranks_named
from ldm.training.signals import StopRequest, agreed_stop_reason


@dataclass
class LoopSettings:
    """The loop's settings; `from_config` copies the fields of the same name from a trainer's config."""
    output_dir: str
    max_steps: int
    max_minutes: float = 0.0              # 0 = no time limit
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 0.0            # 0 = no clipping
    max_nonfinite_steps: int = 10
    checkpoint_every: int = 0             # 0 = only at the end / on a stop
    checkpoints_total_limit: int = 0      # 0 = keep all
    checkpoint_at_end: bool = True        # also at max_steps (fine-tuning writes its outputs instead)
    validation_every: int = 0             # 0 = never
    log_every: int = 0                    # 0 = never
    print_logs: bool = False              # also print the logs at log_every (besides the trackers)
    keep_losses: bool = False             # keep every step's loss in the state (a resumed run reports all of them)
    resume: str = ""                      # "", "latest" or a checkpoint folder
    name: str = "train"                   # the progress bar's label

    @classmethod
    def from_config(cls, cfg, **overrides) -> "LoopSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {name: getattr(cfg, name) for name in names if hasattr(cfg, name)}
        return cls(**{**values, **overrides})


class Trainer:
    """What a trainer gives the loop. Set `model` (the prepared module whose gradients accumulate), `params` (what
    is clipped and stepped), `optimizer` and `lr_scheduler` (both prepared); override `micro_loss` and any hook."""
    model: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    stop_reason: str | None = None  # set by validate() to stop at once, without a checkpoint

    def micro_loss(self, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        """Returns (loss, logs) of micro-batch `micro` of optimiser step `step` (0-based); logs are floats. A "loss"
        entry in logs is what the loop reports (progress, losses) instead of the loss it backpropagates."""
        raise NotImplementedError

    def after_update(self, state: dict) -> None:
        """Runs after each optimiser step (skipped updates included; state["nonfinite_in_a_row"] > 0 then)."""

    def validate(self, state: dict) -> dict | None:
        """Returns this step's validation record (kept in state["history"]), or None."""
        return None

    def before_checkpoint(self, state: dict) -> None:
        """Runs on every rank before a checkpoint is written (e.g. gathering sharded weights for write_extra)."""

    def write_extra(self, folder: str, state: dict) -> None:
        """Writes what a checkpoint holds beside the Accelerate state (main process only): the inference folder."""

    def load_extra(self, checkpoint: str, state: dict) -> None:
        """Reads back what write_extra wrote that the trainer needs to continue (after the Accelerate state)."""

    def data_position(self):
        """Returns this rank's position in its data (JSON-able), for an exact resume."""
        return None

    def seek(self, position) -> None:
        """Moves this rank's data to a position of data_position()."""


def new_state(**extra) -> dict:
    """Returns a fresh trainer state: step 0, no non-finite updates, no history, plus `extra`."""
    return {"step": 0, "nonfinite_total": 0, "nonfinite_in_a_row": 0, "history": [], **extra}


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


def accumulated_step(accelerator, trainer: Trainer, settings: LoopSettings, state: dict) -> tuple[float, dict]:
    """Runs one optimiser step over gradient_accumulation_steps micro-batches; returns the mean loss over them and
    ranks, and the last micro-batch's logs.

    accelerator.backward divides each micro-batch's loss by their number (the Accelerator must have been built
    with gradient_accumulation_steps), so the update is that of their mean.
    """
    total, logs, n = 0.0, {}, settings.gradient_accumulation_steps
    for micro in range(n):
        with accelerator.accumulate(trainer.model):
            loss, logs = trainer.micro_loss(state["step"], micro)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                guarded_update(accelerator, trainer.params, settings.max_grad_norm, trainer.optimizer,
                               trainer.lr_scheduler, state)
        shown = torch.as_tensor(logs.pop("loss", loss.detach()), device=accelerator.device)  # logs may name another
        total += accelerator.reduce(shown.float(), "mean").item() / n
    trainer.after_update(state)
    return total, logs


def stop_if_nonfinite(state: dict, max_in_a_row: int) -> None:
    """Raises RuntimeError once `max_in_a_row` updates in a row were skipped for non-finite gradients."""
    if state["nonfinite_in_a_row"] >= max_in_a_row:
        raise RuntimeError(f"stopped: {state['nonfinite_in_a_row']} non-finite losses in a row at step {state['step']} "
                           f"(skipped {state['nonfinite_total']} in all); lower the learning rate, use bf16 rather "
                           "than fp16, or check the data")


def resume(accelerator, trainer: Trainer, checkpoint: str) -> dict:
    """Loads a checkpoint into the prepared models, optimiser, lr schedule and RNG (Accelerate's state) and the
    trainer; returns the trainer state."""
    accelerator.load_state(os.path.join(checkpoint, "accelerate"))
    state = {**new_state(), **read_state(checkpoint)}
    data = state.get("data")
    trainer.seek(data[accelerator.process_index] if isinstance(data, list) else data)
    if "losses" in state:
        state["losses"] = {int(step): loss for step, loss in state["losses"].items()}  # JSON keys are strings
    trainer.load_extra(checkpoint, state)
    accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    return state


def write_checkpoint(accelerator, trainer: Trainer, settings: LoopSettings, state: dict) -> str:
    """Writes checkpoint-<step> (ldm.training.checkpoint, atomic) with every rank's data position."""
    positions = accelerator.gather_for_metrics([trainer.data_position()], use_gather_object=True)
    trainer.before_checkpoint(state)
    state = {**state, "data": positions}
    return save_checkpoint(accelerator, settings.output_dir, state["step"], state,
                           lambda folder: trainer.write_extra(folder, state), settings.checkpoints_total_limit)


def _log(accelerator, settings: LoopSettings, trainer: Trainer, state: dict, loss: float, logs: dict) -> None:
    record = {"loss": loss, **logs, "lr": trainer.lr_scheduler.get_last_lr()[0],
              "nonfinite_total": state["nonfinite_total"]}
    accelerator.log(record, step=state["step"])
    if settings.print_logs:
        accelerator.print(f"{settings.name} step {state['step']}: "
                          + ", ".join(f"{k} {float(v):.4g}" for k, v in record.items()))


def train(accelerator, trainer: Trainer, settings: LoopSettings) -> dict:
    """Trains from step 0 or from settings.resume until max_steps or a stop; returns {"step", "losses" (this run's,
    or all with keep_losses), "history" (validation records), "checkpoint" (the last written), "stopped_by" (None,
    "max_minutes", "SIGTERM", "SIGINT" or the trainer's stop_reason), "nonfinite_total", "state"}."""
    checkpoint = resolve_resume(settings.resume, settings.output_dir)
    state = resume(accelerator, trainer, checkpoint) if checkpoint else new_state()
    losses = state.setdefault("losses", {}) if settings.keep_losses else {}
    last, stopped_by, started = checkpoint, None, time.time()
    progress = tqdm(total=settings.max_steps, initial=state["step"], desc=settings.name,
                    disable=not accelerator.is_local_main_process)
    # Warnings logged while the bar is drawn (the data's skipped-samples report at each epoch's end) go through
    # tqdm.write: each on a line of its own, the bar redrawn below it, instead of glued to the bar's line.
    # A rank that dies or hangs: the others stop with an error naming it (ldm.training.ranks), not a bare gloo one.
    named = lost_ranks_named(accelerator, lambda: resolve_resume("latest", settings.output_dir))
    with StopRequest() as stop, logging_redirect_tqdm(tqdm_class=tqdm), named:
        while state["step"] < settings.max_steps:
            set_mode(trainer.optimizer, training=True)  # schedule-free: step from y (validation, checkpoints: x)
            loss, logs = accumulated_step(accelerator, trainer, settings, state)
            state["step"] += 1
            losses[state["step"]] = loss
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
            stop_if_nonfinite(state, settings.max_nonfinite_steps)
            at_end = state["step"] == settings.max_steps
            if every(state["step"], settings.log_every):
                _log(accelerator, settings, trainer, state, loss, logs)
            if every(state["step"], settings.validation_every) or (settings.validation_every and at_end):
                set_mode(trainer.optimizer, training=False)  # schedule-free: validate the averaged weights
                record = trainer.validate(state)
                if record is not None:
                    state["history"].append(record)
            if trainer.stop_reason:
                stopped_by = trainer.stop_reason
                break
            stopped_by = agreed_stop_reason(accelerator, stop, started, settings.max_minutes)
            if every(state["step"], settings.checkpoint_every) or (settings.checkpoint_at_end and at_end) or stopped_by:
                set_mode(trainer.optimizer, training=False)  # schedule-free: checkpoint the averaged weights
                last = write_checkpoint(accelerator, trainer, settings, state)
            if stopped_by:
                accelerator.print(f"stopped by {stopped_by} at step {state['step']}; checkpoint {last}; "
                                  "continue with --resume latest")
                break
    progress.close()
    set_mode(trainer.optimizer, training=False)  # what the trainer writes after the loop: the averaged weights
    return {"step": state["step"], "losses": losses, "history": state["history"], "checkpoint": last,
            "stopped_by": stopped_by, "nonfinite_total": state["nonfinite_total"], "state": state}


def make_lr_scheduler(name: str, optimizer, warmup_steps: int, max_steps: int, num_processes: int):
    """Returns diffusers' lr schedule `name` (constant for schedule-free AdamW, which warms up itself); counted per
    process, as the prepared schedule steps once per process."""
    from diffusers.optimization import get_scheduler

    name, warmup_steps = lr_schedule_for(optimizer, name, warmup_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps * num_processes,
                         num_training_steps=max_steps * num_processes)


def make_accelerator(cfg, output_dir: str, cpu: bool = False, log_with: str | None = None):
    """Returns the Accelerator of a run: mixed precision, gradient accumulation and the collectives' timeout
    (cfg.ddp_timeout) from `cfg`; several processes on a machine without GPUs join with gloo (cpu=True), as
    `accelerate launch --multi_gpu` there needs, and shard the model with FSDP2 when launched with an FSDP config."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from ldm.training.fsdp import allow_fsdp_on_cpu

    several_cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    if not torch.cuda.is_available():  # Accelerate's unwrap_model imports DeepSpeed when installed; name its choice
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # (the CPU) so that it does not warn it found no accelerator
    # DeepSpeed on CPUs (DS_ACCELERATOR=cpu): Accelerate starts DeepSpeed only when cpu=False, and counts its
    # processes only when given a backend (it has none for a machine without an accelerator): name gloo.
    deepspeed = several_cpu_processes and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    init = collective_timeout(cfg.ddp_timeout, "gloo" if deepspeed else None)  # None: Accelerate's defaults
    accelerator = Accelerator(cpu=cpu or (several_cpu_processes and not deepspeed),
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision, log_with=log_with,
                              kwargs_handlers=[init] if init else None,
                              project_config=ProjectConfiguration(project_dir=output_dir,
                                                                  logging_dir=os.path.join(output_dir, "logs")))
    allow_fsdp_on_cpu(accelerator)  # an FSDP launch config on a CPU: FSDP2 over gloo (ldm.training.fsdp)
    if accelerator.state.deepspeed_plugin is not None:  # every trainer: our batch streams are no DataLoader it reads
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    return accelerator
