"""SDXL's original single-file layout (Stability AI's sgm, as in sd_xl_base_1.0.safetensors): the text side.

    conditioner.embedders.0.transformer.text_model.*   CLIP ViT-L/14 in transformers' names (as SD 1.x's)
    conditioner.embedders.1.model.*                    OpenCLIP ViT-bigG/14: every block of the tower (fused qkv
                                                       in_proj_weight), ln_final, text_projection (D, P), logit_scale

The UNet and the VAE keep SD's prefixes (model.diffusion_model., first_stage_model.; pipelines/original_layout.py
names the UNet's add_embedding label_emb.0.{0,2}). pipelines/single_file.py calls these functions for an SDXL
pipeline or file; reading converts with diffusers' own convert_ldm_clip_checkpoint / convert_open_clip_checkpoint.
"""
from __future__ import annotations

import os
import warnings

import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm.folders import read_json
from ldm.models.tokenizer import build_clip_tokenizer
from ldm.pipelines.original_layout import (CLIP_PREFIX, OPEN_CLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX,
                                           clip_to_original, projected_clip_to_open_clip)

SDXL_LAYOUT = "sdxl"  # ModelConfigs.text_layout of a file with SDXL's two text encoders
REFINER_KEY = "conditioner.embedders.0.model.text_projection"  # SDXL refiner: bigG alone, no CLIP-L


def is_sdxl_file(state: dict) -> bool:
    """True for a file whose text encoders sit under conditioner.embedders.{0,1} (SDXL base and its fine-tunes)."""
    if REFINER_KEY in state:
        raise ValueError("this is an SDXL refiner file (conditioner.embedders.0.model.*: OpenCLIP bigG alone); ldm "
                         "reads SDXL base-layout files, with CLIP-L under conditioner.embedders.0.transformer.*")
    return any(k.startswith((SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX)) for k in state)


def check_family(is_sdxl_state: bool, configs, described: str) -> None:
    """Raises ValueError when the file's family (SDXL or SD 1.x/2.x) and the chosen architecture's differ."""
    is_sdxl_config = configs.text_encoder_2 is not None
    if is_sdxl_state and not is_sdxl_config:
        raise ValueError(f"this file is SDXL (two text encoders under conditioner.embedders.*) but {described} is an "
                         "SD 1.x/2.x architecture with one; pass config='sdxl' (or 'sdxl-tiny', or an SDXL diffusers "
                         "folder with text_encoder_2/), or leave config out")
    if is_sdxl_config and not is_sdxl_state:
        raise ValueError(f"{described} is SDXL (two text encoders) but this file is SD 1.x/2.x ({CLIP_PREFIX}* or "
                         f"{OPEN_CLIP_PREFIX}*); pass config='sd15' or 'sd21' or that model's folder, or leave "
                         "config out")


def sdxl_configs_of(pipe) -> dict:
    """Returns the SDXL fields of ModelConfigs for a pipeline ({} for SD 1.x/2.x)."""
    if not pipe.is_sdxl:
        return {}
    return dict(text_encoder_2=pipe.text_encoder_2.config.to_dict(),
                tokenizer_2_pad_token=str(pipe.tokenizer_2.pad_token),
                force_zeros_for_empty_prompt=bool(pipe.config.force_zeros_for_empty_prompt))


def sdxl_configs_of_folder(folder: str) -> dict:
    """Returns the SDXL fields of ModelConfigs for a diffusers folder ({} without text_encoder_2/)."""
    path = os.path.join(folder, "text_encoder_2", "config.json")
    if not os.path.isfile(path):
        return {}
    index = os.path.join(folder, "model_index.json")
    tokenizer = os.path.join(folder, "tokenizer_2")
    return dict(text_encoder_2=read_json(path), tokenizer_2_folder=tokenizer if os.path.isdir(tokenizer) else None,
                force_zeros_for_empty_prompt=bool(
                    read_json(index).get("force_zeros_for_empty_prompt", True) if os.path.isfile(index) else True))


def warn_if_widths_match(text_encoder, text_encoder_2) -> None:
    """Warns when both encoders have one width: diffusers' from_single_file tells them apart only by width (768 vs
    1280 in SDXL base), so it would read CLIP-L's tensors into text_encoder_2. ldm goes by the keys' prefixes."""
    width = text_encoder.config.hidden_size
    if width == text_encoder_2.config.hidden_size:
        warnings.warn(f"both text encoders are {width} wide: diffusers' from_single_file tells SDXL's encoders apart "
                      "by width and would load the first one's weights into text_encoder_2 (ldm reads the file by its "
                      "key prefixes, correctly); give the second encoder another width, as SDXL base's 1280 vs 768",
                      stacklevel=6)


def text_to_original(text_encoder, text_encoder_2) -> dict:
    """Returns {original key: tensor} of both text encoders in SDXL's layout."""
    return {**clip_to_original(text_encoder.state_dict(), SDXL_CLIP_PREFIX),
            **projected_clip_to_open_clip(text_encoder_2.state_dict())}


def text_to_diffusers(state: dict, text_encoder_2) -> tuple[dict, dict]:
    """Returns the (CLIPTextModel, CLIPTextModelWithProjection) keys that diffusers' converters read from `state`."""
    first = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()}
    return first, convert_open_clip_checkpoint(text_encoder_2, state, prefix=SDXL_OPEN_CLIP_PREFIX)


def text_keys(configs) -> dict[str, torch.Tensor]:
    """Returns {original key: meta tensor} that the two text encoders need (logit_scale and position_ids are
    optional), from models built on the meta device."""
    with torch.device("meta"):
        first = CLIPTextModel(CLIPTextConfig.from_dict(configs.text_encoder))
        second = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs.text_encoder_2))
    return {k: v for k, v in text_to_original(first, second).items() if not k.endswith(("position_ids", "logit_scale"))}


def build_text_encoder_2(state: dict, configs, assign, dtype: torch.dtype) -> dict:
    """Returns {"text_encoder_2", "tokenizer_2", "force_zeros_for_empty_prompt"} read from an SDXL file's tensors;
    `assign(model, state, what)` loads checked tensors as `dtype` (single_file._assign)."""
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs.text_encoder_2))
    converted = convert_open_clip_checkpoint(text_2, state, prefix=SDXL_OPEN_CLIP_PREFIX)
    assign(text_2, {k: v for k, v in converted.items() if k in text_2.state_dict()}, "second text encoder")
    if configs.tokenizer_2_folder is not None:
        tokenizer_2 = CLIPTokenizer.from_pretrained(configs.tokenizer_2_folder, local_files_only=True)
    else:
        tokenizer_2 = build_clip_tokenizer(pad_token=configs.tokenizer_2_pad_token)
    return dict(text_encoder_2=text_2.to(dtype).eval(), tokenizer_2=tokenizer_2,
                force_zeros_for_empty_prompt=configs.force_zeros_for_empty_prompt)
