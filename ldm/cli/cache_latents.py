"""`ldm cache-latents SRC --vae DIR --out DIR`: encode a data set to VAE latent distributions and token ids.

--vae is a VAE folder (config.json + weights) or a model folder with vae/ (its tokenizer/ is then used too).
A valid cache is reused; one built for another VAE, tokenizer, transform or source is rebuilt.
"""
from __future__ import annotations

import os

from ldm.ranges import check_multiple, int_in


def add_arguments(parser) -> None:
    parser.add_argument("src", help="data spec: shapes:N[@R], a folder, .tar shards, .parquet, COCO .json, hf folder")
    parser.add_argument("--vae", required=True, help="VAE folder, or a model folder containing vae/")
    parser.add_argument("--out", required=True, help="cache folder")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's, else CLIP's)")
    parser.add_argument("--resolution", type=int_in("[8, 8192]"), default=None)
    parser.add_argument("--random-crop", action="store_true", help="random instead of centre crop (one crop is cached)")
    parser.add_argument("--caption", default=None, help="instance prompt or '{name}' template for folders")
    parser.add_argument("--batch-size", type=int_in("[1, 4096]"), default=16)
    parser.add_argument("--shard-size", type=int_in("[1, 1e7]"), default=4096)
    parser.add_argument("--num-workers", type=int_in("[0, 256]"), default=0)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache is valid")
    parser.add_argument("--masked-loss", action="store_true", help="also cache each image's loss mask (NAME.mask.png, "
                        "--mask-dir or alpha; ldm.data.masks), as `ldm train --masked-loss` reads them")
    parser.add_argument("--mask-dir", default=None, help="with --masked-loss: a folder of masks under the images' "
                        "relative names")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_vae_and_tokenizer(vae_dir: str, tokenizer_dir: str | None):
    """Returns (AutoencoderKL, tokenizer) from a VAE folder or a model folder."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from ldm.models.tokenizer import build_clip_tokenizer

    if not os.path.isdir(vae_dir):
        raise FileNotFoundError(f"VAE folder {vae_dir} does not exist; pass a VAE folder or a model folder with vae/")
    model_dir = vae_dir if os.path.isdir(os.path.join(vae_dir, "vae")) else None
    vae = AutoencoderKL.from_pretrained(os.path.join(vae_dir, "vae") if model_dir else vae_dir)
    tokenizer_dir = tokenizer_dir or (os.path.join(model_dir, "tokenizer") if model_dir else None)
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        return vae, CLIPTokenizer.from_pretrained(tokenizer_dir)
    return vae, build_clip_tokenizer()


def run(args) -> int:
    import shutil

    from ldm.data.latent_cache import ensure_latent_cache

    vae, tokenizer = load_vae_and_tokenizer(args.vae, args.tokenizer)
    if args.resolution is not None:  # before any image is encoded, as the other commands refuse it
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        check_multiple("--resolution", args.resolution, factor, of=f"the VAE in {args.vae} downsamples {factor}x")
    if args.mask_dir and not args.masked_loss:
        raise ValueError("--mask-dir takes effect with --masked-loss: add --masked-loss")
    if args.force and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    cache, rebuilt = ensure_latent_cache(args.src, vae, tokenizer, args.out, resolution=args.resolution,
                                         center_crop=not args.random_crop, caption=args.caption,
                                         batch_size=args.batch_size, shard_size=args.shard_size,
                                         num_workers=args.num_workers, device=args.device,
                                         **(dict(masks=True, mask_dir=args.mask_dir) if args.masked_loss else {}))
    skipped = cache.manifest["skipped"]
    masked = f", {cache.manifest['masked']} with a loss mask" if "masked" in cache.manifest else ""
    print(f"{'built' if rebuilt else 'reused valid'} latent cache {args.out}: {len(cache)} samples{masked}, "
          f"skipped {sum(skipped.values())} {skipped or ''}")
    return 0
