"""Data loader throughput: samples/s at 256 px from a folder of JPEGs and from webdataset shards (decode,
resize, crop) with 2 workers, and the speed-up of training input from the latent cache.

    python benchmarks/bench_data.py                      # defaults below; prints one line per figure
    python benchmarks/bench_data.py --num-images 64 --vae-preset tiny   # a quick check

"Training input" is what each step needs before the UNet: latents z ~ q(z|x) and token ids. Without the
cache that is load + transform + VAE encode + tokenize; with it, read (mean, logvar, ids) + sample z. Both
encode and draw z as training does (ldm.models.vae: encode_posterior, sample_latents).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image


def write_jpegs(folder: str, count: int, size=(512, 384)) -> None:
    """Writes `count` photo-like JPEGs (smooth noise, so they compress like real images) with captions."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        image.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
        with open(os.path.join(folder, f"{i:05d}.txt"), "w") as f:
            f.write(f"a photo number {i}")


def loader_rate(spec: str, resolution: int, workers: int, batch_size: int, epochs: int = 2) -> float:
    """Returns samples per second over `epochs` passes (the first pass includes worker start-up)."""
    from ldm.data import make_dataloader

    loader = make_dataloader(spec, batch_size=batch_size, num_workers=workers, resolution=resolution)
    start, count = time.perf_counter(), 0
    for _ in range(epochs):
        count += sum(len(batch["key"]) for batch in loader)
    return count / (time.perf_counter() - start)


@torch.no_grad()
def training_input_rates(spec: str, resolution: int, preset: str, workers: int, batch_size: int, out: str,
                         device: str = "cpu"):
    """Returns (samples/s without cache, samples/s from the cache, seconds to build the cache)."""
    from ldm.data import make_dataloader
    from ldm.data.latent_cache import build_latent_cache, open_latent_cache
    from ldm.models.presets import build_vae, get_spec
    from ldm.models.tokenizer import build_clip_tokenizer
    from ldm.models.vae import encode_posterior, sample_latents

    vae, tokenizer = build_vae(get_spec(preset)).eval().to(device), build_clip_tokenizer()
    scale = vae.config.scaling_factor
    loader = make_dataloader(spec, batch_size=batch_size, num_workers=workers, resolution=resolution)
    start, count = time.perf_counter(), 0
    for batch in loader:
        latents = sample_latents(*encode_posterior(vae, batch["pixel_values"]), None, scale)  # (B, 4, h, w)
        tokenizer(batch["caption"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        count += latents.shape[0]
    uncached = count / (time.perf_counter() - start)

    start = time.perf_counter()
    build_latent_cache(spec, vae, tokenizer, out, batch_size=batch_size, num_workers=workers, resolution=resolution,
                       device=device)
    build_seconds = time.perf_counter() - start
    cache = open_latent_cache(out)
    cached_loader = torch.utils.data.DataLoader(cache, batch_size=batch_size, shuffle=True, num_workers=0)
    start, count = time.perf_counter(), 0
    for batch in cached_loader:
        mean, logvar = batch["latent_mean"].to(device), batch["latent_logvar"].to(device)
        latents = sample_latents(mean, logvar, None, scale)  # (B, 4, h, w)
        count += latents.shape[0]
    return uncached, count / (time.perf_counter() - start), build_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--vae-preset", default="sd15", help="VAE architecture for the cache figure (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache-images", type=int, default=64, help="images for the cache figure")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    from ldm.data.pack import pack_shards

    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = os.path.join(tmp, "folder"), os.path.join(tmp, "shards")
        write_jpegs(folder, args.num_images)
        pack_shards(folder, shards, shard_size=max(1, args.num_images // 8), quality=90)
        print(f"{args.num_images} JPEGs 512x384 -> {args.resolution} px, {args.workers} workers, "
              f"batch {args.batch_size}, {os.cpu_count()} CPU cores")
        for name, spec in (("folder", folder), ("webdataset shards", shards)):
            rate = loader_rate(spec, args.resolution, args.workers, args.batch_size)
            print(f"loader from {name}: {rate:.0f} samples/s")
        subset = os.path.join(tmp, "subset")
        write_jpegs(subset, args.cache_images)
        uncached, cached, build = training_input_rates(subset, args.resolution, args.vae_preset, args.workers,
                                                       args.batch_size, os.path.join(tmp, "cache"), args.device)
        print(f"training input with the {args.vae_preset} VAE on {args.device}: {uncached:.2f} samples/s encoding each step, "
              f"{cached:.0f} samples/s from the latent cache ({cached / uncached:.0f}x; building it took {build:.1f} s)")


if __name__ == "__main__":
    main()
