"""A folder of images (recursive: jpg, jpeg, png, webp, bmp) with captions.

Caption precedence for each image:
  1. `metadata.jsonl` / `metadata.csv` anywhere in the tree (Hugging Face imagefolder convention: a
     `file_name` relative to the metadata file plus a caption column, `text` by default, else `caption`);
  2. a sidecar `NAME.txt` beside the image (UTF-8);
  3. `caption`: an instance prompt ("a photo of sks dog") or a template with {name} ("a drawing of {name}");
  4. the file name turned into words ("red_circle-03.png" -> "red circle").
An image that has metadata or a sidecar but no usable caption there is skipped (missing_caption /
bad_caption_encoding) unless `caption` is given; file-name captions apply only where no captions exist.

Loss masks (`masks=True`; ldm.data.masks): NAME.mask.EXT beside an image, else the same relative name under
`mask_dir`. Files named NAME.mask.EXT are never training images, nor is anything under `mask_dir`.

Yields records {"image_path": str, "caption": str | bytes, "key": path relative to the root, no extension}
(+ "mask_path": str for an image with a mask file, when masks are on).
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import re

from ldm.data.masks import find_mask, is_mask_file
from ldm.data.skips import Skip

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def filename_words(path: str) -> str:
    """Returns the file name as words: "red_circle-03.png" -> "red circle" (digit-only words dropped)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    words = [w for w in re.split(r"[\s_\-.]+", stem) if w and not w.isdigit()]
    return " ".join(words)


def _read_metadata(path: str, caption_column: str) -> dict[str, str | None]:
    """Returns {file_name relative to the metadata's folder: caption or None} from one metadata file."""
    with open(path, encoding="utf-8", newline="") as f:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = list(csv.DictReader(f))
    if rows and "file_name" not in rows[0]:
        raise ValueError(f"{path} has no 'file_name' column; the imagefolder convention needs file_name + {caption_column}")
    column = caption_column if not rows or caption_column in rows[0] else "caption"
    return {os.path.normpath(r["file_name"]): r.get(column) for r in rows}


class FolderSource:
    """Units are image paths relative to the root, sorted."""

    def __init__(self, root: str, caption: str | None = None, caption_column: str = "text", masks: bool = False,
                 mask_dir: str | None = None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root} does not exist; pass a folder of images "
                                    f"({', '.join(IMAGE_EXTENSIONS)})")
        if mask_dir and not os.path.isdir(mask_dir):
            raise FileNotFoundError(f"mask folder {mask_dir} does not exist; pass --mask-dir DIR holding a mask "
                                    "per image under the image's relative name (white = learn, black = ignore)")
        self.root, self.caption_template, self.name = os.path.abspath(root), caption, "folder"
        mask_root = os.path.abspath(mask_dir) if mask_dir else None
        self.images, self.metadata = [], {}
        for folder, subfolders, files in os.walk(self.root):
            subfolders[:] = [d for d in subfolders if os.path.join(folder, d) != mask_root]  # masks are not images
            for file in sorted(files):
                path = os.path.join(folder, file)
                if file.lower().endswith(IMAGE_EXTENSIONS) and not is_mask_file(file):
                    self.images.append(os.path.relpath(path, self.root))
                elif file in METADATA_FILES:
                    relative_dir = os.path.relpath(folder, self.root)
                    for name, text in _read_metadata(path, caption_column).items():
                        self.metadata[os.path.normpath(os.path.join(relative_dir, name))] = text
        self.images.sort()
        if not self.images:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        found = {r: find_mask(self.root, r, mask_root, IMAGE_EXTENSIONS) for r in self.images} if masks else {}
        self.mask_paths = {r: path for r, path in found.items() if path is not None}  # image -> its mask file
        self._check_some_caption()

    def _check_some_caption(self) -> None:
        """Raises ValueError, before any image is read, when no image has a caption (every one would be skipped
        as missing_caption), naming how many images there are and the ways to caption them."""
        for relative in self.images:  # stops at the first captioned image: one look in the usual case
            with contextlib.suppress(OSError):
                caption = self._caption(relative)
                if caption is not None and caption.strip():
                    return
        example = self.images[0]
        found = (f"the metadata file(s) here name none of them (file_name is relative to the metadata file)"
                 if self.metadata else "there is no metadata.jsonl or metadata.csv, no NAME.txt beside an image, and "
                 "their file names hold no words to use as captions")
        raise ValueError(
            f"none of the {len(self.images)} images under {self.root} has a caption: {found}. Caption them with a "
            f"metadata.jsonl beside the images, one line per image: {{\"file_name\": \"{example}\", \"text\": "
            f"\"a red circle\"}}; or a text file beside each image ({os.path.splitext(example)[0]}.txt); or fine-tune "
            "on them uncaptioned with `ldm finetune --instance-prompt 'a photo in the style of sks'`, which "
            "captions every image with that prompt")

    def units(self) -> list[str]:
        return self.images

    def _caption(self, relative: str):
        """Returns the caption (str, or bytes to be checked as UTF-8) by the precedence in the module docstring."""
        from_metadata = self.metadata.get(os.path.normpath(relative))
        if from_metadata is not None and str(from_metadata).strip():
            return from_metadata
        sidecar = os.path.join(self.root, os.path.splitext(relative)[0] + ".txt")
        if os.path.exists(sidecar):
            with open(sidecar, "rb") as f:
                text = f.read()
            if text.strip() or self.caption_template is None:
                return text  # empty or bad bytes become a counted skip in decode_caption
        if self.caption_template is not None:
            return self.caption_template.replace("{name}", filename_words(relative))
        return None if self.metadata else filename_words(relative)

    def read(self, unit: str, rng: random.Random):
        key = os.path.splitext(unit)[0]
        try:
            caption = self._caption(unit)
        except OSError:
            yield Skip("unreadable_shard", key)
            return
        record = {"image_path": os.path.join(self.root, unit), "caption": caption, "key": key}
        yield {**record, "mask_path": self.mask_paths[unit]} if unit in self.mask_paths else record
