"""COCO captions (Chen et al. 2015, arXiv:1504.00325): `annotations/captions_SPLIT.json` plus its image folder.

The json holds "images" [{"id", "file_name"}] and "annotations" [{"image_id", "caption"}]; every image has
about five captions and each read picks one at random (seeded by seed, epoch and image), so all are used.
The image folder is `image_dir`, else `SPLIT/` beside the annotations folder (captions_train2017.json ->
../train2017/), else the json's own folder.

Yields records {"image_path": str, "caption": list[str] (one is picked at decode), "key": file name stem}.
"""
from __future__ import annotations

import json
import os
import random
from collections import defaultdict


def find_image_dir(annotations: str) -> str:
    """Returns the image folder that goes with a COCO captions json (see the module docstring)."""
    folder = os.path.dirname(os.path.abspath(annotations))
    split = os.path.splitext(os.path.basename(annotations))[0].replace("captions_", "")
    for candidate in (os.path.join(os.path.dirname(folder), split), os.path.join(folder, split)):
        if os.path.isdir(candidate):
            return candidate
    return folder


class CocoSource:
    """Units are image ids (sorted); captions of an image are all kept."""

    def __init__(self, annotations: str, image_dir: str | None = None):
        if not os.path.isfile(annotations):
            raise FileNotFoundError(f"COCO captions file {annotations} does not exist")
        with open(annotations, encoding="utf-8") as f:
            coco = json.load(f)
        if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
            raise ValueError(f"{annotations} is not a COCO captions file: it needs 'images' and 'annotations'")
        self.image_dir = image_dir or find_image_dir(annotations)
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"COCO image folder {self.image_dir} does not exist; pass image_dir=")
        self.files = {image["id"]: image["file_name"] for image in coco["images"]}
        self.captions = defaultdict(list)
        for annotation in coco["annotations"]:
            self.captions[annotation["image_id"]].append(annotation.get("caption"))
        self.name = "coco"

    def units(self) -> list[int]:
        return sorted(self.files)

    def read(self, unit: int, rng: random.Random):
        file_name = self.files[unit]
        yield {"image_path": os.path.join(self.image_dir, file_name), "caption": self.captions.get(unit, []),
               "key": os.path.splitext(file_name)[0]}
