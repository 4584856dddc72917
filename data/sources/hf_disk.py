"""A Hugging Face dataset saved with `Dataset.save_to_disk` (or a DatasetDict: `split` picks one).

Image column: `image_column`, else the first Image-typed column, else image / img; it is read undecoded
({"bytes", "path"}) so a corrupt image is a counted skip, not a crash. Caption column: `caption_column`,
else text / caption / prompt.

Yields records {"image_bytes" or "image_path" or "image" (PIL), "caption": str | None, "key": "ROW"}.
"""
from __future__ import annotations

import os
import random

CAPTION_COLUMNS = ("text", "caption", "prompt")
CHUNK = 256  # rows per unit


def is_saved_dataset(path: str) -> bool:
    """Returns whether `path` is a folder written by save_to_disk."""
    return any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


class HFDiskSource:
    """Units are (start, stop) row ranges of CHUNK rows."""

    def __init__(self, path: str, split: str = "train", caption_column: str | None = None,
                 image_column: str | None = None):
        import datasets

        dataset = datasets.load_from_disk(path)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{path} has splits {list(dataset)}, not {split!r}; pass split=")
            dataset = dataset[split]
        names = dataset.column_names
        images = [n for n, f in dataset.features.items() if isinstance(f, datasets.Image)]
        self.image_column = image_column or (images[0] if images else next((n for n in ("image", "img") if n in names), None))
        self.caption_column = caption_column or next((n for n in CAPTION_COLUMNS if n in names), None)
        if self.image_column not in names or self.caption_column not in names:
            raise ValueError(f"{path}: need an image and a caption column, found {names}; "
                             f"pass image_column= and caption_column=")
        if isinstance(dataset.features[self.image_column], datasets.Image):
            dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        self.dataset, self.name = dataset, "hf"

    def units(self) -> list[tuple[int, int]]:
        n = len(self.dataset)
        return [(start, min(n, start + CHUNK)) for start in range(0, n, CHUNK)]

    def read(self, unit: tuple[int, int], rng: random.Random):
        rows = self.dataset[unit[0]:unit[1]]
        for offset, (image, caption) in enumerate(zip(rows[self.image_column], rows[self.caption_column])):
            record = {"caption": caption, "key": str(unit[0] + offset)}
            if isinstance(image, dict):
                record["image_bytes"], record["image_path"] = image.get("bytes"), image.get("path")
            elif isinstance(image, (bytes, bytearray)):
                record["image_bytes"] = bytes(image)
            elif image is not None:
                record["image"] = image
            yield record
