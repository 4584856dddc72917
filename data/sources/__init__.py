"""Captioned image sources. Each is one module with one class exposing the same two methods:

    units() -> list            picklable pieces of work (files, shards, row groups, indices), in a fixed order
    read(unit, rng) -> iter    records {"key", "caption", "image" | "image_bytes" | "image_path"} or Skip(reason, key)

ImageTextDataset (ldm.data.dataset) splits units across ranks and workers, decodes and transforms.
"""
