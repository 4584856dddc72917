"""The handwritten digits source (scikit-learn's load_digits) and its classifier grader: sizes, captions, a fixed
train/test split, the data spec, and a grader that reads real held-out digits and refuses wrong prompts."""
import random

import numpy as np
import pytest

pytest.importorskip("sklearn")

from ldm.data import open_dataset  # noqa: E402
from ldm.data.digits import DigitsDataset, caption_digit, load_split, parse_digits, render_digit, split_indices  # noqa: E402
from ldm.evaluation.digits import adherence_report, classify_digits, grader_ceiling, parse_digit  # noqa: E402


def test_split_is_disjoint_complete_balanced_and_fixed():
    train, test, everything = split_indices("train"), split_indices("test"), split_indices("all")
    assert (len(train), len(test), len(everything)) == (1442, 355, 1797)
    assert not set(train) & set(test) and set(train) | set(test) == set(everything)
    assert np.array_equal(test, split_indices("test"))  # by index, no seed: the same in every process
    labels = load_split("test")[1]
    assert set(np.bincount(labels, minlength=10)) <= {34, 35, 36}  # a fifth of each class
    with pytest.raises(ValueError, match="unknown digits split"):
        split_indices("valid")


def test_items_are_rgb_at_the_resolution_dark_ink_on_white_and_deterministic():
    a, b = DigitsDataset("test", 32), DigitsDataset("test", 32)
    assert len(a) == 355
    for i in (0, 7, 354):
        x, y = a[i], b[i]
        assert x["image"].size == (32, 32) and x["image"].mode == "RGB"
        assert x["caption"] == y["caption"] and x["key"] == y["key"]
        assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
        pixels = np.asarray(x["image"])
        assert pixels.max() == 255 and pixels.min() < 64  # white paper, dark ink
    assert DigitsDataset("train", 16)[0]["image"].size == (16, 16)
    with pytest.raises(IndexError):
        a[355]


def test_captions_name_the_digit_and_canonical_captions_use_one_wording():
    varied, canonical = DigitsDataset("train"), DigitsDataset("train", canonical_captions=True)
    captions = [varied[i]["caption"] for i in range(200)]
    assert all(parse_digit(c) == label for c, label in zip(captions, varied.labels[:200]))
    assert len({c.replace(str(d), "#") for c, d in zip(captions, varied.labels)}) > 1  # several wordings
    assert "a handwritten seven" in {caption_digit(7, random.Random(s)) for s in range(20)}
    assert all(canonical[i]["caption"] == f"a handwritten digit {canonical.labels[i]}" for i in range(50))


def test_spec_forms_open_the_right_split_and_size():
    assert parse_digits("digits") == ("train", None) and parse_digits("digits:test@32") == ("test", 32)
    assert parse_digits("digits@16") == ("train", 16)
    with pytest.raises(ValueError, match="bad digits spec"):
        parse_digits("digits:valid")
    sample = next(iter(open_dataset("digits:test@16", shuffle=False)))
    assert sample["pixel_values"].shape == (3, 16, 16) and sample["key"].startswith("digits-")
    assert float(sample["pixel_values"].min()) >= -1 and float(sample["pixel_values"].max()) <= 1
    keys = {s["key"] for s in open_dataset("digits", resolution=8, shuffle=False)}
    assert len(keys) == 1442 and not keys & {f"digits-{i:04d}" for i in split_indices("test")}


def test_grader_reads_held_out_digits_and_catches_the_wrong_prompt():
    ceiling = grader_ceiling(32)
    assert ceiling["n"] == 355 and ceiling["test_8x8"] > 0.95 and ceiling["test_rendered"] > 0.95
    images, labels = load_split("test")
    rendered = [render_digit(ink, 32) for ink in images[:40]]
    assert (classify_digits(rendered) == labels[:40]).mean() > 0.9
    right = adherence_report(rendered, [f"a handwritten digit {d}" for d in labels[:40]])
    wrong = adherence_report(rendered, [f"a handwritten digit {(d + 1) % 10}" for d in labels[:40]])
    assert right["all"] > 0.9 and right["n"] == 40
    assert wrong["all"] < 0.15 and sum(wrong["confusions"].values()) >= 34
    blank = adherence_report([render_digit(np.zeros((8, 8)), 32)] * 10, [f"the digit {d}" for d in range(10)])
    assert blank["all"] <= 0.2  # an empty page is at most one digit


def test_parse_digit_refuses_prompts_without_exactly_one_digit():
    assert parse_digit("a handwritten 3") == 3 and parse_digit("the digit nine") == 9
    for prompt in ("a handwritten digit", "a 3 and a 4", "a red circle on the left"):
        with pytest.raises(ValueError, match="names"):
            parse_digit(prompt)
