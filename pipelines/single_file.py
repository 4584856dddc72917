"""Single-file checkpoints in the original Stable Diffusion layout: read (SD 1.x, SD 2.x, SDXL, inpainting) and write.

    pipe = Pipeline.from_single_file("v1-5-pruned-emaonly.safetensors")        # offline: configs from ldm's presets
    pipe.save_single_file("mine.safetensors", dtype=torch.float16)             # opens in A1111 and ComfyUI

Reading converts with diffusers' own functions (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_ldm_clip_checkpoint, convert_open_clip_checkpoint) but never lets diffusers fetch a config: the
architecture comes from, in order, `config=` (a preset name or a local diffusers folder), the file's own
safetensors metadata (written by save_single_file, so any size of model round-trips), or its key names and
shapes (SD 1.x: cond_stage_model.transformer.*, SD 2.x: cond_stage_model.model.*, SDXL base: conditioner.embedders.*
(pipelines/sdxl_single_file.py), inpainting: a 9-channel conv_in). Every key the architecture needs is
checked, by name and shape, before any model is built.

The prediction type cannot be read from the weights. As diffusers does, an SD 2.x file is taken as the 768 px
v-prediction model (2.0-v, 2.1) unless its global_step is 875000 (2.0-base, 512 px epsilon); SD 1.x, and the
inpainting variants, are epsilon. `prediction_type=` overrides.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.folders import atomic_file, read_json
from ldm.models.presets import MODEL_PRESETS, get_spec
from ldm.models.text_encoders import LAYERS, OpenCLIPTextEncoder
from ldm.models.tokenizer import EOS, build_clip_tokenizer
from ldm.pipelines.loading import scheduler_from_config
from ldm.pipelines.original_layout import (CLIP_PREFIX, CLIP_PREFIX_FLAT, OPEN_CLIP_PREFIX, UNET_PREFIX,
                                           clip_to_open_clip, clip_to_original, unet_to_original, vae_to_original)
from ldm.pipelines import sdxl_single_file as sdxl

METADATA_KEY = "ldm_configs"  # safetensors __metadata__ entry: JSON of the diffusers configs (ModelConfigs)
PREDICTION_TYPES = ("epsilon", "v_prediction")
SD2_BASE_GLOBAL_STEP = 875000  # SD 2.0-base's step count: diffusers' sign of an epsilon SD 2.x file


@dataclasses.dataclass
class ModelConfigs:
    """The diffusers configs that a single file's tensors need, and how its text encoder is laid out."""
    unet: dict
    vae: dict
    text_encoder: dict                 # CLIPTextConfig fields
    scheduler: dict                    # with _class_name
    text_layout: str = "clip"          # "clip" (SD 1.x), "open_clip" (SD 2.x) or "sdxl" (conditioner.embedders.*)
    tokenizer_pad_token: str = EOS                 # SD 2.x pads with "!"
    tokenizer_folder: str | None = None
    text_encoder_2: dict | None = None             # SDXL: the CLIPTextModelWithProjection's config
    tokenizer_2_pad_token: str = "!"
    tokenizer_2_folder: str | None = None
    force_zeros_for_empty_prompt: bool = True


# ------------------------------------------------------------------ writing

