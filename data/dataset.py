"""ImageTextDataset: a source split across ranks and workers, decoded, validated and transformed.

Iterating yields {"pixel_values": (3,H,W) float32 in [-1,1], "caption": str, "key": str, "original_size",
"crop_top_left": (2,) int64 (ldm.data.transforms: SDXL's size and crop conditioning)}, each good sample
exactly once per epoch across all ranks (rank / world_size, e.g. accelerate's process_index /
num_processes) and DataLoader workers (torch.utils.data.get_worker_info). Bad samples are skipped and
counted in `.skips` (a SkipCounter); in worker processes use ldm.data.make_dataloader, which carries the
counts back to the main process.

Splitting: the consumers (rank, worker) number n = world_size * num_workers. With at least n units
(shards, row groups, files), consumer c reads units c, c+n, ...; with fewer, every consumer reads all
units and keeps record i when i % n == c, decoding only its own. Either way the union is every record once.
"""
from __future__ import annotations

import random

from torch.utils.data import IterableDataset, get_worker_info

from ldm.data.decode import MAX_PIXELS, MIN_SIDE, decode_record
from ldm.data.skips import BadSample, Skip, SkipCounter
from ldm.data.transforms import ImageTransform


def consumer_index(rank: int, world_size: int) -> tuple[int, int]:
    """Returns (this consumer's index, number of consumers) over ranks x DataLoader workers."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world_size * workers


def buffer_shuffle(items, size: int, rng: random.Random):
    """Yields `items` in a locally shuffled order: a random pick from a buffer of `size` (webdataset's shuffle)."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


class ImageTextDataset(IterableDataset):
    """Streams transformed samples of `source` (see ldm.data.sources) for one rank."""

    def __init__(self, source, transform: ImageTransform, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS,
                 shuffle_buffer: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.source, self.transform = source, transform
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.min_side, self.max_pixels, self.shuffle_buffer = min_side, max_pixels, shuffle_buffer
        self.epoch = 0
        self.skips = SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that seeds the unit order, crops, flips and caption picks."""
        self.epoch = epoch

    def records(self):
        """Yields (record or Skip) for this consumer: the splitting rule of the module docstring."""
        index, count = consumer_index(self.rank, self.world_size)
        units = list(self.source.units())
        if self.shuffle:  # same order in every consumer: the split stays a partition
            random.Random(f"units/{self.seed}/{self.epoch}").shuffle(units)
        by_unit = len(units) >= count
        position = 0
        for unit in units[index::count] if by_unit else units:
            rng = random.Random(f"read/{self.seed}/{self.epoch}/{unit}")
            for record in self.source.read(unit, rng):
                mine = by_unit or position % count == index
                position += 1
                if mine:
                    yield record

    def raw_events(self):
        """Yields (decoded raw sample {"image": PIL, "caption", "key"}, rng), or Skip(reason, key) for a bad one."""
        records = self.records()
        if self.shuffle and self.shuffle_buffer > 1:
            records = buffer_shuffle(records, self.shuffle_buffer, random.Random(f"buffer/{self.seed}/{self.epoch}"))
        for record in records:
            if isinstance(record, Skip):
                yield record
                continue
            rng = random.Random(f"sample/{self.seed}/{self.epoch}/{record['key']}")
            try:
                yield decode_record(record, rng, self.min_side, self.max_pixels), rng
            except BadSample as e:
                yield Skip(e.reason, record["key"])

    def events(self):
        """Yields transformed samples, or Skip(reason, key) in place of a bad one."""
        for event in self.raw_events():
            if isinstance(event, Skip):
                yield event
                continue
            sample, rng = event
            try:
                yield self.transform(sample, rng)
            except BadSample as e:  # a loss mask whose size is not the image's
                yield Skip(e.reason, sample["key"])
            except (OSError, ValueError):  # pixels PIL decoded but cannot convert (odd modes)
                yield Skip("corrupt_image", sample["key"])

    def __iter__(self):
        for event in self.events():
            if isinstance(event, Skip):
                self.skips.add(event.reason, event.key)
            else:
                yield event
