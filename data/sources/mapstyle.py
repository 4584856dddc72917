"""Any map-style data set of raw samples (len + getitem, e.g. ShapesDataset) as a source.

Yields one record per index: {"image": PIL, "caption": str, "key": str}, exactly the item.
"""
from __future__ import annotations

import random


class MapSource:
    """Units are indices 0..len-1; read(i) yields dataset[i]."""

    def __init__(self, dataset, name: str = "map"):
        self.dataset, self.name = dataset, name

    def units(self) -> list[int]:
        return list(range(len(self.dataset)))

    def read(self, unit: int, rng: random.Random):
        yield self.dataset[unit]
