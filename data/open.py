"""open_dataset(spec): one entry point for every captioned image source.

Spec forms (a prefix forces the kind; without one it is inferred):
    shapes:N  |  shapes:N@R          the embedded shapes data set, N samples at R px (default 64)
    digits | digits:SPLIT[@R]        scikit-learn's handwritten digits, split train (default), test or all, at R px
                                     (default 32); a bare "digits" that is an existing path is that path
    photos:N | photos:N@R            N augmented crops of scikit-image's sample photographs (data/photos.py)
    drawings:N | drawings:N@R        the same of its drawings and line art, inverted half the time
    A+B                              the built-in sources above mixed, e.g. shapes:2000@32+photos:2000@32
    folder:DIR  | DIR                a folder of images (recursive) with captions
    wds:PATTERN | x.tar | "s/{000..009}.tar" | "s/*.tar" | a folder of .tar shards
    "http(s)://host/s/{000..009}.tar" | "pipe:CMD"   remote .tar shards, streamed (ldm.data.remote)
    parquet:PATH | x.parquet | "p/*.parquet" | a folder of .parquet files
    coco:JSON   | captions_*.json    COCO captions plus its image folder (image_dir= to set it)
    hf:DIR      | a save_to_disk folder
Paths that do not exist and unknown forms raise before any data is read.
"""
from __future__ import annotations

import glob
import os
import re

import numpy as np

from ldm.data.dataset import ImageTextDataset
from ldm.data.decode import MAX_PIXELS, MIN_SIDE
from ldm.data.digits import DEFAULT_RESOLUTION, DigitsDataset, parse_digits
from ldm.data.remote import is_remote
from ldm.data.shapes import ShapesDataset
from ldm.data.sources.coco import CocoSource
from ldm.data.sources.folder import FolderSource
from ldm.data.sources.hf_disk import HFDiskSource, is_saved_dataset
from ldm.data.sources.mapstyle import MapSource
from ldm.data.sources.parquet import ParquetSource
from ldm.data.sources.webdataset import SHARD_SUFFIXES, WebDatasetSource
from ldm.data.transforms import ImageTransform

KINDS = ("shapes", "digits", "photos", "drawings", "folder", "wds", "parquet", "coco", "hf")
BUILT_IN = ("shapes", "digits", "photos", "drawings")  # generated in memory: these mix with "+"
SPEC_HELP = ("use shapes:N[@R], digits[:train|test|all][@R], photos:N[@R], drawings:N[@R] (mixed with +), a folder "
             "of images, .tar shards (path, glob or {000..009} pattern), .parquet files, a COCO captions .json, or a "
             "save_to_disk folder (prefixes: " + ", ".join(KINDS) + ")")


def parse_shapes(spec: str, kind: str = "shapes") -> tuple[int, int | None]:
    """Returns (num_samples, resolution or None) of "shapes:N" / "shapes:N@R" (or photos:..., drawings:...)."""
    match = re.fullmatch(kind + r":(\d+)(?:@(\d+))?", spec.strip())
    if match is None:
        raise ValueError(f"bad {kind} spec {spec!r}; write {kind}:N or {kind}:N@R, e.g. {kind}:2000@64")
    return int(match.group(1)), int(match.group(2)) if match.group(2) else None


class Mixed:
    """Map-style concatenation of built-in data sets (item i of the second follows the first's last)."""

    def __init__(self, parts: list):
        self.parts, self.offsets = parts, np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part][index - int(self.offsets[part])]


def open_mixed(spec: str, two_shape_fraction: float, seed: int):
    """Returns (MapSource over the mixed parts, the parts' common resolution or None) for "A+B[+...]"."""
    sources = [open_source(part, two_shape_fraction=two_shape_fraction, seed=seed) for part in spec.split("+")]
    if any(not isinstance(s, MapSource) or s.name not in BUILT_IN for s, _ in sources):
        raise ValueError(f"{spec!r}: only the built-in sources {', '.join(BUILT_IN)} mix with '+'; pack others into "
                         f"one folder or shard set (ldm prepare-data)")
    resolutions = {r for _, r in sources}
    return MapSource(Mixed([s.dataset for s, _ in sources]), name="mixed"), \
        resolutions.pop() if len(resolutions) == 1 else None


def infer_kind(spec: str) -> tuple[str, str]:
    """Returns (kind, location) for a spec, inferring the kind from the path when there is no prefix."""
    if is_remote(spec):  # http(s):// and pipe: name .tar shards (webdataset's convention); nothing else streams
        if not spec.lower().startswith("pipe:") and not re.search(r"\.(tar|tgz|tar\.gz)\b", spec.lower()):
            raise ValueError(f"{spec!r}: only webdataset .tar shards stream over http(s); name them, e.g. "
                             "'http://host:8000/shards/{000000..000031}.tar', or copy other formats locally")
        return "wds", spec
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in KINDS and not os.path.exists(spec):
        return prefix, rest if prefix not in BUILT_IN else spec
    if re.fullmatch(r"digits(@\d+)?", spec) and not os.path.exists(spec):
        return "digits", spec
    lower = spec.lower()
    if lower.endswith(SHARD_SUFFIXES) or ("{" in spec and ".tar" in lower):
        return "wds", spec
    if lower.endswith(".parquet"):
        return "parquet", spec
    if lower.endswith(".json"):
        return "coco", spec
    if glob.has_magic(spec):
        raise ValueError(f"cannot tell the format of {spec!r} from its pattern; {SPEC_HELP}")
    if not os.path.exists(spec):
        raise FileNotFoundError(f"data source {spec!r} does not exist; {SPEC_HELP}")
    if os.path.isdir(spec):
        if is_saved_dataset(spec):
            return "hf", spec
        names = [n.lower() for n in os.listdir(spec)]
        if any(n.endswith(SHARD_SUFFIXES) for n in names):
            return "wds", spec
        if any(n.endswith(".parquet") for n in names):
            return "parquet", spec
        return "folder", spec
    raise ValueError(f"unknown data format {spec!r}; {SPEC_HELP}")