def original_state_dict(pipe) -> tuple[dict, ModelConfigs]:
    """Returns ({original key: tensor}, the configs) of a UNet pipeline; raises ValueError for what the original
    layout cannot hold (a transformer backbone, unfused LoRA layers, fused attention projections)."""
    if pipe.unet is None:
        raise ValueError("a pipeline with a transformer backbone (DiT, PixArt) has no original Stable Diffusion "
                         "single-file layout, which names UNet blocks; save it as a folder with save_pretrained")
    unet_state = pipe.unet.state_dict()
    if any(".lora_" in k or ".base_layer." in k or "to_qkv" in k or "to_kv" in k for k in unet_state):
        raise ValueError("the UNet carries LoRA adapter layers or fused attention projections; fuse the LoRA "
                         "first (`ldm merge-lora`, or pipe.fuse_lora() then pipe.unload_lora_weights()), or reload "
                         "the model from its folder, then save the single file")
    text_tensors, layout, text = _text_to_original(pipe)
    configs = ModelConfigs(unet=dict(pipe.unet.config), vae=dict(pipe.vae.config), text_encoder=text.config.to_dict(),
                           scheduler={**{k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
                                      "_class_name": type(pipe.scheduler).__name__},
                           text_layout=layout, tokenizer_pad_token=str(pipe.tokenizer.pad_token),
                           **sdxl.sdxl_configs_of(pipe))
    unet, extra = unet_to_original(unet_state, configs.unet)
    if extra:
        warnings.warn(f"the UNet has modules with no name in the original layout ({extra[0]}, ... {len(extra)} "
                      f"keys): they are written under {UNET_PREFIX}<diffusers name>; ldm reads them back, A1111 and "
                      "ComfyUI ignore them", stacklevel=4)
    state = {**unet, **vae_to_original(pipe.vae.state_dict(), configs.vae), **text_tensors}
    check_diffusers_reads_back(state, configs, unet_state, pipe.vae.state_dict(), text, pipe.text_encoder_2)
    return state, configs


def _text_to_original(pipe) -> tuple[dict, str, CLIPTextModel]:
    """Returns ({original key: tensor} of the text encoder(s), their layout, the first as a CLIPTextModel)."""
    text = pipe.text_encoder
    if pipe.is_sdxl:
        sdxl.warn_if_widths_match(text, pipe.text_encoder_2)
        return sdxl.text_to_original(text, pipe.text_encoder_2), sdxl.SDXL_LAYOUT, text
    if isinstance(text, OpenCLIPTextEncoder):
        clip = text.to_clip_text_model(pipe.tokenizer.pad_token_id)
        if LAYERS[text.layer] == 1:  # the tower itself, all its blocks
            tower = {k: v for k, v in text.tower.state_dict().items() if k != "attn_mask"}
            return {OPEN_CLIP_PREFIX + k: v for k, v in tower.items()}, "open_clip", clip
        text = clip
    if _text_layout(text.config.to_dict()) == "open_clip":
        return clip_to_open_clip(text.state_dict()), "open_clip", text
    return clip_to_original(text.state_dict()), "clip", text


def check_diffusers_reads_back(state: dict, configs: ModelConfigs, unet_state: dict, vae_state: dict, text,
                               text_2=None) -> None:
    """Raises ValueError unless diffusers' reader maps `state` back onto every UNet, VAE and text encoder key with
    its shape: an architecture the original layout cannot name fails here, before a file is written."""
    try:
        back = {"UNet": (convert_ldm_unet_checkpoint(state, configs.unet), unet_state),
                "VAE": (convert_ldm_vae_checkpoint(state, configs.vae), vae_state),
                "text encoder": (_text_to_diffusers(state, configs, text), text.state_dict())}
        if text_2 is not None:
            back["second text encoder"] = (sdxl.text_to_diffusers(state, text_2)[1], text_2.state_dict())
    except (KeyError, AttributeError, IndexError) as e:  # e.g. a class embedding the reader expects as label_emb
        raise ValueError(f"diffusers' single-file reader fails on this architecture's tensors ({e!r}); it cannot be "
                         "saved as a single file: save a folder with save_pretrained") from e
    for name, (read, wanted) in back.items():
        for key, value in wanted.items():
            if "position_ids" in key:
                continue
            if key not in read and not (name == "UNet" and UNET_PREFIX + key in state):
                raise ValueError(f"the {name}'s {key} has no place in the original Stable Diffusion layout "
                                 "(diffusers' reader would not find it); this architecture cannot be saved as "
                                 "a single file: save a folder with save_pretrained")
            got = read.get(key, state.get(UNET_PREFIX + key))
            if tuple(got.shape) != tuple(value.shape):
                raise ValueError(f"the {name}'s {key} would read back as {tuple(got.shape)}, not {tuple(value.shape)}")


def save_single_file(pipe, path: str | os.PathLike, dtype: torch.dtype | None = None) -> str:
    """Writes the pipeline as one original-layout .safetensors file, atomically; returns its path.

    dtype: torch.float16 (or bfloat16) halves the file; None keeps the weights' own. The diffusers configs go in
    the file's metadata, so that from_single_file rebuilds any size of model; other tools ignore them.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: a single-file checkpoint is written as .safetensors (pickled .ckpt files can "
                         "run code when loaded); name it e.g. model.safetensors")
    state, configs = original_state_dict(pipe)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {METADATA_KEY: json.dumps(dataclasses.asdict(configs), default=list), "format": "pt"}
    with atomic_file(path) as tmp:
        save_file(state, tmp, metadata=metadata)
    return path


# ------------------------------------------------------------------ reading

def read_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict, dict | None, int | None]:
    """Returns (tensors, ldm's configs from the metadata or None, global_step or None) of a single file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; from_single_file reads one .safetensors file (Pipeline.from_pretrained "
                         "reads folders)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        configs = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None
        return load_file(path), configs, None
    if not allow_pickle:
        raise ValueError(f"{path} is a pickled checkpoint, which can run arbitrary code when loaded; use the "
                         ".safetensors release of the model, or pass allow_pickle=True (--allow-pickle) if you "
                         "trust where it came from")
    warnings.warn(f"loading the pickled checkpoint {path} with torch.load(weights_only=False): it can run code",
                  stacklevel=3)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint)
    return state, None, checkpoint.get("global_step")


def normalise_keys(state: dict) -> dict:
    """Returns the tensors with an SD 1.x text encoder written without `text_model.` (a blind map of a
    transformers 5 folder) renamed to the real layout, with a warning."""
    flat = [k for k in state if k.startswith(CLIP_PREFIX_FLAT) and not k.startswith(CLIP_PREFIX)]
    if not flat:
        return state
    warnings.warn(f"the text encoder's keys lack 'text_model.' ({flat[0]}): read as "
                  f"{CLIP_PREFIX}...; A1111 and ComfyUI expect that prefix, so re-save this file with "
                  "save_single_file", stacklevel=3)
    renamed = {CLIP_PREFIX + k.removeprefix(CLIP_PREFIX_FLAT): state[k] for k in flat}
    return {**{k: v for k, v in state.items() if k not in renamed and k not in flat}, **renamed}


def detect_family(state: dict) -> str:
    """Returns "sd1", "sd2" or "sdxl" from the text encoders' keys; raises ValueError for a file that is none."""
    if sdxl.is_sdxl_file(state):
        return "sdxl"
    if OPEN_CLIP_PREFIX + "token_embedding.weight" in state:
        return "sd2"
    if any(k.startswith(CLIP_PREFIX) for k in state):
        return "sd1"
    example = next(iter(state), "(no tensors)")
    raise ValueError(f"this file has no Stable Diffusion text encoder ({CLIP_PREFIX}* for SD 1.x, "
                     f"{OPEN_CLIP_PREFIX}* for SD 2.x, conditioner.embedders.* for SDXL; first key: {example}); ldm "
                     "reads SD 1.x, 2.x and SDXL single files (SD3, Flux are not supported)")


def resolve_configs(state: dict, configs: dict | None, config: str | os.PathLike | None,
                    prediction_type: str | None, global_step: int | None) -> ModelConfigs:
    """Returns the architecture of a single file: from `config` (a preset name or a local diffusers folder), else
    the file's metadata, else the Stable Diffusion release its keys match; prediction_type overrides."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} must be one of {', '.join(PREDICTION_TYPES)}")
    family = detect_family(state)
    if config is not None:
        resolved = _configs_from(config)
        sdxl.check_family(family == "sdxl", resolved, f"config={os.fspath(config)!r}")
        resolved.text_layout = {"sd2": "open_clip", "sdxl": sdxl.SDXL_LAYOUT}.get(family, "clip")
    elif configs is not None:
        resolved = ModelConfigs(**configs)
        sdxl.check_family(family == "sdxl", resolved, "the configs in the file's metadata")
    else:
        resolved = _configs_from({"sd2": "sd21", "sdxl": "sdxl"}.get(family, "sd15"))
        if family == "sd2" and (global_step == SD2_BASE_GLOBAL_STEP or _in_channels(state) == 9):
            resolved.scheduler["prediction_type"] = "epsilon"  # SD 2.0-base and 2-inpainting: 512 px, epsilon
            resolved.unet["sample_size"], resolved.vae["sample_size"] = 64, 512
    if (config is None and configs is None) or (isinstance(config, str) and config in MODEL_PRESETS):
        channels = _in_channels(state)  # an inpainting file: the preset's UNet with its 9-channel conv_in
        if channels in (4, 9):
            resolved.unet["in_channels"] = channels
    if prediction_type is not None:
        resolved.scheduler["prediction_type"] = prediction_type
    return resolved


def _in_channels(state: dict) -> int | None:
    weight = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    return None if weight is None else int(weight.shape[1])


def _configs_from(config: str | os.PathLike) -> ModelConfigs:
    """Returns the configs of a preset name or of a local diffusers folder."""
    if isinstance(config, str) and config in MODEL_PRESETS:
        spec = get_spec(config)
        if spec.unet is None:
            raise ValueError(f"preset {config!r} has a transformer backbone; single files hold UNet models "
                             "(e.g. config='sd15' or 'sd21')")
        extra = dict(text_encoder_2=dict(spec.text_encoder_2), tokenizer_2_pad_token=spec.tokenizer_2_pad_token,
                     force_zeros_for_empty_prompt=spec.force_zeros_for_empty_prompt) if spec.is_sdxl else {}
        return ModelConfigs(unet=dict(spec.unet), vae=dict(spec.vae), text_encoder=dict(spec.text_encoder),
                            scheduler={"_class_name": "DDIMScheduler", **spec.scheduler},
                            text_layout=sdxl.SDXL_LAYOUT if spec.is_sdxl else _text_layout(spec.text_encoder),
                            tokenizer_pad_token=spec.tokenizer_pad_token, **extra)
    folder = os.path.abspath(os.fspath(config))
    if not os.path.isdir(folder):
        raise ValueError(f"config={config!r} (ldm convert --architecture) is neither a preset ({', '.join(sorted(MODEL_PRESETS))}) nor a "
                         "local diffusers model folder")
    parts = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
             "scheduler": "scheduler/scheduler_config.json"}
    missing = [p for p in parts.values() if not os.path.isfile(os.path.join(folder, p))]
    if missing:
        raise FileNotFoundError(f"config folder {folder} has no {missing[0]}; pass a diffusers folder of a UNet "
                                "model (it may hold configs only), or a preset name")
    read = {name: read_json(os.path.join(folder, p)) for name, p in parts.items()}
    tokenizer = os.path.join(folder, "tokenizer")
    layout, extra = _text_layout(read["text_encoder"]), sdxl.sdxl_configs_of_folder(folder)
    return ModelConfigs(**read, text_layout=sdxl.SDXL_LAYOUT if extra else layout,
                        tokenizer_pad_token="!" if layout == "open_clip" else EOS,
                        tokenizer_folder=tokenizer if os.path.isdir(tokenizer) else None, **extra)


def _text_layout(text_config: dict) -> str:
    """Returns "open_clip" for an OpenCLIP tower's equivalent (gelu, as SD 2.x's ViT-H), else "clip" (OpenAI's
    quick_gelu CLIP, SD 1.x)."""
    return "open_clip" if text_config.get("hidden_act") == "gelu" else "clip"


def expected_shapes(configs: ModelConfigs) -> dict[str, tuple]:
    """Returns {original key: shape} of every tensor the architecture needs, from models built on the meta device
    (no memory) and the writer's own key maps."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs.unet)
        vae = AutoencoderKL.from_config(configs.vae)
        text = CLIPTextModel(CLIPTextConfig.from_dict(configs.text_encoder))
    text_state = {k: v for k, v in text.state_dict().items() if "position_ids" not in k}
    if configs.text_layout == sdxl.SDXL_LAYOUT:
        text_keys = sdxl.text_keys(configs)
    elif configs.text_layout == "open_clip":
        last = text.config.num_hidden_layers  # the identity block the writer adds
        text_keys = {k: v for k, v in clip_to_open_clip(text_state).items()
                     if not (f"resblocks.{last}." in k or k.endswith(("text_projection", "logit_scale")))}
    else:
        text_keys = {k: v for k, v in clip_to_original(text_state).items() if "position_ids" not in k}
    tensors = {**unet_to_original(unet.state_dict(), configs.unet)[0],
               **vae_to_original(vae.state_dict(), configs.vae), **text_keys}
    return {k: tuple(v.shape) for k, v in tensors.items()}


