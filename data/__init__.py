"""Captioned image sources, transforms and caches (imported as ldm.data).

    from ldm.data import open_dataset, make_dataloader
    dataset = open_dataset("shapes:2000", resolution=64)        # or a folder, shards, parquet, COCO json, hf folder
    for sample in dataset: ...                                    # {"pixel_values": (3,64,64) in [-1,1], "caption", "key"}
    loader = make_dataloader(dataset, batch_size=16, num_workers=2)
    for batch in loader: ...                                      # {"pixel_values": (B,3,64,64), "caption": [..], "key": [..]}
    loader.skips.report()                                         # bad samples of the last epoch, by reason

Latent cache: build_latent_cache(spec, vae, tokenizer, out_dir) then open_latent_cache(out_dir) yields
{"latent_mean": (4,h,w), "latent_logvar": (4,h,w), "input_ids": (77,), "caption": str (the first),
"captions": list[str] (all of the record's), "key": str}. Caption settings at training time: ldm.data.captions.
"""
from ldm.data.dataset import ImageTextDataset
from ldm.data.loader import CaptionLoader, collate, make_dataloader
from ldm.data.open import open_dataset, open_source
from ldm.data.shapes import COLOURS, POSITIONS, SHAPES, SceneObject, ShapesDataset, caption_scene, render_scene
from ldm.data.skips import REASONS, SkipCounter
from ldm.data.transforms import ImageTransform

_LAZY = {"build_latent_cache": "ldm.data.latent_cache", "open_latent_cache": "ldm.data.latent_cache",
         "ensure_latent_cache": "ldm.data.latent_cache", "LatentCacheDataset": "ldm.data.latent_cache",
         "pack_shards": "ldm.data.pack", "write_folder": "ldm.data.pack"}


def __getattr__(name):
    # The cache and packer import diffusers/safetensors: loaded on first use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldm.data' has no attribute {name!r}")


__all__ = ["open_dataset", "open_source", "make_dataloader", "CaptionLoader", "ImageTextDataset", "ImageTransform",
           "SkipCounter", "REASONS", "collate", "ShapesDataset", "SceneObject", "render_scene", "caption_scene",
           "COLOURS", "SHAPES", "POSITIONS", *_LAZY]
