"""The embedded shapes data set: captioned pictures of filled shapes, drawn on the fly.

Deterministic by seed, any size and resolution (64 px default), nothing to download. Each scene holds one
shape (most scenes) or two, each a circle, square or triangle in one of six colours, at one of five positions
on a plain light background:

    "a red circle on the left"              one shape, position left/right/top/bottom/center
    "a blue square above a yellow triangle" two shapes, related by above/below/left of/right of

Captions vary in wording ("a red circle on the left side", "red circle at the left", ...); the first
template of each list is the most frequent and is the wording the demo prompts with.

`ShapesDataset[i]` yields {"image": PIL RGB (resolution x resolution), "caption": str, "key": str}, the raw
sample of every ldm.data source (before transforms). `open_dataset("shapes:N")` or "shapes:N@R" wraps it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

# Saturated and far apart in hue and lightness, so each stays recognisable after VAE blur.
COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 135, 0),
    "yellow": (235, 215, 0),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "purple": (135, 40, 175),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")

# Centre of each position as fractions of the side (x, y); each lies inside its third of the image.
POSITION_CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
                    "center": (0.5, 0.5)}
POSITION_PHRASES = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "on the top"),
    "bottom": ("at the bottom", "near the bottom", "on the bottom"),
    "center": ("in the center", "in the middle", "at the center"),
}
SINGLE_TEMPLATES = ("{a} {colour} {shape} {where}", "{colour} {shape} {where}",
                    "a picture of {a} {colour} {shape} {where}", "one {colour} {shape} {where}")
# Wordings of a single-shape scene, (template, phrase) indices into SINGLE_TEMPLATES x POSITION_PHRASES: 12 in all.
# The demo trains on 8 and holds these 4 out, one per template and each phrase index at least once, so that every
# word of a held-out wording is known from training and only its combination is new ("one red circle at the left").
HELD_OUT_WORDINGS = ((0, 2), (1, 1), (2, 0), (3, 2))
# (position of the subject, position of the other) -> relation words
RELATIONS = {("top", "bottom"): "above", ("bottom", "top"): "below",
             ("left", "right"): "to the left of", ("right", "left"): "to the right of"}
SINGLE_SIZE, PAIR_SIZE = 0.40, 0.32   # shape side (or diameter) as a fraction of the image side
SUPERSAMPLE = 4                        # draw at 4x and downsample: anti-aliased edges


@dataclass(frozen=True)
class SceneObject:
    """One filled shape: `size` is its side/diameter and (dx, dy) its jitter, both as fractions of the side."""
    shape: str
    colour: str
    position: str
    size: float = SINGLE_SIZE
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; choose one of {tuple(COLOURS)}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; choose one of {POSITIONS}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int) -> None:
    cx, cy = POSITION_CENTRES[obj.position]
    cx, cy, half = (cx + obj.dx) * side, (cy + obj.dy) * side, obj.size * side / 2
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    else:  # upright isosceles triangle filling half of its bounding square
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)


def render_scene(objects: list[SceneObject], resolution: int = 64,
                 background: tuple[int, int, int] = (240, 240, 240)) -> Image.Image:
    """Returns the scene as a PIL RGB image of resolution x resolution pixels (a pure function)."""
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 px, got {resolution}")
    side = resolution * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), tuple(background))
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        _draw_object(draw, obj, side)
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


def _pick(rng: random.Random, options: tuple[str, ...]) -> str:
    # The first wording is the canonical one: half of the draws.
    return options[0] if rng.random() < 0.5 else rng.choice(options[1:])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_scene(objects: list[SceneObject], rng: random.Random) -> str:
    """Returns a caption of a one- or two-shape scene, with wording drawn from `rng`."""
    if len(objects) == 1:
        obj = objects[0]
        template = _pick(rng, SINGLE_TEMPLATES)
        return template.format(a=_article(obj.colour), colour=obj.colour, shape=obj.shape,
                               where=_pick(rng, POSITION_PHRASES[obj.position]))
    if len(objects) == 2:
        return pair_wordings(objects)[0 if rng.random() < 0.5 else 1]
    raise ValueError(f"a scene holds one or two shapes, got {len(objects)}")


def single_wordings(obj: SceneObject, held_out: bool | None = None) -> list[str]:
    """Returns the wordings of a one-shape scene in (template, phrase) order: all 12 (held_out None), the 8 the demo
    trains on (False) or the 4 of HELD_OUT_WORDINGS (True). The first of all 12 is the canonical wording."""
    wordings = []
    for t, template in enumerate(SINGLE_TEMPLATES):
        for p, where in enumerate(POSITION_PHRASES[obj.position]):
            if held_out is None or held_out == ((t, p) in HELD_OUT_WORDINGS):
                wordings.append(template.format(a=_article(obj.colour), colour=obj.colour, shape=obj.shape,
                                                where=where))
    return wordings


def pair_wordings(objects: list[SceneObject]) -> list[str]:
    """Returns both wordings of a two-shape scene: each shape as the subject ("a red circle above a blue square",
    "a blue square below a red circle")."""
    wordings = []
    for subject, other in (objects, objects[::-1]):
        relation = RELATIONS.get((subject.position, other.position))
        if relation is None:
            raise ValueError(f"two shapes must be top/bottom or left/right, got {subject.position}/{other.position}")
        wordings.append(f"{_article(subject.colour)} {subject.colour} {subject.shape} {relation} "
                        f"{_article(other.colour)} {other.colour} {other.shape}")
    return wordings


def random_background(rng: random.Random) -> tuple[int, int, int]:
    """Returns a plain light, nearly grey colour (every channel in 222..250)."""
    base = rng.randint(228, 246)
    return tuple(min(250, max(222, base + rng.randint(-6, 6))) for _ in range(3))


def random_scene(rng: random.Random, two_shape_fraction: float = 0.25) -> list[SceneObject]:
    """Returns one random shape, or (with probability `two_shape_fraction`) two of different colours."""
    jitter = lambda: rng.uniform(-0.04, 0.04)  # noqa: E731 - keeps each centre inside its third
    if rng.random() >= two_shape_fraction:
        return [SceneObject(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(POSITIONS),
                            size=SINGLE_SIZE * rng.uniform(0.9, 1.1), dx=jitter(), dy=jitter())]
    first, second = rng.choice([("top", "bottom"), ("left", "right")])
    colour_a, colour_b = rng.sample(list(COLOURS), 2)
    return [SceneObject(rng.choice(SHAPES), colour_a, first, size=PAIR_SIZE, dx=jitter(), dy=jitter()),
            SceneObject(rng.choice(SHAPES), colour_b, second, size=PAIR_SIZE, dx=jitter(), dy=jitter())]


class ShapesDataset:
    """Map-style: item i is {"image": PIL RGB, "caption": str, "key": "shapes-SEED-i"}, the same for a given seed."""

    def __init__(self, num_samples: int, resolution: int = 64, seed: int = 0, two_shape_fraction: float = 0.25):
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 0.0 <= two_shape_fraction < 0.5:
            raise ValueError(f"two_shape_fraction must be in [0, 0.5) so single shapes are the majority, "
                             f"got {two_shape_fraction}")
        self.num_samples, self.resolution, self.seed = num_samples, resolution, seed
        self.two_shape_fraction = two_shape_fraction

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> tuple[list[SceneObject], tuple[int, int, int], random.Random]:
        """Returns the objects, background and caption rng of item `index` (ground truth for graders)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = random.Random(f"shapes/{self.seed}/{index}")  # str seeds are hashed stably across runs
        objects = random_scene(rng, self.two_shape_fraction)
        return objects, random_background(rng), rng

    def __getitem__(self, index: int) -> dict:
        objects, background, rng = self.scene(index)
        return {"image": render_scene(objects, self.resolution, background), "caption": caption_scene(objects, rng),
                "key": f"shapes-{self.seed}-{index:08d}"}
