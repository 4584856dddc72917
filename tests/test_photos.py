"""Real images inside the scikit-image wheel: augmented crops for the VAE, held-out photographs, the art folder,
and their data specs (photos:N@R, drawings:N@R, A+B)."""
import random

import numpy as np
import pytest
import torch

from ldm.data import open_dataset
from PIL import ImageOps

from ldm.data.photos import (DRAWINGS, HELD_OUT, TRAIN_IMAGES, PhotoCrops, art_images, held_out_crops, random_crop,
                             sample_image, to_pixels, write_art_folder)


def test_crops_are_deterministic_varied_and_of_the_requested_size():
    a, b, c = PhotoCrops(12, 32, seed=0), PhotoCrops(12, 32, seed=0), PhotoCrops(12, 32, seed=1)
    pixels = [np.asarray(a[i]["image"]) for i in range(12)]
    assert all(p.shape == (32, 32, 3) for p in pixels)
    assert all(np.array_equal(p, np.asarray(b[i]["image"])) for i, p in enumerate(pixels))
    assert not all(np.array_equal(p, np.asarray(c[i]["image"])) for i, p in enumerate(pixels))
    assert len({p.tobytes() for p in pixels}) == 12
    brightness = [p.mean() / 255 for p in pixels]
    assert max(brightness) - min(brightness) > 0.2  # scales, images and jitter differ


def test_held_out_photographs_never_enter_training_crops():
    assert not set(HELD_OUT) & set(TRAIN_IMAGES)
    x = held_out_crops(16, per_image=4)
    assert x.shape == (12, 3, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_art_is_dark_saturated_and_textured():
    images = art_images(12, 32)
    rgb = to_pixels(images) * 0.5 + 0.5  # (12, 3, 32, 32) in [0, 1]
    brightness = rgb.mean(dim=(1, 2, 3))
    saturation = (rgb.amax(1) - rgb.amin(1)).mean(dim=(1, 2))
    assert (brightness < 0.35).sum() >= 8 and saturation.max() > 0.6
    assert rgb.std(dim=(2, 3)).mean() > 0.05  # not flat colour


def test_art_folder_holds_images_with_captions(tmp_path):
    paths = write_art_folder(str(tmp_path / "art"), 4, 32)
    assert len(paths) == 4 and all(open(p[:-4] + ".txt").read() for p in paths)
    items = list(open_dataset(str(tmp_path / "art"), resolution=32, shuffle=False))
    assert len(items) == 4 and items[0]["caption"] == "pink circles on a dark background"


def test_photos_spec_and_mixing_built_in_sources():
    items = list(open_dataset("photos:6@16", shuffle=False))
    assert len(items) == 6 and items[0]["pixel_values"].shape == (3, 16, 16) and items[0]["caption"] == "a photograph"
    mixed = list(open_dataset("shapes:5@16+photos:3@16", shuffle=False))
    assert [item["key"].split("-")[0] for item in mixed] == ["shapes"] * 5 + ["photos"] * 3
    with pytest.raises(ValueError, match="bad photos spec"):
        open_dataset("photos:lots")


def test_invert_gives_the_negative_of_the_same_crop():
    image = sample_image("page.png")
    plain = random_crop(image, random.Random("x"), 16, recolour=0.0)
    inverted = random_crop(image, random.Random("x"), 16, recolour=0.0, invert=1.0)
    difference = np.asarray(inverted, np.int16) - np.asarray(ImageOps.invert(plain), np.int16)
    assert np.abs(difference).max() <= 2  # inverted before resampling: equal up to rounding
    with pytest.raises(ValueError, match="invert is a probability"):
        PhotoCrops(2, 16, invert=1.5)


def test_drawings_spec_gives_inverted_and_plain_crops_of_the_drawings():
    assert not set(DRAWINGS) & set(HELD_OUT)
    items = list(open_dataset("drawings:40@16", shuffle=False))
    assert len(items) == 40 and {item["caption"] for item in items} == {"a drawing"}
    assert all(item["key"].startswith("drawings-0-") for item in items)
    drawings = PhotoCrops.drawings(40, 16)
    assert drawings.invert == 0.5 and [d["key"] for d in (drawings[i] for i in range(40))] == [i["key"] for i in items]
    # without recolouring, each crop is the plain one or its negative (up to resampling's rounding), about half
    # negatives
    half = PhotoCrops(40, 16, images=DRAWINGS, recolour=0.0, invert=0.5, name="d")
    plain = PhotoCrops(40, 16, images=DRAWINGS, recolour=0.0, name="d")
    pixels = [(np.asarray(half[i]["image"], np.int16), np.asarray(plain[i]["image"], np.int16)) for i in range(40)]
    negative = [np.abs(h - (255 - p)).max() <= 2 for h, p in pixels]
    assert all(n or np.array_equal(h, p) for n, (h, p) in zip(negative, pixels))
    assert 10 <= sum(negative) <= 30
    mixed = list(open_dataset("photos:2@16+drawings:3@16", shuffle=False))
    assert [item["key"].split("-")[0] for item in mixed] == ["photos"] * 2 + ["drawings"] * 3
    with pytest.raises(ValueError, match="bad drawings spec"):
        open_dataset("drawings:some")


def test_only_built_in_sources_mix(tmp_path):
    write_art_folder(str(tmp_path / "art"), 2, 16)
    with pytest.raises(ValueError, match="only the built-in sources"):
        open_dataset(f"shapes:4@16+folder:{tmp_path / 'art'}")


@pytest.mark.slow
def test_reconstruction_report_measures_each_held_out_set():
    from ldm.models.presets import build_vae, get_spec
    from ldm.training.vae_report import reconstruction_psnr, reconstruction_report

    torch.manual_seed(0)
    vae = build_vae(get_spec("small"))
    report = reconstruction_report(vae, 32)
    assert set(report) == {"photos", "art", "shapes"} and all(0 < v < 20 for v in report.values()), report
    x = held_out_crops(32, per_image=2)
    assert reconstruction_psnr(vae, x, batch_size=2) == pytest.approx(reconstruction_psnr(vae, x), abs=1e-4)
