"""Broken input: the reasons a sample is skipped, and a counter that reports them at the end of an epoch.

Nothing in ldm.data raises on a bad sample: the reader or decoder yields `Skip(reason, key)` and moves on.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

REASONS = {
    "empty_file": "zero-byte image file",
    "not_an_image": "not an image (unidentifiable bytes behind an image extension)",
    "corrupt_image": "corrupt or truncated image data",
    "too_small": "image smaller than the minimum side",
    "too_large": "image over the pixel limit (decompression bomb guard)",
    "missing_caption": "missing or empty caption",
    "bad_caption_encoding": "caption is not valid UTF-8",
    "missing_image": "record without image data",
    "truncated_shard": "shard cut off in the middle (the partial record is dropped)",
    "unreadable_shard": "shard or file that cannot be opened",
    # remote shards (ldm.data.remote), each after its retries; mid-shard, the shard's remaining records
    "shard_unreachable": "remote shard whose server cannot be reached (refused, reset, DNS)",
    "shard_http_404": "remote shard not found (HTTP 404 or 410)",
    "shard_http_error": "remote shard answered with another HTTP error status",
    "shard_stalled": "remote shard that sent nothing for the read timeout",
    "pipe_failed": "pipe: command that exited with an error status",
    "bad_mask": "loss mask file that cannot be read (empty, not an image or corrupt)",
    "mask_size_mismatch": "loss mask whose size is not its image's",
}


class BadSample(Exception):
    """Raised inside decoders for one bad sample; `reason` is a key of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Skip:
    """One skipped sample (or shard): yielded in place of the sample by readers."""
    reason: str
    key: str


class SkipCounter:
    """Counts skipped samples by reason; `.counts` is {reason: n}, `.report()` a one-paragraph summary."""

    def __init__(self, counts: dict | None = None, examples: dict | None = None):
        self.counts: Counter = Counter(counts or {})
        self.examples: dict[str, str] = dict(examples or {})  # the first key skipped for each reason

    def add(self, reason: str, key: str = "", n: int = 1) -> None:
        self.counts[reason] += n
        self.examples.setdefault(reason, key)

    def update(self, other: "SkipCounter | dict") -> None:
        """Adds the counts of another counter (or a {reason: n} dict, e.g. from a worker)."""
        counts = other.counts if isinstance(other, SkipCounter) else other
        examples = other.examples if isinstance(other, SkipCounter) else {}
        for reason, n in counts.items():
            self.add(reason, examples.get(reason, ""), n)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reset(self) -> None:
        self.counts.clear()
        self.examples.clear()

    def report(self) -> str:
        """Returns e.g. "skipped 3 samples: 2 corrupt_image (corrupt or truncated image data; first: a.jpg), ..."."""
        if not self.total:
            return "skipped 0 samples"
        parts = [f"{n} {reason} ({REASONS.get(reason, reason)}; first: {self.examples.get(reason) or '?'})"
                 for reason, n in sorted(self.counts.items(), key=lambda kv: -kv[1])]
        return f"skipped {self.total} samples: " + ", ".join(parts)

    def __repr__(self) -> str:
        return f"SkipCounter({dict(self.counts)})"
