"""WebDataset `.tar` shards (https://github.com/webdataset/webdataset, "WebDataset format"), streamed.

Shards are given as one path, a folder, a glob (`shards/*.tar`) or a brace pattern (`shards/{00000..00099}.tar`);
`.tar.gz` streams too. Remote shards: `http(s)://host/shards/{000000..000031}.tar` or `pipe:CMD` (the command
writes the shard to stdout, e.g. `pipe:aws s3 cp s3://bucket/{000..009}.tar -`), brace-expanded without any
existence check (HTTP has no listing) and streamed by ldm.data.remote (read timeout, bounded retries that
resume at the byte reached), never copied to disk. Every rank and DataLoader worker opens only its own shards
(ldm.data.dataset: consumer c of n = ranks x workers takes shards c, c+n, ...: a partition, as webdataset's
split_by_node then split_by_worker make one, with another assignment).

Files are grouped into records by key: the path up to the first dot of the base name (`a/0001.jpg` +
`a/0001.txt` -> key `a/0001`). Image from jpg/jpeg/png/webp/bmp; caption from `.txt`, else from `caption_key`
(default "caption", then "text") inside `.json`.

Yields records {"image_bytes": bytes, "caption": bytes | str | None, "key": str}; a shard cut off in the
middle yields its complete records then Skip("truncated_shard"); a shard that cannot be opened
Skip("unreadable_shard"). A remote shard that fails for good (after its retries) yields Skip(reason) with
ldm.data.remote's reason (shard_unreachable, shard_http_404, ...): before its first record that is the whole
shard; mid-way its complete records are kept and the rest of the shard is that one skip.
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import tarfile
import zlib

from ldm.data.remote import ShardError, check_remote, is_remote, open_remote, shard_name
from ldm.data.skips import Skip

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def brace_expand(pattern: str) -> list[str]:
    """Returns the expansion of `{a,b}` and `{000..099}` (zero padding kept), like bash and webdataset."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    elif "," in body:
        options = body.split(",")
    else:  # "{print}" in a pipe: command is no pattern (bash keeps it as written)
        return [head + "{" + body + "}" + rest for rest in brace_expand(tail)]
    return [expanded for option in options for expanded in brace_expand(head + option + tail)]


def expand_shards(spec: str) -> list[str]:
    """Returns the shard paths named by a path, folder, glob or brace pattern (URLs and pipe: commands unchecked);
    raises if none exist."""
    if is_remote(spec):
        return [check_remote(unit) for unit in brace_expand(spec)]
    if os.path.isdir(spec):
        paths = sorted(p for p in glob.glob(os.path.join(spec, "**", "*"), recursive=True) if p.endswith(SHARD_SUFFIXES))
    else:
        paths = []
        for pattern in brace_expand(spec):
            paths.extend(sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])
    missing = [p for p in paths if not os.path.exists(p)]
    if missing or not paths:
        raise FileNotFoundError(f"no webdataset shards at {spec!r}" + (f" (missing: {missing[:3]})" if missing else "")
                                + "; pass a .tar path, a folder of shards, a glob or a brace pattern like "
                                  "'shards/{00000..00009}.tar'")
    return paths


def split_name(name: str) -> tuple[str, str]:
    """Returns (key, extension) of a member name: "a/0001.seg.jpg" -> ("a/0001", "seg.jpg")."""
    folder, base = os.path.split(name)
    stem, _, extension = base.partition(".")
    return os.path.join(folder, stem) if folder else stem, extension.lower()


def group_to_record(key: str, files: dict[str, bytes], caption_key: str) -> dict:
    """Returns the record of one key's files: image bytes and caption bytes/str (None when absent)."""
    image = next((files[e] for e in IMAGE_KEYS if e in files), None)
    caption = files.get("txt")
    if caption is None and "json" in files:
        try:
            meta = json.loads(files["json"].decode("utf-8"))
            caption = meta.get(caption_key, meta.get("text")) if isinstance(meta, dict) else None
        except (UnicodeDecodeError, ValueError):
            caption = b"\xff"  # reported as bad_caption_encoding
    return {"image_bytes": image, "caption": caption, "key": key}


class WebDatasetSource:
    """Units are shard paths; each is read as a stream, so shards of any size use little memory."""

    def __init__(self, spec: str, caption_key: str = "caption", timeout: float = 30.0, retries: int = 3):
        self.shards, self.caption_key, self.name = expand_shards(spec), caption_key, "webdataset"
        self.timeout, self.retries = timeout, retries  # remote shards: read timeout (s), retries per shard

    def units(self) -> list[str]:
        return self.shards

    def read(self, unit: str, rng: random.Random):
        name = shard_name(unit) if is_remote(unit) else os.path.basename(unit)
        remote = open_remote(unit, self.timeout, self.retries) if is_remote(unit) else None
        try:
            yield from self._read_tar(remote, unit, name)
        finally:
            if remote is not None:  # tarfile leaves a fileobj it was given open: end the connection or command
                remote.close()

    def _read_tar(self, remote, unit: str, name: str):
        """Yields the records of one shard (a local path, or the open remote stream), then the skip if it fails."""
        key, files = None, {}
        try:
            stream = tarfile.open(unit, "r|*") if remote is None else tarfile.open(fileobj=remote, mode="r|*")
        except ShardError as e:
            yield Skip(e.reason, name)
            return
        except (tarfile.TarError, OSError, EOFError, zlib.error):
            yield Skip("unreadable_shard", name)
            return
        try:
            with stream:
                for member in stream:
                    if not member.isfile():
                        continue
                    member_key, extension = split_name(member.name)
                    if member_key != key:  # the previous record is complete: yield it before reading on
                        if files:
                            yield group_to_record(key, files, self.caption_key)
                        key, files = member_key, {}
                    files[extension] = stream.extractfile(member).read()
        except ShardError as e:  # the remote stream gave up: the rest of the shard goes with this one skip
            yield Skip(e.reason, f"{name}:{key}")
            return
        except (tarfile.TarError, OSError, EOFError, zlib.error):
            yield Skip("truncated_shard", f"{name}:{key}")  # the partial record goes with it
            return
        if files:
            yield group_to_record(key, files, self.caption_key)
