"""Captions at training time: one of a sample's several captions, and tag shuffling and dropout for tag captions.

Tag captions ("sks style, 1girl, red hair, smiling") are lists of tags split at `tag_separator`. As in kohya's
sd-scripts, EveryDream and OneTrainer:
  * shuffle_tags: the tags in a new order each time the caption is used, the first `keep_tags` in place
    (kohya's --shuffle_caption --keep_tokens N): a trigger word keeps its place, the rest stop being an order
    the model could learn;
  * tag_dropout: each tag after the first `keep_tags` dropped with this probability (kohya's
    --caption_tag_dropout_rate); a caption keeps at least one tag (the kept ones, else the first remaining one).
Whole-caption dropout for classifier-free guidance is ldm.diffusion.drop_captions, applied after these.

Every function is pure in (caption(s), settings, generator): each draw comes from the torch.Generator passed in,
a training step's ldm.training.step.step_generator, so a resumed run draws exactly what the uninterrupted one
drew; with the settings off (and one caption per sample) nothing is drawn at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.data.decode import decode_caption
from ldm.data.skips import BadSample


@dataclass(frozen=True)
class CaptionSpec:
    """What happens to a caption's tags each time it is used (all off by default: captions as written)."""
    shuffle_tags: bool = False
    keep_tags: int = 0            # leading tags never moved or dropped
    tag_dropout: float = 0.0      # probability of dropping each other tag
    tag_separator: str = ","

    def __post_init__(self):
        if self.keep_tags < 0:
            raise ValueError(f"keep_tags must be >= 0 (0 = no tag kept in place), got {self.keep_tags}")
        if not 0 <= self.tag_dropout < 1:
            raise ValueError(f"tag_dropout must be in [0, 1) (0 = off), got {self.tag_dropout}")
        if not self.tag_separator:
            raise ValueError("tag_separator must not be empty; the usual one is ','")

    @property
    def active(self) -> bool:
        """Whether captions change at all (keep_tags alone changes nothing)."""
        return self.shuffle_tags or self.tag_dropout > 0

    @classmethod
    def from_config(cls, cfg) -> "CaptionSpec":
        return cls(cfg.shuffle_tags, cfg.keep_tags, cfg.tag_dropout, cfg.tag_separator)


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """Returns the caption's tags: split at `separator`, stripped, empty ones left out."""
    return [tag.strip() for tag in caption.split(separator) if tag.strip()]


def join_tags(tags: list[str], separator: str = ",") -> str:
    """Returns the tags as one caption: "a, b, c" for ",", the separator itself when it is whitespace."""
    return (separator if separator.isspace() else separator + " ").join(tags)


def augment_tags(caption: str, spec: CaptionSpec, generator: torch.Generator | None = None) -> str:
    """Returns the caption with its tags after the first spec.keep_tags shuffled (spec.shuffle_tags) and each dropped
    with probability spec.tag_dropout; the caption itself, unchanged, when no tag moved or dropped.

    Draws a permutation of the droppable tags when shuffling (2 or more of them), then one uniform per droppable tag
    when dropping (1 or more); a tag is dropped when its uniform is < tag_dropout. When every droppable tag would
    drop and no tag is kept, the first droppable tag (after shuffling) stays: tag dropout never empties a caption.
    """
    tags = split_tags(caption, spec.tag_separator)
    kept, rest = tags[:spec.keep_tags], tags[spec.keep_tags:]
    if spec.shuffle_tags and len(rest) > 1:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    if spec.tag_dropout > 0 and rest:
        survive = (torch.rand(len(rest), generator=generator) >= spec.tag_dropout).tolist()
        survivors = [tag for tag, keep in zip(rest, survive) if keep]
        rest = survivors if survivors or kept else rest[:1]
    augmented = kept + rest
    return caption if augmented == tags else join_tags(augmented, spec.tag_separator)


def augment_captions(captions: list[str], spec: CaptionSpec | None,
                     generator: torch.Generator | None = None) -> list[str]:
    """Returns augment_tags of each caption in order; the list itself, with no draw, when spec is None or off."""
    if spec is None or not spec.active:
        return captions
    return [augment_tags(caption, spec, generator) for caption in captions]


def pick_captions(options: list[list[str]], generator: torch.Generator | None = None) -> list[str]:
    """Returns one caption per sample, uniformly among its options (e.g. COCO's five).

    Draws one uniform per sample (B,) when any sample has two or more options; none when each has one.
    """
    if any(not choices for choices in options):
        raise ValueError("a sample has no caption to pick from")
    if all(len(choices) == 1 for choices in options):
        return [choices[0] for choices in options]
    u = torch.rand(len(options), generator=generator, dtype=torch.float64).tolist()  # (B,)
    return [choices[min(int(x * len(choices)), len(choices) - 1)] for choices, x in zip(options, u)]


def caption_options(caption) -> list[str]:
    """Returns every usable caption of a record's "caption" (a str, bytes, or a list of them: COCO), in order,
    each as ldm.data.decode.decode_caption returns it; unusable ones (empty, not UTF-8) are left out."""
    options = []
    for option in caption if isinstance(caption, (list, tuple)) else [caption]:
        if isinstance(option, (list, tuple)):
            continue  # nested lists are no caption format; decode_caption would pick from them at random
        try:
            options.append(decode_caption(option))
        except BadSample:
            continue
    return options
