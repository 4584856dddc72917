"""make_dataloader: batches of one size each, with skip counts carried back from worker processes.

Iterating the loader yields {"pixel_values": (B,3,H,W) float32 in [-1,1], "caption": list[str], "key": list[str],
"original_size", "crop_top_left": (B, 2) int64} (the last two: each image's size and crop, for SDXL), and with
masks on, "mask": (B, 1, H, W) in [0, 1] and "has_mask": (B,) bool (ldm.data.masks).
Batches are formed inside each worker, per image size (one aspect bucket per batch); the last batch of each
size in each worker may be smaller than batch_size. After every epoch `loader.skips` holds that epoch's
skip counts (summed over workers) and the report is logged to the "ldm.data" logger.
"""
from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader, IterableDataset

from ldm.data.dataset import ImageTextDataset
from ldm.data.skips import Skip, SkipCounter

logger = logging.getLogger("ldm.data")


def collate(samples: list[dict]) -> dict:
    """Returns the batch of same-sized samples: pixel_values (B,3,H,W), caption and key lists, and the SDXL
    micro-conditioning original_size, crop_top_left (B, 2) when the samples have them (ImageTransform's do)."""
    batch = {"pixel_values": torch.stack([s["pixel_values"] for s in samples]),  # (B, 3, H, W)
             "caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples]}
    for name in ("original_size", "crop_top_left", "mask", "has_mask"):
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])  # (B, 2); mask (B, 1, H, W); has_mask (B,)
    return batch


class BucketBatches(IterableDataset):
    """Yields collated batches (each one image size), each with "skipped": {reason: n} since the last batch."""

    def __init__(self, dataset: ImageTextDataset, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size

    def __iter__(self):
        pending: dict[tuple, list[dict]] = {}
        skipped = SkipCounter()
        for event in self.dataset.events():
            if isinstance(event, Skip):
                skipped.add(event.reason, event.key)
                continue
            group = pending.setdefault(tuple(event["pixel_values"].shape), [])
            group.append(event)
            if len(group) == self.batch_size:
                yield {**collate(group), "skipped": (dict(skipped.counts), dict(skipped.examples))}
                pending[tuple(event["pixel_values"].shape)], skipped = [], SkipCounter()
        for group in pending.values():
            if group:
                yield {**collate(group), "skipped": (dict(skipped.counts), dict(skipped.examples))}
                skipped = SkipCounter()
        if skipped.total:  # skips after the last batch travel in an empty batch the loader drops
            yield {"pixel_values": torch.zeros(0), "caption": [], "key": [], "skipped": (dict(skipped.counts),
                                                                                          dict(skipped.examples))}


class CaptionLoader:
    """Iterable over batches; each pass is one epoch (set_epoch is called for you); `.skips` counts that epoch."""

    def __init__(self, dataset: ImageTextDataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset, self.epoch, self.skips = dataset, 0, SkipCounter()
        extra = {"prefetch_factor": prefetch_factor} if num_workers and prefetch_factor else {}
        self.loader = DataLoader(BucketBatches(dataset, batch_size), batch_size=None, num_workers=num_workers,
                                 pin_memory=pin_memory, **extra)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.dataset.set_epoch(self.epoch)  # before the workers copy the dataset
        self.skips = SkipCounter()
        for batch in self.loader:
            counts, examples = batch.pop("skipped")
            self.skips.update(SkipCounter(counts, examples))
            if batch["caption"]:
                yield batch
        if self.skips.total:
            logger.warning("epoch %d: %s", self.epoch, self.skips.report())
        self.epoch += 1


def make_dataloader(dataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                    prefetch_factor: int | None = None, **open_kwargs) -> CaptionLoader:
    """Returns a CaptionLoader over an ImageTextDataset, or over open_dataset(spec, **open_kwargs) for a spec."""
    if not isinstance(dataset, ImageTextDataset):
        from ldm.data.open import open_dataset

        dataset = open_dataset(dataset, **open_kwargs)
    elif open_kwargs:
        raise ValueError(f"options {sorted(open_kwargs)} apply to a spec; pass them to open_dataset instead")
    return CaptionLoader(dataset, batch_size, num_workers, pin_memory, prefetch_factor)
