"""Parquet files of captioned images, streamed one row group at a time (pyarrow).

Image column: `image_column`, else the first of image / jpg / png / image_bytes / img; it may hold bytes or
the Hugging Face Image struct {"bytes", "path"}. Without one, a path column (image_path / file_name / path,
relative to the parquet file) is read. Caption column: `caption_column`, else text / caption / prompt.
Keys come from a `key` / `__key__` column, else "FILE_STEM/ROW".

Yields records {"image_bytes" or "image_path", "caption": str | None, "key": str}; a file that cannot be
opened yields Skip("unreadable_shard").
"""
from __future__ import annotations

import glob
import os
import random

from ldm.data.skips import Skip

IMAGE_COLUMNS = ("image", "jpg", "png", "image_bytes", "img")
PATH_COLUMNS = ("image_path", "file_name", "path")
CAPTION_COLUMNS = ("text", "caption", "prompt")
KEY_COLUMNS = ("key", "__key__")


def expand_parquet(spec: str) -> list[str]:
    """Returns the parquet files named by a path, folder or glob; raises FileNotFoundError if none."""
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "**", "*.parquet"), recursive=True))
    elif glob.has_magic(spec):
        paths = sorted(glob.glob(spec))
    else:
        paths = [spec] if os.path.exists(spec) else []
    if not paths:
        raise FileNotFoundError(f"no parquet files at {spec!r}; pass a .parquet path, a folder or a glob")
    return paths


def _first(names: list[str], wanted: str | None, options: tuple[str, ...]) -> str | None:
    if wanted is not None:
        return wanted if wanted in names else None
    return next((n for n in options if n in names), None)


class ParquetSource:
    """Units are (file, row group) pairs, so ranks and workers split large files too."""

    def __init__(self, spec: str, caption_column: str | None = None, image_column: str | None = None):
        import pyarrow.parquet  # noqa: F401 - fail here, before any work, if pyarrow is missing

        self.files, self.name = expand_parquet(spec), "parquet"
        self.caption_column, self.image_column = caption_column, image_column
        self._check_columns()

    def _check_columns(self) -> None:
        """Raises ValueError, before any work, if the first readable file lacks an image column."""
        import pyarrow.parquet as pq

        for path in self.files:
            try:
                names = pq.read_schema(path).names
            except Exception:  # noqa: BLE001 - unreadable: skipped (and counted) when read
                continue
            if not (_first(names, self.image_column, IMAGE_COLUMNS) or _first(names, None, PATH_COLUMNS)):
                raise ValueError(f"{path} has no image column; name it one of {IMAGE_COLUMNS + PATH_COLUMNS} "
                                 f"or pass image_column= (columns: {names})")
            return

    def units(self) -> list[tuple[str, int]]:
        import pyarrow.parquet as pq

        units = []
        for path in self.files:
            try:
                units.extend((path, i) for i in range(pq.ParquetFile(path).num_row_groups))
            except Exception:  # noqa: BLE001 - a corrupt footer: reported as a skip when read
                units.append((path, -1))
        return units

    def read(self, unit: tuple[str, int], rng: random.Random):
        import pyarrow.parquet as pq

        path, row_group = unit
        stem = os.path.splitext(os.path.basename(path))[0]
        try:
            if row_group < 0:
                raise OSError("unreadable footer")
            table = pq.ParquetFile(path).read_row_group(row_group)
        except Exception:  # noqa: BLE001
            yield Skip("unreadable_shard", os.path.basename(path))
            return
        names = table.column_names
        image_col = _first(names, self.image_column, IMAGE_COLUMNS)
        path_col = None if image_col else _first(names, None, PATH_COLUMNS)
        caption_col = _first(names, self.caption_column, CAPTION_COLUMNS)
        key_col = _first(names, None, KEY_COLUMNS)
        if image_col is None and path_col is None:
            raise ValueError(f"{path} has no image column; name it one of {IMAGE_COLUMNS + PATH_COLUMNS} "
                             f"or pass image_column= (columns: {names})")
        columns = {n: table.column(n).to_pylist() for n in (image_col, path_col, caption_col, key_col) if n}
        offset = sum(pq.ParquetFile(path).metadata.row_group(i).num_rows for i in range(row_group))
        for row in range(table.num_rows):
            key = str(columns[key_col][row]) if key_col else f"{stem}/{offset + row}"
            record = {"caption": columns[caption_col][row] if caption_col else None, "key": key}
            if image_col:
                value = columns[image_col][row]
                record["image_bytes"] = value.get("bytes") if isinstance(value, dict) else value
                if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
                    record["image_path"] = os.path.join(os.path.dirname(path), value["path"])
            else:
                record["image_path"] = os.path.join(os.path.dirname(path), columns[path_col][row])
            yield record
