"""BatchStream: an endless, resumable stream of training batches for one rank.

The order is a pure function of (seed, epoch, position), so a resumed run reads exactly the batches the
uninterrupted one would have read:
  * map-style data sets (the latent cache, in-memory tensors): each epoch a permutation seeded by
    (seed, epoch); rank r takes indices r, r + world, ...; full batches only, so every rank has as many;
  * map-style data sets of several sizes (a latent cache of aspect buckets; `dataset.shapes()` gives each
    item's size): each epoch ldm.data.buckets.bucket_batches, batches of one size, every item once (a
    bucket's last batch may be smaller); rank r takes batches r, r + world, ...;
  * ldm.data streams (ImageTextDataset, already split by rank): ldm.data.make_dataloader, epoch by epoch;
    resuming mid-epoch re-reads and drops that epoch's first batches.
"""
from __future__ import annotations

import math
import random
from collections import Counter

import torch
from torch.utils.data import DataLoader, IterableDataset

from ldm.data.buckets import bucket_batches
from ldm.data.skips import SkipCounter


def collate_dicts(samples: list[dict]) -> dict:
    """Returns a batch: tensors stacked (B, ...), everything else as lists."""
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class BatchStream:
    """Iterating yields batches forever; `position()` / `seek()` save and restore where it is."""

    def __init__(self, dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, pin_memory: bool = False):
        self.dataset, self.batch_size, self.seed, self.num_workers = dataset, batch_size, seed, num_workers
        self.pin_memory = pin_memory  # page-locked batches: host-to-GPU copies that overlap with compute
        self.rank, self.world_size = rank, world_size
        self.epoch, self.batch_in_epoch = 0, 0
        self.skips = SkipCounter()  # the last whole epoch's
        self.run_skips, self.loader = SkipCounter(), None  # every finished epoch's of this run; the epoch's loader
        self.streaming = isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__")
        shapes = None if self.streaming or not hasattr(dataset, "shapes") else dataset.shapes()
        self.shapes = shapes if shapes and len(set(shapes)) > 1 else None  # None: one size, plain batches
        if self.shapes is not None:
            per_epoch = sum(math.ceil(n / batch_size) for n in Counter(self.shapes).values())
            if per_epoch < world_size:
                raise ValueError(f"the data set makes {per_epoch} bucket batches per epoch: too few for "
                                 f"{world_size} process(es); lower batch_size or add data")
        elif not self.streaming and len(dataset) // world_size < batch_size:
            raise ValueError(f"the data set has {len(dataset)} samples: too few for batch_size={batch_size} on "
                             f"{world_size} process(es); lower batch_size or add data")

    def position(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def seek(self, position: dict) -> None:
        self.epoch, self.batch_in_epoch = int(position["epoch"]), int(position["batch_in_epoch"])

    def skipped(self) -> SkipCounter:
        """Returns the samples skipped so far in this run (ldm.data streams): finished epochs and the current one,
        as far as its batches have arrived; a run that stops mid-epoch reports its partial epoch too."""
        total = SkipCounter(self.run_skips.counts, self.run_skips.examples)
        if self.loader is not None:
            total.update(self.loader.skips)
        return total

    def _epoch_batches(self, epoch: int, start: int):
        """Yields the epoch's batches after the first `start` ones."""
        if self.streaming:
            from ldm.data import make_dataloader

            loader = make_dataloader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                     pin_memory=self.pin_memory)
            loader.set_epoch(epoch)
            self.loader = loader
            for i, batch in enumerate(loader):
                if i >= start:  # resuming mid-epoch: the first `start` were consumed before the stop
                    yield batch
            self.skips, self.loader = loader.skips, None  # the whole epoch's, for the message if it yielded none
            self.run_skips.update(loader.skips)
            return
        if self.shapes is not None:  # the same plan on every rank: the ranks' shares are disjoint
            plan = bucket_batches(self.shapes, self.batch_size, random.Random(f"buckets/{self.seed}/{epoch}"))
            batches = plan[self.rank::self.world_size]
        else:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(len(self.dataset), generator=generator)[self.rank::self.world_size].tolist()
            batches = [order[i:i + self.batch_size]
                       for i in range(0, len(order) - self.batch_size + 1, self.batch_size)]
        loader = DataLoader(self.dataset, batch_sampler=batches[start:], num_workers=self.num_workers,
                            collate_fn=collate_dicts, pin_memory=self.pin_memory)
        yield from loader

    def __iter__(self):
        while True:
            produced = 0
            for batch in self._epoch_batches(self.epoch, self.batch_in_epoch):
                produced += 1
                self.batch_in_epoch += 1
                yield batch
            if produced == 0 and self.batch_in_epoch == 0:
                skipped = f" ({self.skips.report()})" if self.skips.total else ""  # e.g. every shard unreachable
                raise ValueError(f"the data set yielded no batch in a whole epoch{skipped}; is it empty, or smaller "
                                 "than one batch per process?")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
