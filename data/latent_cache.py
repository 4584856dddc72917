"""Latent cache: VAE latent distributions and token ids on disk, so training skips decoding and encoding.

For every good sample the cache stores the VAE posterior N(mean, exp(logvar)) (Kingma & Welling 2014,
arXiv:1312.6114; diffusers' DiagonalGaussianDistribution), not one draw, so training still samples
z = mean + exp(logvar / 2) * eps each step and multiplies it by vae.config.scaling_factor
(ldm.models.vae.sample_latents; encoding is ldm.models.vae.encode_posterior).

    out/cache.json                    manifest: key, its parts, count, skips, shards with sha256
    out/latents-00000.safetensors     latent_mean (N,4,h,w), latent_logvar (N,4,h,w), input_ids (N,77) int64
                                      (of each sample's first caption), original_size (N,2) and crop_top_left
                                      (N,2) int64 (SDXL's size and crop conditioning, ldm.data.transforms);
                                      with masks on: latent_mask (N,1,h,w) in [0,1] (the loss mask averaged
                                      over each latent cell, ldm.data.masks) and has_mask (N,) bool;
                                      metadata {"captions": json list of
                                      each sample's caption list, "keys": json list}

The key hashes the VAE weights and config, the tokenizer, the transform settings (masks on or off) and the
source's file list (names, sizes, mtimes; and its mask files'). `ensure_latent_cache` reuses a cache only when its key matches, else rebuilds it;
`open_latent_cache(dir, expected_key=...)` refuses a stale one. A shard holds one latent size (buckets).
A cached sample keeps one crop (that of epoch 0) and every caption of its record (COCO: about five), in the
record's order: an item is {..., "caption": the first, "captions": all}; training picks one per sample per step
from the step's generator (ldm.training.step.batch_loss, ldm.data.captions.pick_captions), validation uses the
first. Format 2 added the caption lists, format 3 each image's original size and crop: an older cache is rebuilt
by ensure_latent_cache (and still opens; its items lack what it lacked). Text embeddings are not stored here: the
trainer's TextEmbedder cache keeps each caption's (both SDXL encoders' and the pooled) embeddings in memory.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ldm.data.captions import caption_options
from ldm.data.dataset import ImageTextDataset
from ldm.data.loader import make_dataloader
from ldm.data.masks import latent_mask
from ldm.data.open import open_dataset
from ldm.data.pack import sha256_file
from ldm.data.skips import Skip
from ldm.models.vae import encode_posterior
from ldm.models.vae import sample_latents as sample_scaled_latents

FORMAT = "ldm-latent-cache/3"  # 3: original size and crop; 2: every caption of a sample (1: one)
TENSORS = ("latent_mean", "latent_logvar", "input_ids", "original_size", "crop_top_left", "latent_mask", "has_mask")
MANIFEST = "cache.json"
logger = logging.getLogger("ldm.data")


def vae_fingerprint(vae) -> str:
    """Returns the sha256 of the VAE's config and every weight (changes whenever the encoder does)."""
    # without diffusers' bookkeeping keys: "_use_default_values" lists a set, in an order that changes with each
    # process's string hashing, so a cache built by one process looked stale to the next (and to the other ranks)
    config = {key: value for key, value in vae.config.items() if not key.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Returns the sha256 of what decides token ids: vocabulary, padding token and length."""
    parts = [sorted(tokenizer.get_vocab().items()), tokenizer.pad_token, tokenizer.model_max_length]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def source_fingerprint(dataset) -> str:
    """Returns the sha256 of the source's units, with size and mtime for those that are files."""
    digest = hashlib.sha256(type(dataset.source).__name__.encode())
    for unit in dataset.source.units():
        digest.update(repr(unit).encode())
        path = unit[0] if isinstance(unit, tuple) else unit
        path = os.path.join(getattr(dataset.source, "root", ""), path) if isinstance(path, str) else None
        if path and os.path.isfile(path):
            stat = os.stat(path)
            digest.update(f"{stat.st_size}/{stat.st_mtime_ns}".encode())
    for unit, path in sorted(getattr(dataset.source, "mask_paths", {}).items()):  # a folder's mask files
        stat = os.stat(path)
        digest.update(f"mask/{unit}/{path}/{stat.st_size}/{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def cache_key_parts(dataset, vae, tokenizer) -> dict:
    """Returns the parts of the cache key; the key is the sha256 of their JSON."""
    return {"vae": vae_fingerprint(vae), "tokenizer": tokenizer_fingerprint(tokenizer),
            "transform": dataset.transform.settings(), "source": source_fingerprint(dataset), "seed": dataset.seed}


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def read_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_shard(out_dir: str, index: int, rows: list[dict]) -> dict:
    name = f"latents-{index:05d}.safetensors"
    tensors = {k: torch.stack([r[k] for r in rows]).contiguous() for k in TENSORS if k in rows[0]}
    metadata = {"captions": json.dumps([r["captions"] for r in rows]), "keys": json.dumps([r["key"] for r in rows])}
    save_file(tensors, os.path.join(out_dir, name), metadata=metadata)
    return {"file": name, "count": len(rows), "sha256": sha256_file(os.path.join(out_dir, name)),
            "latent_shape": list(rows[0]["latent_mean"].shape)}


class AllCaptionsDataset(ImageTextDataset):
    """`dataset` (same source, transform, split and seed) whose samples' "caption" is the list of every usable
    caption of their record (ldm.data.captions.caption_options), not the one decode_record picked: the list rides
    in "caption" because make_dataloader's collate keeps only pixel_values, caption and key."""

    def __init__(self, dataset: ImageTextDataset):
        vars(self).update(vars(dataset))  # the very same settings, whatever ImageTextDataset holds
        self.pending: dict[str, list[str]] = {}  # key -> captions, from its record until its sample is yielded

    def records(self):
        for record in super().records():
            if not isinstance(record, Skip):
                self.pending[record["key"]] = caption_options(record.get("caption"))
            yield record

    def events(self):
        for event in super().events():
            if isinstance(event, Skip):
                self.pending.pop(event.key, None)
                yield event
            else:
                yield {**event, "caption": self.pending.pop(event["key"])}


def encode_batch(batch: dict, vae, tokenizer) -> list[dict]:
    """Returns one row per sample: latent_mean/logvar (4,h,w) float32, input_ids (77,) of its first caption,
    original_size and crop_top_left (2,) when the batch has them, latent_mask (1,h,w) and has_mask () when it has
    masks, captions (list[str]), key. batch["caption"] holds a str or a list of captions per sample."""
    mean, logvar = encode_posterior(vae, batch["pixel_values"])  # (B, 4, h, w) each, on the VAE's device
    captions = [list(c) if isinstance(c, (list, tuple)) else [c] for c in batch["caption"]]
    input_ids = tokenizer([c[0] for c in captions], padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids  # (B, 77)
    extra = {k: batch[k].long() for k in ("original_size", "crop_top_left") if k in batch}  # (B, 2) each
    if "mask" in batch:
        extra.update(latent_mask=latent_mask(batch["mask"].float(), tuple(mean.shape[-2:])),  # (B, 1, h, w)
                     has_mask=batch["has_mask"])  # (B,)
    return [{"latent_mean": mean[i].cpu(), "latent_logvar": logvar[i].cpu(), "input_ids": input_ids[i].long(),
             "captions": captions[i], "key": batch["key"][i], **{k: v[i].cpu() for k, v in extra.items()}}
            for i in range(len(captions))]


def build_latent_cache(spec, vae, tokenizer, out_dir: str, batch_size: int = 16, shard_size: int = 4096,
                       num_workers: int = 0, device: str | torch.device = "cpu", **open_kwargs) -> dict:
    """Returns the manifest after encoding every good sample of `spec` into `out_dir` (replacing a stale cache)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    dataset = open_dataset(spec, shuffle=False, **open_kwargs) if not hasattr(spec, "source") else spec
    parts = cache_key_parts(dataset, vae, tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, "latents-*.safetensors")) + [os.path.join(out_dir, MANIFEST)]:
        if os.path.exists(stale):
            os.remove(stale)  # the new manifest is written last: a half-built cache is never valid
    vae = vae.to(device).eval()
    loader = make_dataloader(AllCaptionsDataset(dataset), batch_size=batch_size, num_workers=num_workers)
    pending: dict[tuple, list[dict]] = {}
    shards, count, masked = [], 0, 0
    for batch in loader:
        for row in encode_batch(batch, vae, tokenizer):
            group = pending.setdefault(tuple(row["latent_mean"].shape), [])
            group.append(row)
            count += 1
            masked += int(row.get("has_mask", False))
            if len(group) == shard_size:
                shards.append(_write_shard(out_dir, len(shards), group))
                group.clear()
    for group in pending.values():
        if group:
            shards.append(_write_shard(out_dir, len(shards), group))
    manifest = {"format": FORMAT, "key": cache_key(parts), "parts": parts, "spec": str(spec), "count": count,
                "skipped": dict(loader.skips.counts), "shards": shards}
    if dataset.transform.masks:  # how many samples had a mask of their own (the rest weigh every pixel)
        manifest["masked"] = masked
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def stale_reasons(manifest: dict | None, parts: dict) -> list[str]:
    """Returns why a cache cannot be reused (empty when it can): missing, or which key parts changed."""
    if manifest is None:
        return ["no cache"]
    if manifest.get("format") != FORMAT:
        return [f"format {manifest.get('format')} != {FORMAT}"]
    return [f"{name} changed" for name in parts if manifest["parts"].get(name) != parts[name]]


def ensure_latent_cache(spec, vae, tokenizer, out_dir: str, **kwargs) -> tuple["LatentCacheDataset", bool]:
    """Returns (the cache at out_dir, rebuilt?): reused when its key matches, else (re)built first."""
    open_kwargs = {k: v for k, v in kwargs.items() if k not in ("batch_size", "shard_size", "num_workers", "device")}
    dataset = open_dataset(spec, shuffle=False, **open_kwargs) if not hasattr(spec, "source") else spec
    parts = cache_key_parts(dataset, vae, tokenizer)
    reasons = stale_reasons(read_manifest(out_dir), parts)
    if reasons:
        logger.warning("latent cache %s: rebuilding (%s)", out_dir, ", ".join(reasons))
        build_latent_cache(dataset, vae, tokenizer, out_dir, **{k: v for k, v in kwargs.items() if k not in open_kwargs})
    return open_latent_cache(out_dir, expected_key=cache_key(parts)), bool(reasons)


class LatentCacheDataset(Dataset):
    """Map-style: item i is {"latent_mean": (4,h,w), "latent_logvar": (4,h,w), "input_ids": (77,),
    "original_size", "crop_top_left": (2,) (format 3), "latent_mask": (1,h,w), "has_mask": () (masks on), "caption": str
    (the first), "captions": list[str] (all, one or more), "key": str}. Batch items with
    ldm.training.stream.collate_dicts (BatchStream does), which keeps "captions" a list per sample: torch's
    default_collate would transpose the lists, and refuses lists of different lengths."""

    def __init__(self, out_dir: str, manifest: dict):
        self.out_dir, self.manifest = out_dir, manifest
        self.index = [(s["file"], row) for s in manifest["shards"] for row in range(s["count"])]
        self._meta: dict[str, tuple[list, list]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def shapes(self) -> list[tuple[int, ...]]:
        """Returns each item's latent shape (4, h, w), from the manifest (no shard is read): aspect buckets."""
        return [tuple(s["latent_shape"]) for s in self.manifest["shards"] for _ in range(s["count"])]

    def __getitem__(self, i: int) -> dict:
        file, row = self.index[i]
        with safe_open(os.path.join(self.out_dir, file), framework="pt") as f:
            if file not in self._meta:
                meta = f.metadata()
                self._meta[file] = json.loads(meta["captions"]), json.loads(meta["keys"])
            item = {name: f.get_slice(name)[row : row + 1][0] for name in TENSORS if name in f.keys()}
        captions, keys = self._meta[file]
        options = captions[row] if isinstance(captions[row], list) else [captions[row]]  # format 1: one str
        return {**item, "caption": options[0], "captions": options, "key": keys[row]}


def open_latent_cache(out_dir: str, expected_key: str | None = None) -> LatentCacheDataset:
    """Returns the cache in out_dir; raises if there is none, or if `expected_key` is given and differs."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(f"no latent cache in {out_dir} ({MANIFEST} missing); build it with "
                                f"`ldm cache-latents SRC --vae DIR --out {out_dir}`")
    if expected_key is not None and manifest.get("key") != expected_key:
        raise ValueError(f"latent cache {out_dir} is stale (built for another VAE, tokenizer, transform or "
                         f"source); rebuild it with ensure_latent_cache or `ldm cache-latents`")
    return LatentCacheDataset(out_dir, manifest)


def sample_latents(latent_mean: torch.Tensor, latent_logvar: torch.Tensor, generator=None) -> torch.Tensor:
    """Returns z = mean + exp(logvar / 2) * eps, an unscaled draw from the cached posterior (same shape as mean):
    ldm.models.vae.sample_latents with scaling_factor 1."""
    return sample_scaled_latents(latent_mean, latent_logvar, generator, 1.0)
