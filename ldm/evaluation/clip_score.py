"""CLIP score: how well images match their prompts, with an open_clip model loaded from local files only.

Hessel et al. 2021, "CLIPScore", arXiv:2104.08718, Eq. (1), with torchmetrics' scaling: 100 * max(cos(E_I, E_C), 0),
in [0, 100]. The model is either a built-in open_clip architecture name with a local weights file
(load_clip("ViT-B-32", "open_clip_vit_b_32.safetensors")) or a folder holding open_clip_config.json and
open_clip_model.safetensors (load_clip("path/to/folder")).
"""
from __future__ import annotations

import os

import torch
from PIL import Image

CLIP_HINT = ("download an open_clip checkpoint (e.g. the ViT-B-32 laion2b_s34b_b79k open_clip_model.safetensors "
             "from huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K) and pass --clip-model ViT-B-32 "
             "--clip-weights PATH, or put open_clip_config.json and the weights in one folder and pass --clip-model "
             "FOLDER; nothing is downloaded for you")


def check_clip_files(model: str, weights: str | None) -> None:
    """Raises (before any work) unless `model` is a folder with open_clip_config.json, or an open_clip
    architecture name with a local `weights` file: ldm never downloads CLIP weights."""
    import open_clip

    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "open_clip_config.json")):
            raise FileNotFoundError(f"{model} has no open_clip_config.json; {CLIP_HINT}")
        return
    if model not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model!r}; pass a folder or one of open_clip.list_models()")
    if weights is None:
        raise FileNotFoundError(f"--clip-model {model} names an architecture only: its CLIP weights must be given "
                                f"as a local file with --clip-weights PATH (nothing is downloaded); {CLIP_HINT}")
    if not os.path.isfile(os.path.expanduser(weights)):
        raise FileNotFoundError(f"CLIP weights file {weights} (--clip-weights, for {model}) does not exist; "
                                f"{CLIP_HINT}")


def load_clip(model: str, weights: str | None = None, device: str = "cpu"):
    """Returns (model, preprocess, tokenizer) of an open_clip model from local files."""
    import open_clip

    check_clip_files(model, weights)
    if os.path.isdir(model):
        name = f"local-dir:{model}"
        clip, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    else:
        name = model
        clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=os.path.expanduser(weights),
                                                                    device=device, pretrained_text=False)
    return clip.eval(), preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def clip_score(model, preprocess, tokenizer, images: list[Image.Image], prompts: list[str]) -> dict:
    """Returns {"clip_score": mean, "per_image": [..], "cosine": [..]}: 100 * max(cos(image, prompt), 0) per pair."""
    if len(images) != len(prompts) or not images:
        raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    device = next(model.parameters()).device
    pixels = torch.stack([preprocess(im.convert("RGB")) for im in images]).to(device)      # (N, 3, S, S)
    image_features = model.encode_image(pixels).float()                                     # (N, E)
    text_features = model.encode_text(tokenizer(prompts).to(device)).float()                # (N, E)
    cos = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)     # (N,)
    scores = (100 * cos).clamp(min=0)
    return {"clip_score": float(scores.mean()), "per_image": scores.tolist(), "cosine": cos.tolist()}
