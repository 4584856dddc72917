"""Aspect-ratio buckets in `ldm train`: every image once per epoch, one size per batch, most of each image kept."""
import random

import numpy as np
import pytest
from PIL import Image

from ldm.data import make_dataloader, open_dataset, render_scene
from ldm.data.shapes import SceneObject
from ldm.data.transforms import ImageTransform

pytestmark = pytest.mark.usefixtures("one_thread")

LANDSCAPE, PORTRAIT, SQUARE = (48, 32), (32, 48), (32, 32)  # (width, height) of the images written
BUCKET = {LANDSCAPE: (24, 40), PORTRAIT: (40, 24), SQUARE: (32, 32)}  # (H, W) of their bucket at 32 px


def write_mixed_folder(folder, counts=(5, 4, 3)) -> dict:
    """Writes landscape, portrait and square shapes scenes with NAME.txt captions; returns {key: (width, height)}."""
    folder.mkdir()
    sizes = {}
    rng = random.Random(0)
    for size, count in zip((LANDSCAPE, PORTRAIT, SQUARE), counts):
        for i in range(count):
            key = f"{'lps'[list(BUCKET).index(size)]}{i:02d}"
            scene = render_scene([SceneObject(rng.choice(["circle", "square"]), rng.choice(["red", "blue"]),
                                              "center")], 32)
            canvas = Image.new("RGB", size, (240, 240, 240))
            canvas.paste(scene, ((size[0] - 32) // 2, (size[1] - 32) // 2))
            canvas.save(folder / f"{key}.png")
            (folder / f"{key}.txt").write_text(f"a scene {key}")
            sizes[key] = size
    return sizes


def test_streamed_buckets_see_every_key_once_per_epoch_over_ranks_and_workers(tmp_path):
    sizes = write_mixed_folder(tmp_path / "mixed", counts=(9, 7, 5))
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            dataset = open_dataset(str(tmp_path / "mixed"), resolution=32, aspect_buckets=True, rank=rank,
                                   world_size=2, seed=3)
            loader = make_dataloader(dataset, batch_size=4, num_workers=2)
            loader.set_epoch(epoch)
            for batch in loader:
                assert len(batch["key"]) <= 4
                # one size per batch, and it is each image's own bucket
                assert {BUCKET[sizes[k]] for k in batch["key"]} == {tuple(batch["pixel_values"].shape[2:])}
                seen += batch["key"]
        assert sorted(seen) == sorted(sizes)  # every key exactly once, none dropped for a part-filled bucket


def test_latent_cache_buckets_see_every_key_once_per_epoch_over_ranks_and_resume(tmp_path):
    from ldm.data import build_latent_cache, open_latent_cache
    from ldm.models.presets import build_components
    from ldm.training.stream import BatchStream

    sizes = write_mixed_folder(tmp_path / "mixed")
    parts = build_components("tiny")
    build_latent_cache(str(tmp_path / "mixed"), parts["vae"], parts["tokenizer"], str(tmp_path / "cache"),
                       resolution=32, aspect_buckets=True)
    cache = open_latent_cache(str(tmp_path / "cache"))
    latent = {k: (h // 8, w // 8) for k, (h, w) in ((k, BUCKET[s]) for k, s in sizes.items())}  # VAE factor 8
    assert sorted(set(cache.shapes())) == sorted((4, *hw) for hw in set(latent.values()))

    def one_epoch(stream):
        batches = []
        for batch in stream:
            if stream.epoch:  # the first batch of the next epoch
                return batches
            batches.append(batch)

    seen = []
    for rank in (0, 1):
        batches = one_epoch(BatchStream(cache, batch_size=2, rank=rank, world_size=2, seed=5))
        for batch in batches:
            assert {latent[k] for k in batch["key"]} == {tuple(batch["latent_mean"].shape[2:])}
        seen += [k for b in batches for k in b["key"]]
        resumed = BatchStream(cache, batch_size=2, rank=rank, world_size=2, seed=5)
        resumed.seek({"epoch": 0, "batch_in_epoch": 2})
        assert [b["key"] for b in one_epoch(resumed)] == [b["key"] for b in batches[2:]]
    assert sorted(seen) == sorted(sizes)


def kept_fraction(image_size, out_size) -> float:
    """Returns the fraction of an image's area left after resize_and_crop to out_size (both (width, height))."""
    scale = max(out_size[0] / image_size[0], out_size[1] / image_size[1])
    return out_size[0] * out_size[1] / (image_size[0] * image_size[1] * scale**2)


@pytest.mark.parametrize("size", [(640, 427), (427, 640), (1600, 900), (900, 1600)])
def test_buckets_keep_most_of_portrait_and_landscape_images(size):
    bucketed, square = ImageTransform(512, aspect_buckets=True), ImageTransform(512)
    image = Image.new("RGB", size)
    out = bucketed.target_size(image)
    assert out[0] % 8 == 0 and out[1] % 8 == 0 and abs(out[0] * out[1] / 512**2 - 1) < 0.1
    assert kept_fraction(size, out) > 0.8 > 0.7 > kept_fraction(size, square.target_size(image))


def test_buckets_keep_the_edges_of_a_landscape_image_at_64px():
    # red and blue strips at the far left and right (10% of the width each): a centre crop cuts both away
    array = np.full((64, 96, 3), 128, np.uint8)
    array[:, :10] = (255, 0, 0)
    array[:, -10:] = (0, 0, 255)
    sample = {"image": Image.fromarray(array), "caption": "c", "key": "k"}
    bucketed = ImageTransform(64, aspect_buckets=True)(sample, random.Random(0))["pixel_values"]  # (3, h, w)
    square = ImageTransform(64)(sample, random.Random(0))["pixel_values"]
    assert bucketed.shape[1:] == (48, 80) and square.shape[1:] == (64, 64)
    assert bucketed[0, :, 0].min() > 0.9 and bucketed[2, :, -1].min() > 0.9  # both strips still there
    assert square[0, :, 0].max() < 0.1 and square[2, :, -1].max() < 0.1


def test_ldm_train_runs_with_buckets_on_a_mixed_aspect_folder(tmp_path, monkeypatch):
    from ldm.training import stream as stream_module
    from ldm.training import train_ldm
    from ldm.training.ldm_config import TrainLDMConfig

    sizes = write_mixed_folder(tmp_path / "mixed")
    batches = []

    class RecordingStream(stream_module.BatchStream):
        def __iter__(self):
            for batch in super().__iter__():
                batches.append((list(batch["key"]), tuple(batch["pixel_values"].shape[2:])))
                yield batch

    monkeypatch.setattr(train_ldm, "BatchStream", RecordingStream)
    # 5 + 4 + 3 images in batches of 4: 2 + 1 + 1 batches, so 4 steps are one epoch
    cfg = TrainLDMConfig(model="tiny", data=str(tmp_path / "mixed"), resolution=32, aspect_buckets=True,
                         batch_size=4, max_steps=4, learning_rate=1e-3, lr_warmup_steps=0,
                         output_dir=str(tmp_path / "run"), checkpoint_every=1000, validation_every=1000,
                         validation_steps=2, val_loss_samples=4, report_to="none", use_ema=False)
    cfg.validate()
    result = train_ldm.main(cfg)
    assert result["step"] == 4 and all(np.isfinite(list(result["losses"].values())))
    assert sorted(k for keys, _ in batches[:4] for k in keys) == sorted(sizes)
    assert all({BUCKET[sizes[k]] for k in keys} == {shape} for keys, shape in batches)
    assert {shape for _, shape in batches[:4]} == set(BUCKET.values())
    assert (tmp_path / "run" / "samples" / "step-00000004.png").is_file()


def test_ldm_train_with_buckets_and_the_latent_cache(tmp_path):
    from ldm.training import train_ldm
    from ldm.training.ldm_config import TrainLDMConfig

    write_mixed_folder(tmp_path / "mixed")
    cfg = TrainLDMConfig(model="tiny", data=str(tmp_path / "mixed"), resolution=32, aspect_buckets=True,
                         latent_cache=str(tmp_path / "cache"), batch_size=4, max_steps=3, lr_warmup_steps=0,
                         output_dir=str(tmp_path / "run"), checkpoint_every=1000, validation_every=1000,
                         num_validation_prompts=0, val_loss_samples=4, report_to="none", use_ema=False)
    cfg.validate()
    result = train_ldm.main(cfg)
    from ldm.data import open_latent_cache

    assert result["step"] == 3 and len(set(open_latent_cache(str(tmp_path / "cache")).shapes())) == 3
