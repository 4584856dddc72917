"""The shapes prompts that `ldm demo`, `ldm eval-guidance --prompts shapes` and the benchmarks grade: the 90
single-shape scenes in the training wording and in held-out wordings, and random two-shape prompts. The graders
are in ldm.evaluation.adherence.

    eval_prompts(90)        "a red circle on the left", ...: every colour x shape x position, balanced
    held_out_prompts(90)    the same scenes in wordings the demo holds out of training (shapes.HELD_OUT_WORDINGS)
    two_shape_prompts(60)   "a red circle above a blue square", ...
"""
from __future__ import annotations


def canonical_prompt(colour: str, shape: str, position: str) -> str:
    """Returns the demo's wording of a single-shape scene: "a red circle on the left"."""
    from ldm.data.shapes import POSITION_PHRASES

    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} {POSITION_PHRASES[position][0]}"


def eval_scenes(count: int) -> list[tuple[str, str, str]]:
    """Returns `count` (<= 90) distinct single-shape scenes (colour, shape, position), balanced over colour and
    position; 90 is every combination of 6 colours x 3 shapes x 5 positions."""
    from ldm.data.shapes import COLOURS, POSITIONS, SHAPES

    if not 1 <= count <= 90:
        raise ValueError(f"num_prompts must be 1 to 90 (6 colours x 3 shapes x 5 positions), got {count}")
    colours = list(COLOURS)
    # (i % 6, i % 5) is unique for i < 30 (Chinese remainder theorem); each block of 30 shifts the shapes by one
    return [(colours[i % 6], SHAPES[((i % 30) // 6 + i // 30) % 3], POSITIONS[i % 5]) for i in range(count)]


def eval_prompts(count: int) -> list[str]:
    """Returns the eval_scenes in the canonical wording ("a red circle on the left"), one the demo trains on."""
    return [canonical_prompt(*scene) for scene in eval_scenes(count)]


def held_out_prompts(count: int) -> list[str]:
    """Returns the eval_scenes each in one of the wordings the demo holds out of training (shapes.HELD_OUT_WORDINGS,
    in turn): "one red circle at the left", "a picture of a blue square in the center", ..."""
    from ldm.data.shapes import SceneObject, single_wordings

    return [single_wordings(SceneObject(shape, colour, position), held_out=True)[i % 4]
            for i, (colour, shape, position) in enumerate(eval_scenes(count))]


def two_shape_prompts(count: int, seed: int = 0) -> list[str]:
    """Returns `count` random two-shape prompts ("a red circle above a blue square"), the same for a given seed."""
    import random

    from ldm.data.shapes import pair_wordings, random_scene

    rng = random.Random(f"demo-pairs/{seed}")
    return [pair_wordings(random_scene(rng, two_shape_fraction=1.0))[rng.random() < 0.5] for _ in range(count)]
