"""Loading pipeline components from a local folder, with the checks of ldm.folders."""
from __future__ import annotations

import diffusers
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.folders import check_model_folder, read_json, weights_format
from ldm.pipelines.schedulers import zero_snr_safe_config
import os


def load_scheduler(folder: str) -> SchedulerMixin:
    """Returns the folder's scheduler; its class must be one of diffusers' schedulers. A zero-terminal-SNR
    schedule is clamped where the class needs it (ldm.pipelines.schedulers.zero_snr_safe_config)."""
    config = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"scheduler/scheduler_config.json in {folder} names {config.get('_class_name')!r}, "
                         "which is not a diffusers scheduler; set _class_name to e.g. DDIMScheduler")
    return cls.from_config(zero_snr_safe_config(cls, config))


def transformer_class(folder: str) -> type:
    """Returns the class named by transformer/config.json: our LatentDiT or one of diffusers' transformers."""
    from ldm.models.dit import LatentDiT

    name = read_json(os.path.join(folder, "transformer", "config.json")).get("_class_name", "")
    cls = LatentDiT if name == "LatentDiT" else getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(f"transformer/config.json in {folder} names {name!r}, which is neither ldm's LatentDiT nor "
                         "a diffusers model; set _class_name to LatentDiT or e.g. PixArtTransformer2DModel")
    return cls


def load_components(path, torch_dtype=None, allow_pickle: bool = False, variant: str | None = None) -> dict:
    """Returns {"vae", "text_encoder", "tokenizer", "unet" or "transformer", "scheduler"} loaded offline from a
    folder."""
    folder = check_model_folder(path)
    backbone = "unet" if os.path.isdir(os.path.join(folder, "unet")) else "transformer"
    cls = UNet2DConditionModel if backbone == "unet" else transformer_class(folder)
    safe = {name: weights_format(folder, name, allow_pickle) == "safetensors" for name in (backbone, "vae", "text_encoder")}
    common = dict(torch_dtype=torch_dtype, variant=variant, local_files_only=True)
    return dict(
        **{backbone: cls.from_pretrained(folder, subfolder=backbone, use_safetensors=safe[backbone], **common)},
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=safe["vae"], **common),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder",
                                                   use_safetensors=safe["text_encoder"], **common),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
        scheduler=load_scheduler(folder),
    )
