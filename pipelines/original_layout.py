"""Key names of the original Stable Diffusion checkpoint layout (CompVis/ldm, Stability AI), from diffusers'.

One single file holds the three networks under fixed prefixes:
    model.diffusion_model.*   the UNet (openaimodel.UNetModel: input_blocks, middle_block, output_blocks)
    first_stage_model.*       the VAE (encoder.down.{i}.block.{j}, decoder.up.{i}.block.{j}, mid.attn_1 ...)
    cond_stage_model.transformer.text_model.*   SD 1.x: OpenAI CLIP as transformers 4 names it
    cond_stage_model.model.*                    SD 2.x: the OpenCLIP text tower (fused qkv in_proj_weight)
    conditioner.embedders.0.transformer.text_model.*   SDXL (Stability AI's sgm): CLIP ViT-L/14, as SD 1.x's
    conditioner.embedders.1.model.*                    SDXL: OpenCLIP ViT-bigG/14, the whole tower with text_projection
An SDXL UNet's pooled-text and size embedding (diffusers' add_embedding) is label_emb.0.{0,2} in the original.

The maps here are general in the number of levels and layers per level (diffusers' own
scripts/convert_diffusers_to_original_stable_diffusion.py hard-codes SD's 4 levels of 2), and they are the exact
inverse of diffusers' reader (diffusers.loaders.single_file_utils), which pipelines/single_file.py checks on every
file it writes.
"""
from __future__ import annotations

import math

import torch

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
CLIP_PREFIX, OPEN_CLIP_PREFIX = "cond_stage_model.transformer.text_model.", "cond_stage_model.model."
CLIP_PREFIX_FLAT = "cond_stage_model.transformer."  # what a blind map of a transformers 5 folder writes
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."  # SDXL's CLIP ViT-L/14
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's OpenCLIP ViT-bigG/14

_UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature: OpenCLIP towers carry it, diffusion never reads it
_UNET_TEXT_TIME = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}  # SDXL
_UNET_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
                ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection."))
_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))
_CLIP_TO_OPEN_CLIP = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                      ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj."))


