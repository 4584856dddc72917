"""A pipeline folder with a LoRA fused into its weights (`ldm merge-lora`, `ldm finetune --save_pipeline`)."""
from __future__ import annotations

import os

from ldm.models.lora import lora_path
from ldm.pipelines.stable import Pipeline


def merge_lora(model: str, lora: str, out: str, scale: float = 1.0) -> str:
    """Writes OUT: the pipeline folder MODEL with the LoRA fused into its weights (W + scale * B A; LoHa, LoKr and
    DoRA fuse their own delta through peft's merge); returns OUT."""
    if not os.path.isdir(model):
        raise FileNotFoundError(f"model folder {model} does not exist; pass the base model the LoRA was trained on")
    pipe = Pipeline.from_pretrained(model)
    pipe.load_lora_weights(lora_path(lora), adapter_name="merged")
    if pipe.transformer is not None:
        pipe.transformer.fuse_lora(lora_scale=scale, adapter_names=["merged"])
        pipe.transformer.unload_lora()  # the fused weights stay; the adapter layers go
    else:
        components = ["unet", "text_encoder"] + (["text_encoder_2"] if pipe.is_sdxl else [])
        pipe.fuse_lora(components=components, lora_scale=scale, adapter_names=["merged"])
        pipe.unload_lora_weights()
    pipe.save_pretrained(out)
    return out
