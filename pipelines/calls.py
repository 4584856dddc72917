"""Running a pipeline call: in inference mode (or no_grad where that would not pay), with every tensor it returns
made an ordinary one, and with the text encoder's LoRA layers scaled for the call."""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

from ldm.pipelines.output import PipelineOutput, StepRecord


@contextlib.contextmanager
def lora_scaled(text_encoder, lora_scale: float | None):
    """Multiplies the module's PEFT LoRA layers by lora_scale inside the block (no-op without one)."""
    if lora_scale is None or not USE_PEFT_BACKEND:
        yield
        return
    scale_lora_layers(text_encoder, lora_scale)
    try:
        yield
    finally:
        unscale_lora_layers(text_encoder, lora_scale)


def use_no_grad(pipe) -> bool:
    """True where inference mode would not pay or would harm: a compiled UNet (module.compile() or
    torch.compile), or CPU offload, whose hooks move weights during the call (made inside inference mode,
    they would come out as inference tensors that autograd refuses)."""
    model = pipe.denoiser
    compiled = getattr(model, "_compiled_call_impl", None) is not None or hasattr(model, "_orig_mod")
    return compiled or getattr(pipe, "_offload_device", None) is not None


def ordinary(x):
    """Returns x with every inference-mode tensor in it cloned into an ordinary one (usable by autograd)."""
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_inference() else x
    if isinstance(x, StepRecord):
        return dataclasses.replace(x, **{f: ordinary(getattr(x, f)) for f in StepRecord.FIELDS})
    if isinstance(x, PipelineOutput):
        return PipelineOutput(images=ordinary(x.images), trace=ordinary(x.trace))
    if isinstance(x, (list, tuple)):
        return type(x)(ordinary(v) for v in x)
    return x


def inference(call):
    """Runs a pipeline call under torch.inference_mode, which skips autograd's per-operation bookkeeping
    (version counters, view tracking; its gain on the CPU: benchmarks/BENCHMARKS.md, Sampling). Tensors it
    returns are ordinary ones. A compiled UNet has no such overhead to save and runs under no_grad, the mode its
    graphs were captured and benchmarked in; so does a pipeline with CPU offload."""
    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        with torch.no_grad() if use_no_grad(self) else torch.inference_mode():
            out = call(self, *args, **kwargs)
        return ordinary(out)
    return wrapper