def unet_prefix_map(config: dict) -> dict[str, str]:
    """Returns {diffusers module prefix: original prefix} for a UNet2DConditionModel config: input block
    k = 1 + level * (layers + 1) + layer, output block k = level * (layers + 1) + layer (one more layer going up),
    each level's down/upsampler in the slot after its layers."""
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"layers_per_block={layers!r} differs per level, which the original layout cannot name")
    out = dict(_UNET_TOP, **(_UNET_TEXT_TIME if config.get("addition_embed_type") == "text_time" else {}))
    for i in range(levels):
        for j in range(layers):
            k = 1 + i * (layers + 1) + j
            out[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{k}.0."
            out[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{k}.1."
        out[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{1 + i * (layers + 1) + layers}.0.op."
        up_has_attention = "CrossAttn" in config["up_block_types"][i]
        for j in range(layers + 1):
            k = i * (layers + 1) + j
            out[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{k}.0."
            out[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{k}.1."
        out[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (layers + 1) + layers}.{2 if up_has_attention else 1}."
    out.update({"mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
                "mid_block.resnets.1.": "middle_block.2."})
    return out


def vae_prefix_map(config: dict) -> dict[str, str]:
    """Returns {diffusers prefix: original prefix} for an AutoencoderKL config (decoder levels numbered in reverse)."""
    levels = len(config["block_out_channels"])
    out = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for i in range(levels):
        for j in range(config["layers_per_block"] + 1):
            out[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
            out[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
        out[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        out[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{levels - 1 - i}.upsample."
    for part in ("encoder", "decoder"):
        out.update({f"{part}.mid_block.resnets.0.": f"{part}.mid.block_1.",
                    f"{part}.mid_block.resnets.1.": f"{part}.mid.block_2.",
                    f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1."})
    return out


def _split(key: str, prefixes: dict[str, str]) -> tuple[str, str] | None:
    """Returns (original prefix, rest of the key) for the longest diffusers prefix of `key`, or None."""
    parts = key.split(".")
    for n in range(min(len(parts) - 1, 6), 0, -1):
        head = ".".join(parts[:n]) + "."
        if head in prefixes:
            return prefixes[head], key[len(head):]
    return None


def unet_to_original(state: dict, config: dict) -> tuple[dict, list[str]]:
    """Returns ({original key: tensor} under model.diffusion_model., [diffusers keys with no original name]). A key
    with no original name (e.g. the `small` preset's add_embedding) is kept under its diffusers name."""
    prefixes, out, extra = unet_prefix_map(config), {}, []
    for key, value in state.items():
        found = _split(key, prefixes)
        if found is None:
            extra.append(key)
            out[UNET_PREFIX + key] = value
            continue
        head, rest = found
        if ".resnets." in key:
            rest = next((new + rest[len(old):] for old, new in _UNET_RESNET if rest.startswith(old)), rest)
        out[UNET_PREFIX + head + rest] = value
    return out, extra


def vae_to_original(state: dict, config: dict) -> dict:
    """Returns {original key: tensor} under first_stage_model.: resnet shortcuts renamed nin_shortcut, the mid
    attention's linear q/k/v/proj_out weights as 1x1 convolutions (C, C, 1, 1)."""
    prefixes, out = vae_prefix_map(config), {}
    for key, value in state.items():
        found = _split(key, prefixes)
        head, rest = found if found is not None else ("", key)
        if ".mid.attn_1." in head:
            rest = next((new + rest[len(old):] for old, new in _VAE_ATTENTION if rest.startswith(old)), rest)
            if value.ndim == 2:
                value = value[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
        rest = rest.replace("conv_shortcut.", "nin_shortcut.")
        out[VAE_PREFIX + head + rest] = value
    return out


def clip_to_original(state: dict, prefix: str = CLIP_PREFIX) -> dict:
    """Returns SD 1.x's text encoder keys, cond_stage_model.transformer.text_model.* (SDXL's first encoder: prefix=
    SDXL_CLIP_PREFIX), from a CLIPTextModel's state (transformers 5 drops the text_model. prefix from its own keys;
    real SD 1.x files, A1111 and ComfyUI have it)."""
    out = {prefix + k.removeprefix("text_model."): v for k, v in state.items()}
    positions = out[prefix + "embeddings.position_embedding.weight"].shape[0]
    out.setdefault(prefix + "embeddings.position_ids", torch.arange(positions)[None])  # (1, 77), as SD 1.x files
    return out


def open_clip_tower(state: dict) -> dict:
    """Returns the OpenCLIP text tower's keys (token_embedding, positional_embedding, transformer.resblocks.*,
    ln_final; no prefix) of a CLIPTextModel's state: q, k and v fused into one in_proj (3D, D)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    out = {"token_embedding.weight": state["embeddings.token_embedding.weight"],
           "positional_embedding": state["embeddings.position_embedding.weight"],
           "ln_final.weight": state["final_layer_norm.weight"], "ln_final.bias": state["final_layer_norm.bias"]}
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + "attn.in_proj_" + kind] = torch.cat(
                [state[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"])  # 3 x (D, D) -> (3D, D)
            for theirs, ours in _CLIP_TO_OPEN_CLIP:
                out[dst + ours + kind] = state[src + theirs + kind]
    return out


def projected_clip_to_open_clip(state: dict, prefix: str = SDXL_OPEN_CLIP_PREFIX) -> dict:
    """Returns SDXL's second text encoder, conditioner.embedders.1.model.*, from a CLIPTextModelWithProjection's
    state: every layer of the tower (SDXL reads the penultimate one and pools the last through ln_final), and
    text_projection as OpenCLIP multiplies by it, x @ P, the transpose of the linear layer's (P, D) weight."""
    out = open_clip_tower({k: v for k, v in state.items() if k != "text_projection.weight"})
    projection = state["text_projection.weight"]  # (P, D)
    out["text_projection"] = projection.T  # (D, P)
    out["logit_scale"] = torch.tensor(LOGIT_SCALE, dtype=projection.dtype)  # unused by SDXL; in its files
    return {prefix + k: v for k, v in out.items()}


def clip_to_open_clip(state: dict) -> dict:
    """Returns SD 2.x's OpenCLIP text tower keys, cond_stage_model.model.*, from the equivalent CLIPTextModel's state.

    SD 2.x reads the tower's penultimate layer, so a CLIPTextModel of N layers is a tower of N + 1: the last block
    is written as an identity (zero attention and MLP outputs) so that tools which build the whole tower find
    every key, and those reading the penultimate layer (all SD 2.x tools) get exactly these N layers' output.
    text_projection (identity) and logit_scale are unused by SD and present for the same reason.
    """
    out = open_clip_tower(state)
    token = out["token_embedding.weight"]  # (vocab, D)
    layers, width = 1 + max(int(k.split(".")[2]) for k in out if k.startswith("transformer.resblocks.")), token.shape[1]
    last = f"transformer.resblocks.{layers}."
    for key in [k for k in out if k.startswith("transformer.resblocks.0.")]:
        value = out[key]
        identity = torch.ones_like(value) if ".ln_" in key and key.endswith("weight") else torch.zeros_like(value)
        out[last + key.removeprefix("transformer.resblocks.0.")] = identity
    out["text_projection"] = torch.eye(width, dtype=token.dtype)  # (D, embed_dim)
    out["logit_scale"] = torch.tensor(LOGIT_SCALE, dtype=token.dtype)
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}
