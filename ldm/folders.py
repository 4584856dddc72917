"""Model folders in the diffusers layout: validation, safe loading, atomic saving.

    folder/
      model_index.json
      unet/          config.json + diffusion_pytorch_model.safetensors   (or transformer/ for a DiT)
      vae/           config.json + diffusion_pytorch_model.safetensors
      text_encoder/  config.json + model.safetensors
      tokenizer/     vocab.json, merges.txt, tokenizer.json ...
      scheduler/     scheduler_config.json
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # "unet" stands for the denoiser
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
SAFE_SUFFIXES = (".safetensors", ".safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".bin.index.json", ".ckpt", ".pt", ".pth")


def check_model_folder(path: str, components=COMPONENTS) -> str:
    """Returns the absolute folder path after checking that it exists and holds every component."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.isfile(path):
        raise ValueError(f"{path} is a single file; from_pretrained loads model folders in the diffusers layout "
                         f"({', '.join(COMPONENTS)}). Open a single-file checkpoint with Pipeline.from_single_file"
                         "(path), or convert it to a folder: ldm convert --model FILE --out DIR")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path} does not exist; pass a folder written by "
                                "Pipeline.save_pretrained (or `ldm create-model --model tiny --out DIR`)")
    for name in components:
        sub = os.path.join(path, name)
        if name == "unet" and not os.path.isdir(sub) and os.path.isdir(os.path.join(path, "transformer")):
            continue  # a transformer backbone (DiT, PixArt) stands in for the UNet
        if not os.path.isdir(sub):
            what = "unet/ (or transformer/)" if name == "unet" else f"{name}/"
            raise FileNotFoundError(f"model folder {path} has no {what} component; copy it from the model "
                                    "it came from, or re-save the whole pipeline with save_pretrained")
    return path


def weights_format(folder: str, component: str, allow_pickle: bool = False) -> str:
    """Returns "safetensors" or "pickle" for a component's weights, refusing pickles unless allowed."""
    sub = os.path.join(folder, component)
    files = os.listdir(sub)
    if any(f.endswith(SAFE_SUFFIXES) for f in files):
        return "safetensors"
    pickled = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickled:
        if not allow_pickle:
            raise ValueError(f"{component}/ in {folder} holds only pickled weights ({', '.join(pickled)}), which can "
                             "run arbitrary code when loaded. Convert them to safetensors, or pass allow_pickle=True "
                             "(--allow-pickle) if you trust where they came from.")
        return "pickle"
    raise FileNotFoundError(f"{component}/ in {folder} has no weights (*.safetensors); re-save the pipeline "
                            "with save_pretrained")


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


@contextlib.contextmanager
def atomic_folder(path: str):
    """Yields a temporary folder beside `path`; on success it replaces `path` in one rename.

    A crash leaves the previous `path` intact (and at worst a stray `.tmp-` folder), never a half-written one.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
        os.rmdir(old)
        os.rename(path, old)
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str):
    """Yields a temporary file name beside `path`; on success it replaces `path` in one rename, so a crash never
    leaves a half-written file under the final name."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private (0600); the final file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_state_dict(path: str, allow_pickle: bool = False) -> dict:
    """Returns the tensors of a weights file: safetensors always, pickled files only with allow_pickle."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    if not allow_pickle:
        raise ValueError(f"{path} is a pickled checkpoint, which can run arbitrary code when loaded; convert it to "
                         "safetensors, or pass allow_pickle=True (--allow-pickle) if you trust where it came from")
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)
