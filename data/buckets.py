"""Aspect buckets for map-style data: one epoch of batches, each of one sample size, every sample once.

The sizes come from ldm.data.transforms.make_buckets (each image cropped to the bucket of nearest aspect);
streams form the same kind of batches as they read (ldm.data.loader.BucketBatches). A bucket whose count is
not a multiple of the batch size ends in one smaller batch: no sample is dropped.
"""
from __future__ import annotations

import random


def bucket_batches(sizes: list[tuple], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Returns index lists, each of one size and at most batch_size long, covering every index once, in an order
    shuffled by `rng` (within each bucket, then across batches)."""
    buckets: dict[tuple, list[int]] = {}
    for i, size in enumerate(sizes):
        buckets.setdefault(tuple(size), []).append(i)
    batches = []
    for indices in buckets.values():
        rng.shuffle(indices)
        batches += [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_plan(samples: list[dict], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Returns one epoch of batches (index lists) of in-memory samples, bucketed by their "latent_mean" shape."""
    return bucket_batches([tuple(s["latent_mean"].shape) for s in samples], batch_size,
                          random.Random(seed * 7919 + epoch))
