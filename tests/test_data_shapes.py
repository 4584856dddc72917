"""The embedded shapes data set: deterministic, varied captions, mostly single shapes, any resolution."""
import random

import numpy as np
import pytest

from ldm.data.shapes import COLOURS, POSITIONS, SHAPES, SceneObject, ShapesDataset, caption_scene, render_scene


def test_same_seed_same_samples_and_other_seed_differs():
    a, b, c = ShapesDataset(20, seed=3), ShapesDataset(20, seed=3), ShapesDataset(20, seed=4)
    for i in range(20):
        assert a[i]["caption"] == b[i]["caption"] and a[i]["key"] == b[i]["key"]
        assert np.array_equal(np.asarray(a[i]["image"]), np.asarray(b[i]["image"]))
    assert [a[i]["caption"] for i in range(20)] != [c[i]["caption"] for i in range(20)]


def test_single_shapes_are_the_majority_and_captions_vary():
    dataset = ShapesDataset(400, seed=0, two_shape_fraction=0.25)
    scenes = [dataset.scene(i)[0] for i in range(400)]
    singles = sum(len(s) == 1 for s in scenes)
    assert 0.65 < singles / 400 < 0.85
    captions = {dataset[i]["caption"] for i in range(100)}
    assert "a red circle on the left" in {caption_scene([SceneObject("circle", "red", "left")], random.Random(s))
                                          for s in range(10)}
    assert any(" above " in c or " below " in c or " of " in c for c in captions)
    assert any(c.startswith("a picture of") for c in captions)


def test_caption_names_the_objects():
    for i in range(50):
        objects, _, rng = ShapesDataset(50, seed=1).scene(i)
        caption = caption_scene(objects, rng)
        for obj in objects:
            assert obj.colour in caption and obj.shape in caption
        if len(objects) == 1:
            position = objects[0].position
            assert position in caption or (position == "center" and "middle" in caption)


@pytest.mark.parametrize("resolution", [16, 64, 96])
def test_render_resolution_and_background(resolution):
    image = render_scene([SceneObject("square", "blue", "center")], resolution, background=(240, 240, 240))
    assert image.size == (resolution, resolution) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert tuple(pixels[0, 0]) == (240, 240, 240)
    assert tuple(pixels[resolution // 2, resolution // 2]) == COLOURS["blue"]


def test_validation_and_constants():
    assert len(COLOURS) == 6 and SHAPES == ("circle", "square", "triangle") and len(POSITIONS) == 5
    with pytest.raises(ValueError, match="unknown colour"):
        SceneObject("circle", "pink", "left")
    with pytest.raises(ValueError, match="majority"):
        ShapesDataset(10, two_shape_fraction=0.6)


def test_held_out_wordings_use_only_trained_words_in_new_combinations():
    from ldm.data.shapes import HELD_OUT_WORDINGS, SINGLE_TEMPLATES, single_wordings

    for shape in SHAPES:
        for colour in COLOURS:
            for position in POSITIONS:
                obj = SceneObject(shape, colour, position)
                every, trained, held_out = (single_wordings(obj), single_wordings(obj, held_out=False),
                                            single_wordings(obj, held_out=True))
                assert len(every) == 12 and len(trained) == 8 and len(held_out) == 4
                assert set(trained) | set(held_out) == set(every) and not set(trained) & set(held_out)
                assert every[0] == trained[0]  # the canonical wording is trained
                known = {word for wording in trained for word in wording.split()}
                assert all(set(wording.split()) <= known for wording in held_out)
    assert {t for t, _ in HELD_OUT_WORDINGS} == set(range(len(SINGLE_TEMPLATES)))  # each template loses one
