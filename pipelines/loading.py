"""Loading pipeline components from a local folder, with the checks of ldm.folders."""
from __future__ import annotations

import diffusers
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm.folders import check_model_folder, read_json, weights_format
from ldm.pipelines.schedulers import zero_snr_safe_config
import os

# diffusers has no pipeline class for a CLIP-conditioned transformer, so a transformer folder's model_index.json
# names ours as a custom pipeline file in the folder, which diffusers runs only when asked to
# (DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)); without that flag it says so and names the
# file, whose docstring names ldm's loader. ldm's own from_pretrained never runs it.
DIFFUSERS_PIPELINE_FILE = "ldm_pipeline.py"
DIFFUSERS_PIPELINE_CODE = '''"""This folder was written by ldm. Open it with ldm.pipelines.Pipeline.from_pretrained(folder) (pip install ldm),
which never runs this file, or in diffusers with DiffusionPipeline.from_pretrained(folder, trust_remote_code=True),
which runs it to find ldm's Pipeline class (diffusers has none for a CLIP-conditioned transformer)."""
import ldm.models.dit  # noqa: F401  (diffusers loads transformer/ only from a module already imported)
from ldm.pipelines.stable import Pipeline  # noqa: F401
'''


def name_diffusers_pipeline(folder: str, index: dict) -> dict:
    """Returns model_index.json's entries with _class_name naming ldm's Pipeline through the custom pipeline file,
    which it writes into `folder`."""
    with open(os.path.join(folder, DIFFUSERS_PIPELINE_FILE), "w", encoding="utf-8") as f:
        f.write(DIFFUSERS_PIPELINE_CODE)
    return {**index, "_class_name": [DIFFUSERS_PIPELINE_FILE.removesuffix(".py"), "Pipeline"]}


def load_scheduler(folder: str) -> SchedulerMixin:
    """Returns the folder's scheduler; its class must be one of diffusers' schedulers. A zero-terminal-SNR
    schedule is clamped where the class needs it (ldm.pipelines.schedulers.zero_snr_safe_config)."""
    config = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    return scheduler_from_config(config, f"scheduler/scheduler_config.json in {folder}")


def scheduler_from_config(config: dict, where: str) -> SchedulerMixin:
    """Returns the scheduler a config names by _class_name (`where` names the config in errors)."""
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"{where} names {config.get('_class_name')!r}, "
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
    folder; an SDXL folder adds "text_encoder_2", "tokenizer_2" and its force_zeros_for_empty_prompt."""
    folder = check_model_folder(path)
    backbone = "unet" if os.path.isdir(os.path.join(folder, "unet")) else "transformer"
    cls = UNet2DConditionModel if backbone == "unet" else transformer_class(folder)
    sdxl = os.path.isdir(os.path.join(folder, "text_encoder_2"))
    names = (backbone, "vae", "text_encoder") + (("text_encoder_2",) if sdxl else ())
    safe = {name: weights_format(folder, name, allow_pickle) == "safetensors" for name in names}
    common = dict(torch_dtype=torch_dtype, variant=variant, local_files_only=True)
    extra = {}
    if sdxl:
        index = read_json(os.path.join(folder, "model_index.json"))
        extra = dict(text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                         folder, subfolder="text_encoder_2", use_safetensors=safe["text_encoder_2"], **common),
                     tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2", local_files_only=True),
                     force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))
    return dict(**extra,
        **{backbone: cls.from_pretrained(folder, subfolder=backbone, use_safetensors=safe[backbone], **common)},
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=safe["vae"], **common),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder",
                                                   use_safetensors=safe["text_encoder"], **common),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
        scheduler=load_scheduler(folder),
    )