def check_keys(state: dict, expected: dict[str, tuple], path: str, source: str) -> None:
    """Raises ValueError naming the first key the file lacks or holds with another shape."""
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"{path} lacks {key} (expected shape {shape}, from {source}): the file is truncated or "
                             "is another model; pass config= the matching preset or diffusers folder")
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{path} holds {key} with shape {tuple(state[key].shape)} but {source} expects {shape}; "
                             "pass config= the preset or diffusers folder this file was made from")


def _describe(config, configs: dict | None, state: dict) -> str:
    if config is not None:
        return f"config={os.fspath(config)!r}"
    if configs is not None:
        return "the configs in the file's metadata"
    return {"sd2": "Stable Diffusion 2.x's architecture (preset sd21)",
            "sdxl": "SDXL base's architecture (preset sdxl)"}.get(detect_family(state),
                                                                  "Stable Diffusion 1.x's architecture (preset sd15)")


def _text_to_diffusers(state: dict, configs: ModelConfigs, text: CLIPTextModel) -> dict:
    """Returns the text encoder's CLIPTextModel keys, converted by diffusers from SD 1.x's or SD 2.x's layout."""
    if configs.text_layout == "open_clip":
        converted = convert_open_clip_checkpoint(text, state, prefix=OPEN_CLIP_PREFIX)
    else:
        converted = convert_ldm_clip_checkpoint(state)
    return {k.removeprefix("text_model."): v for k, v in converted.items()}  # transformers 5's flat CLIPTextModel


