"""Packing any source into webdataset or parquet shards (or an imagefolder), with a manifest.

Each image is decoded, validated (the ldm.data skip rules), converted to RGB, optionally resized so its
shorter side is `resolution` (no crop), re-encoded (jpg or png) and re-opened to check the bytes.
Output:
    webdataset: out/00000.tar ... with NNNNNNNN.{jpg|png, txt, json}  (json: {"key": original key, "caption"})
    parquet:    out/00000.parquet ... columns key, image {"bytes", "path"} (Hugging Face Image layout), text
    folder:     out/NNNNNNNN.{jpg|png} + out/metadata.jsonl (file_name, text)
    out/manifest.json: {"count", "skipped", "reasons", "shards": [{"file", "count", "sha256"}], ...}
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

from PIL import Image

from ldm.data.open import open_dataset
from ldm.data.skips import REASONS, Skip, SkipCounter
from ldm.data.transforms import to_rgb

FORMATS = ("webdataset", "parquet", "folder")


def encode_image(image: Image.Image, resolution: int | None, image_format: str, quality: int = 95) -> bytes:
    """Returns the RGB image (shorter side resized to `resolution` if given) encoded as jpg or png."""
    image = to_rgb(image)
    if resolution and min(image.size) != resolution:
        scale = resolution / min(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC, reducing_gap=3.0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if image_format == "jpg" else "PNG", quality=quality)
    data = buffer.getvalue()
    Image.open(io.BytesIO(data)).load()  # validate: the bytes we write decode
    return data


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_tar(path: str, items: list[tuple[str, bytes, str, str]], image_format: str) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data, caption, key in items:
            meta = json.dumps({"key": key, "caption": caption}).encode("utf-8")
            for suffix, payload in ((image_format, data), ("txt", caption.encode("utf-8")), ("json", meta)):
                info = tarfile.TarInfo(f"{name}.{suffix}")
                info.size, info.mtime = len(payload), 0  # mtime 0: same input, same bytes
                tar.addfile(info, io.BytesIO(payload))


def _write_parquet(path: str, items: list[tuple[str, bytes, str, str]], image_format: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"key": [k for _, _, _, k in items],
                      "image": [{"bytes": d, "path": f"{n}.{image_format}"} for n, d, _, _ in items],
                      "text": [c for _, _, c, _ in items]})
    pq.write_table(table, path)


def _write_folder(out: str, items: list[tuple[str, bytes, str, str]], image_format: str) -> None:
    with open(os.path.join(out, "metadata.jsonl"), "a", encoding="utf-8") as meta:
        for name, data, caption, _ in items:
            with open(os.path.join(out, f"{name}.{image_format}"), "wb") as f:
                f.write(data)
            meta.write(json.dumps({"file_name": f"{name}.{image_format}", "text": caption}) + "\n")


def _flush(out: str, format: str, items: list, image_format: str, shards: list) -> None:
    """Writes `items` as the next shard (or appends them to the folder), records it in `shards`, empties `items`."""
    if not items:
        return
    if format == "folder":
        _write_folder(out, items, image_format)
        shards.append({"file": "metadata.jsonl", "count": len(items)})
    else:
        name = f"{len(shards):05d}." + ("tar" if format == "webdataset" else "parquet")
        (_write_tar if format == "webdataset" else _write_parquet)(os.path.join(out, name), items, image_format)
        shards.append({"file": name, "count": len(items), "sha256": sha256_file(os.path.join(out, name))})
    items.clear()


def pack_shards(spec, out: str, format: str = "webdataset", shard_size: int = 1000, resolution: int | None = None,
                image_format: str = "jpg", quality: int = 95, **open_kwargs) -> dict:
    """Returns the manifest after writing every good sample of `spec` to `out` (see the module docstring)."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {FORMATS}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be jpg or png, got {image_format!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    dataset = open_dataset(spec, shuffle=False, **open_kwargs)  # validates the spec before any writing
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "metadata.jsonl")) and format == "folder":
        os.remove(os.path.join(out, "metadata.jsonl"))
    skips, shards, items, count = SkipCounter(), [], [], 0
    flush = lambda: _flush(out, format, items, image_format, shards)  # noqa: E731
    for event in dataset.raw_events():
        if isinstance(event, Skip):
            skips.add(event.reason, event.key)
            continue
        sample, _ = event
        try:
            data = encode_image(sample["image"], resolution, image_format, quality)
        except (OSError, ValueError):
            skips.add("corrupt_image", sample["key"])
            continue
        items.append((f"{count:08d}", data, sample["caption"], sample["key"]))
        count += 1
        if len(items) == shard_size:
            flush()
    flush()
    manifest = {"source": str(spec), "format": format, "image_format": image_format, "resolution": resolution,
                "count": count, "skipped": dict(skips.counts), "skipped_examples": skips.examples,
                "reasons": {r: REASONS[r] for r in skips.counts}, "shards": shards}
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def write_folder(spec, out: str, image_format: str = "png", **kwargs) -> dict:
    """Returns the manifest after writing `spec` (e.g. "shapes:500") as an imagefolder with metadata.jsonl."""
    return pack_shards(spec, out, format="folder", image_format=image_format, **kwargs)
