"""Checkpoints: Accelerate state + an inference-ready folder, written under a temporary name and renamed.

    output_dir/checkpoints/checkpoint-00000500/
        accelerate/            accelerator.save_state: model (LoRA: its adapters only), optimiser, lr scheduler,
                               EMA, RNG states
        pipeline/ (or vae/)    what inference loads directly (EMA weights when EMA is on)
        config.yaml            the resolved config of the run
        trainer_state.json     step and counters; written last, so its presence marks a complete checkpoint

Old checkpoints beyond the total limit are deleted only after the new one is renamed into place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"checkpoint-(\d+)$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def where_written(name: str, what: str, path: str | None, output_dir: str) -> str:
    """Returns the end-of-run lines naming where the run wrote `what` (`path`; None when the run ended before its
    first checkpoint) and its checkpoints, one absolute path per line."""
    if path is None:
        return f"{name}: the run ended before its first checkpoint, so no {what} was written"
    return (f"{name}: wrote the {what}: {os.path.abspath(path)}\n"
            f"{name}: checkpoints: {os.path.abspath(checkpoint_root(output_dir))}")


def list_checkpoints(output_dir: str) -> list[str]:
    """Returns the complete checkpoint folders of a run, oldest first."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _NAME.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str, output_dir: str) -> str | None:
    """Returns the checkpoint folder to resume from ("" -> None; "latest" -> newest or None), or raises."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise FileNotFoundError(f"{resume} is not a complete checkpoint (no {STATE_FILE}); pass a "
                                f"{checkpoint_root(output_dir)}/checkpoint-N folder or 'latest'")
    return resume


def read_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, write_extra: Callable[[str], None],
                    total_limit: int) -> str:
    """Writes checkpoint-<step> atomically (all ranks call this) and returns its path.

    write_extra(tmp_folder) runs on the main process only and writes the inference folder and config.
    """
    final = os.path.join(checkpoint_root(output_dir), f"checkpoint-{step:08d}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crash mid-save
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(os.path.join(tmp, "accelerate"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_extra(tmp)
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump({**state, "step": step}, f, indent=2)
        if os.path.exists(final):  # the same step saved twice (e.g. a stop right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def keep_only_trainable(accelerator) -> None:
    """Makes accelerator.save_state write, for each prepared model, only the parameters that require grad (a
    LoRA's adapters instead of the whole UNet: the frozen rest comes from the base model at resume), and
    load_state read them back, refusing a file whose names or shapes differ from the trainable ones. Only where
    Accelerate hands the hooks the state dicts (one process or DDP); FSDP and DeepSpeed save as usual."""
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file

    own_engine = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP,
                                                  DistributedType.MEGATRON_LM)

    def trainable(model) -> dict[str, tuple]:
        return {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}

    def save_hook(models, weights, output_dir):
        if not own_engine:
            for i, model in enumerate(models):
                names = trainable(model)
                weights[i] = {k: v for k, v in weights[i].items() if k in names}

    def load_hook(models, input_dir):
        if own_engine:
            return
        fix = "resume with the settings it was saved with (the same --method, --lora-rank, --train-text-encoder)"
        for i, model in enumerate(models):
            path = os.path.join(input_dir, f"model{f'_{i}' if i else ''}.safetensors")
            if not os.path.isfile(path):
                raise ValueError(f"{path} is missing: the checkpoint trained fewer models than this run; {fix}")
            state = load_file(path, device=str(next(model.parameters()).device))
            if {k: tuple(v.shape) for k, v in state.items()} != trainable(model):
                raise ValueError(f"{path} holds {len(state)} tensors that are not the {len(trainable(model))} "
                                 f"trainable parameters of this run's model (names and shapes); {fix}")
            model.load_state_dict(state, strict=False)
        models.clear()  # loaded: Accelerate skips them

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def prune_checkpoints(output_dir: str, total_limit: int) -> list[str]:
    """Deletes the oldest complete checkpoints beyond `total_limit` (<= 0: keep all); returns those deleted."""
    found = list_checkpoints(output_dir)
    doomed = found[:-total_limit] if total_limit > 0 else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