def open_source(spec, caption: str | None = None, caption_column: str | None = None, image_dir: str | None = None,
                split: str = "train", two_shape_fraction: float = 0.25, seed: int = 0, masks: bool = False,
                mask_dir: str | None = None, shard_timeout: float = 30.0, shard_retries: int = 3):
    """Returns (source, native resolution or None) for a spec string (or a map-style data set of raw samples).
    masks / mask_dir: a folder's records name their mask files (ldm.data.masks); other sources have alpha only.
    shard_timeout / shard_retries: remote shards' read timeout (s) and retries (ldm.data.remote)."""
    if mask_dir and (not isinstance(spec, str) or infer_kind(spec)[0] != "folder"):
        raise ValueError(f"--mask-dir works with a folder of images, not {spec!r}; other sources can carry loss "
                         "masks in their images' alpha channel")
    if not isinstance(spec, str):
        return MapSource(spec), None
    if "+" in spec and not os.path.exists(spec) and not is_remote(spec):
        return open_mixed(spec, two_shape_fraction, seed)
    kind, location = infer_kind(spec)
    if kind == "shapes":
        num_samples, resolution = parse_shapes(location)
        shapes = ShapesDataset(num_samples, resolution or 64, seed=seed, two_shape_fraction=two_shape_fraction)
        return MapSource(shapes, name="shapes"), resolution or 64
    if kind == "digits":
        split, resolution = parse_digits(location)
        resolution = resolution or DEFAULT_RESOLUTION
        return MapSource(DigitsDataset(split, resolution), name="digits"), resolution
    if kind in ("photos", "drawings"):
        from ldm.data.photos import PhotoCrops

        num_samples, resolution = parse_shapes(location, kind)
        make = PhotoCrops if kind == "photos" else PhotoCrops.drawings
        return MapSource(make(num_samples, resolution or 64, seed=seed), name=kind), resolution or 64
    if kind == "folder":
        return FolderSource(location, caption=caption, caption_column=caption_column or "text", masks=masks,
                            mask_dir=mask_dir), None
    if kind == "wds":
        return WebDatasetSource(location, caption_key=caption_column or "caption", timeout=shard_timeout,
                                retries=shard_retries), None
    if kind == "parquet":
        return ParquetSource(location, caption_column=caption_column), None
    if kind == "coco":
        return CocoSource(location, image_dir=image_dir), None
    if not os.path.isdir(location) or not is_saved_dataset(location):
        raise FileNotFoundError(f"{location!r} is not a save_to_disk folder (no dataset_info.json / state.json)")
    return HFDiskSource(location, split=split, caption_column=caption_column), None


def open_dataset(spec, resolution: int | None = None, center_crop: bool = True, random_flip: bool = False,
                 caption: str | None = None, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 aspect_buckets: bool = False, caption_column: str | None = None, image_dir: str | None = None,
                 split: str = "train", two_shape_fraction: float = 0.25, min_side: int = MIN_SIDE,
                 max_pixels: int = MAX_PIXELS, shuffle_buffer: int = 0, masks: bool = False,
                 mask_dir: str | None = None, shard_timeout: float = 30.0, shard_retries: int = 3) -> ImageTextDataset:
    """Returns an iterable of {"pixel_values": (3,R,R) in [-1,1], "caption": str, "key": str} for one rank.

    resolution: output side (default: the spec's own for shapes:N@R, else 64). caption: instance prompt or
    "{name}" template for folders. rank/world_size: e.g. accelerator.process_index / num_processes.
    shuffle: a new unit order (shards, files, indices) each epoch; shuffle_buffer > 1 also mixes records
    within shards. min_side / max_pixels: smaller / larger images are skipped (too_small / too_large).
    masks: samples also hold "mask" (1,R,R) and "has_mask" (ldm.data.masks: NAME.mask.png, mask_dir or alpha).
    shard_timeout / shard_retries: http(s):// and pipe: shards: seconds without a byte before a retry, and retries
    (each resumed at the byte reached) before the shard is skipped and counted (ldm.data.remote).
    """
    source, native = open_source(spec, caption, caption_column, image_dir, split, two_shape_fraction, seed, masks,
                                 mask_dir, shard_timeout, shard_retries)
    transform = ImageTransform(resolution or native or 64, center_crop, random_flip, aspect_buckets, masks=masks)
    return ImageTextDataset(source, transform, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
                            min_side=min_side, max_pixels=max_pixels, shuffle_buffer=shuffle_buffer)