def _assign(model: torch.nn.Module, state: dict, what: str, dtype: torch.dtype) -> None:
    """Loads `state` into a model built on the meta device (no random init), floating tensors as `dtype`."""
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if "position_ids" not in k]
    assert not missing, f"{what}: the checked file still lacks {missing[:3]}"  # check_keys ran first


def load_single_file(path: str | os.PathLike, config: str | os.PathLike | None = None,
                     prediction_type: str | None = None, allow_pickle: bool = False,
                     torch_dtype: torch.dtype | None = None) -> dict:
    """Returns {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} read from an original-layout single file
    (see the module docstring for where the architecture comes from)."""
    state, meta_configs, global_step = read_checkpoint(path, allow_pickle)
    state = normalise_keys(state)
    configs = resolve_configs(state, meta_configs, config, prediction_type, global_step)
    check_keys(state, expected_shapes(configs), os.fspath(path), _describe(config, meta_configs, state))

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs.unet)
        vae = AutoencoderKL.from_config(configs.vae)
    unet_state = convert_ldm_unet_checkpoint(state, configs.unet)
    unet_state.update({k: state[UNET_PREFIX + k] for k in unet.state_dict() if k not in unet_state})  # extensions
    dtype = torch_dtype or torch.float32
    _assign(unet, unet_state, "UNet", dtype)
    _assign(vae, convert_ldm_vae_checkpoint(state, configs.vae), "VAE", dtype)
    text = CLIPTextModel(CLIPTextConfig.from_dict(configs.text_encoder))
    text_state = _text_to_diffusers(state, configs, text)
    _assign(text, {k: v for k, v in text_state.items() if k in text.state_dict()}, "text encoder", dtype)
    extra = {} if configs.text_encoder_2 is None else sdxl.build_text_encoder_2(
        state, configs, lambda model, tensors, what: _assign(model, tensors, what, dtype), dtype)
    if configs.tokenizer_folder is not None:
        tokenizer = CLIPTokenizer.from_pretrained(configs.tokenizer_folder, local_files_only=True)
    else:
        tokenizer = build_clip_tokenizer(pad_token=configs.tokenizer_pad_token)
    return dict(**extra, unet=unet.eval(), vae=vae.eval(), text_encoder=text.to(dtype).eval(),
                tokenizer=tokenizer, scheduler=scheduler_from_config(configs.scheduler, os.fspath(path)))
