"""Masked loss (ldm.data.masks): the loss ignores what the mask leaves out, masks follow their images through
every crop, flip and bucket, broken masks are skipped and counted, and the caches keep them."""
import os

import pytest
import torch
from PIL import Image, ImageDraw

from ldm import diffusion
from ldm.data import open_dataset
from ldm.data.masks import is_mask_file, latent_mask, loss_weight
from ldm.models.denoiser import denoise
from ldm.models.presets import build_components
from ldm.objectives import objective_for
from ldm.training.step import LossSpec, batch_loss_weight, diffusion_loss
from test_finetune_e2e import base_model  # noqa: F401 - the slow test's fixture: a 16 px model trained on shapes


class PerPixelDenoiser(torch.nn.Module):
    """A 1x1-convolution denoiser: each latent pixel's prediction sees that pixel only (no receptive field)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, latents, time, context, pooled=None):
        return self.conv(latents)


@pytest.fixture(scope="module")
def tiny():
    return build_components("tiny", seed=0)


def latents_pair(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns two latent batches (2, 4, 8, 8) equal where `mask` (2, 1, 8, 8) is 1 and different elsewhere."""
    a = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    other = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    return a, torch.where(mask.bool(), a, other)


def grads_of(model, latents, spec, tiny, weight) -> list[torch.Tensor]:
    model.zero_grad()
    objective = objective_for(tiny["scheduler"])
    loss, _ = diffusion_loss(model, latents, torch.zeros(2, 77, 32), objective, spec, torch.Generator().manual_seed(0),
                             pixel_weight=weight)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_floor_zero_the_unmasked_latents_do_not_change_the_gradient(tiny):
    """Two batches that differ only outside the mask give the same gradient with floor 0, and different ones with
    a floor or without the mask (so the test can fail). At the latent level, with a per-pixel denoiser: the VAE's
    encoder and the UNet's convolutions and attention carry every pixel into its neighbours' features, so the real
    background does reach the model as input (as in kohya's and OneTrainer's masked loss); what the mask removes is
    every training signal to reproduce it, which the next test checks on the real UNet."""
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :, :3] = 1  # left 3 latent columns of the first image
    mask[1, :, 2:6, 4:] = 1  # a block of the second
    a, b = latents_pair(mask)
    model = PerPixelDenoiser()
    masked = LossSpec(masked_loss=True)
    batch = {"latent_mask": mask}
    same = zip(grads_of(model, a, masked, tiny, batch_loss_weight(batch, a, masked)),
               grads_of(model, b, masked, tiny, batch_loss_weight(batch, b, masked)))
    for ga, gb in same:
        torch.testing.assert_close(ga, gb, atol=1e-7, rtol=1e-6)
    floored = LossSpec(masked_loss=True, masked_loss_floor=0.1)
    assert not torch.allclose(grads_of(model, a, floored, tiny, batch_loss_weight(batch, a, floored))[0],
                              grads_of(model, b, floored, tiny, batch_loss_weight(batch, b, floored))[0], atol=1e-5)
    plain = LossSpec()
    assert batch_loss_weight(batch, a, plain) is None  # --masked-loss off: the mask is not used
    assert not torch.allclose(grads_of(model, a, plain, tiny, None)[0], grads_of(model, b, plain, tiny, None)[0],
                              atol=1e-5)


def test_real_unet_gets_no_signal_from_the_unmasked_targets(tiny):
    """The tiny UNet, the same noised input, targets that differ only outside the mask: identical UNet gradients."""
    unet = tiny["unet"]
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 1:5, 2:7] = 1
    target_a, target_b = latents_pair(mask)
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    grads = []
    for target in (target_a, target_b):
        unet.zero_grad()
        pred = denoise(unet, x_t, torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=torch.Generator()
                                                                       .manual_seed(4)))
        diffusion.per_sample_loss(pred, target, "mse", weight=loss_weight(mask, 0.0)).mean().backward()
        grads.append([p.grad.clone() for p in unet.parameters() if p.grad is not None])
    assert len(grads[0]) > 10
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, atol=1e-7, rtol=1e-6)


def test_weighted_loss_is_the_weighted_mean_per_sample():
    pred, target = torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    target[:, :, 0, 0], target[:, :, 1, 1] = 2.0, 1.0  # squared errors 4 and 1 in two pixels of four
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.0], [0.0, 1.0]]])[:, None]
    loss = diffusion.per_sample_loss(pred, target, "mse", weight=loss_weight(mask, 0.0))
    torch.testing.assert_close(loss, torch.tensor([4.0, 5 / 4, (0.5 * 4 + 1) / 1.5]))
    torch.testing.assert_close(diffusion.per_sample_loss(pred, target, "mse", weight=torch.ones(3, 1, 2, 2)),
                               diffusion.per_sample_loss(pred, target, "mse"))  # no mask: the plain mean
    floored = diffusion.per_sample_loss(pred, target, "mse", weight=loss_weight(mask, 0.25))
    torch.testing.assert_close(floored[0], torch.tensor((4 + 0.25 * 1) / (1 + 3 * 0.25)))
    zero = diffusion.per_sample_loss(pred, target, "l1", weight=torch.zeros(3, 1, 2, 2))
    assert torch.equal(zero, torch.zeros(3))  # an all-black mask: no loss, no NaN


def test_pixel_masks_average_over_latent_cells():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :6] = 1  # 6 of each 2x2... cells: columns 0-2 full, 8x6 px
    cells = latent_mask(mask, (8, 8))
    assert cells.shape == (1, 1, 8, 8)
    assert cells[0, 0, :4, :3].eq(1).all() and cells[0, 0, 4:].eq(0).all() and cells[0, 0, :, 3:].eq(0).all()
    coarse = latent_mask(mask, (2, 2))  # one cell = 8x8 px, of which 8x6 are masked in
    torch.testing.assert_close(coarse[0, 0], torch.tensor([[0.75, 0.0], [0.0, 0.0]]))
    latents = torch.zeros(1, 4, 2, 2)
    spec = LossSpec(masked_loss=True, masked_loss_floor=0.2)
    torch.testing.assert_close(batch_loss_weight({"mask": mask}, latents, spec),
                               0.2 + 0.8 * coarse)  # pixel masks reach the loss at the latent grid


# --- mask sources -------------------------------------------------------------------------------------------------

W, H = 48, 32  # not square: the resize and the crop both act


def pattern(seed: int) -> Image.Image:
    """Returns an asymmetric "L" pattern (an L-shape plus a block off-centre) that differs by seed."""
    image = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(image)
    draw.rectangle((4 + seed, 3, 12 + seed, 28), fill=255)
    draw.rectangle((4 + seed, 20, 40, 28), fill=255)
    draw.rectangle((30, 4, 44, 10), fill=128)  # a grey block: weight 0.5
    return image


def image_of(mask: Image.Image) -> Image.Image:
    """Returns an RGB picture whose red channel is the mask: after any transform its red is where the mask went."""
    return Image.merge("RGB", (mask, Image.new("L", mask.size, 40), Image.new("L", mask.size, 200)))


def write_sources(root) -> str:
    """A folder with one image per mask source: a sidecar, a mask folder, alpha, and none; returns it."""
    folder, masks = root / "art", root / "masks"
    folder.mkdir()
    masks.mkdir()
    image_of(pattern(0)).save(folder / "a.png")
    pattern(0).save(folder / "a.mask.png")
    image_of(pattern(1)).save(folder / "b.jpg", quality=98)
    pattern(1).save(masks / "b.png")
    black = Image.new("L", (W, H), 0)  # composited on white, green becomes 1 - alpha
    Image.merge("RGBA", (pattern(2), black, black, pattern(2))).save(folder / "c.png")
    image_of(pattern(3)).convert("RGBA").save(folder / "d.png")  # an opaque alpha channel is no mask
    for name in "abcd":
        (folder / f"{name}.txt").write_text("a drawing")
    return str(root)


def red_channel(sample) -> torch.Tensor:
    """Returns where the transform put the mask drawn into the image: its red channel, or for the alpha image c
    (on white) 1 - its green channel; (1, H, W) in [0, 1]."""
    channel = sample["pixel_values"][:2] * 0.5 + 0.5  # (2, H, W)
    return 1 - channel[1:] if sample["key"] == "c" else channel[:1]


@pytest.mark.parametrize("buckets", [False, True])
def test_every_mask_source_follows_random_crops_flips_and_buckets(tmp_path, buckets):
    root = write_sources(tmp_path)
    dataset = open_dataset(os.path.join(root, "art"), resolution=24, center_crop=False, random_flip=True,
                           aspect_buckets=buckets, masks=True, mask_dir=os.path.join(root, "masks"))
    flips = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        samples = {s["key"]: s for s in dataset}
        assert sorted(samples) == ["a", "b", "c", "d"]  # a.mask.png and masks/ are not training images
        assert [bool(samples[k]["has_mask"]) for k in "abcd"] == [True, True, True, False]
        for key in "abc":
            mask, red = samples[key]["mask"], red_channel(samples[key])
            assert mask.shape == red.shape and mask.shape[-2:] == samples[key]["pixel_values"].shape[-2:]
            # bilinear mask vs the bicubic (and for b, JPEG) image: equal but for edges; misaligned: far apart
            error, flipped_error = float((mask - red).abs().mean()), float((mask.flip(-1) - red).abs().mean())
            assert error < 0.05 and flipped_error > 4 * error, (key, epoch, error, flipped_error)
            flips.add(bool(mask[0, :, : mask.shape[-1] // 2].mean() < mask[0, :, mask.shape[-1] // 2:].mean()))
        assert samples["d"]["mask"].eq(1).all()  # no mask: fully masked in
        if buckets:
            assert samples["a"]["mask"].shape[-1] > samples["a"]["mask"].shape[-2]  # a wide bucket
    assert flips == {True, False}  # both orientations were seen


def test_sidecar_takes_precedence_and_masks_off_reads_none(tmp_path):
    root = write_sources(tmp_path)
    pattern(5).save(tmp_path / "masks" / "a.png")  # the sidecar a.mask.png wins over the folder's
    samples = {s["key"]: s for s in open_dataset(os.path.join(root, "art"), resolution=24, masks=True,
                                                  mask_dir=os.path.join(root, "masks"))}
    assert (samples["a"]["mask"] - red_channel(samples["a"])).abs().mean() < 0.03
    os.rename(tmp_path / "masks", tmp_path / "art" / "masks")  # a mask folder inside the image folder
    inside = {s["key"]: s for s in open_dataset(os.path.join(root, "art"), resolution=24, masks=True,
                                                 mask_dir=os.path.join(root, "art", "masks"))}
    assert sorted(inside) == ["a", "b", "c", "d"] and bool(inside["b"]["has_mask"])  # its masks are no images
    plain = list(open_dataset(os.path.join(root, "art"), resolution=24))
    assert len(plain) == 6 and all("mask" not in s for s in plain)  # without --mask-dir, masks/ holds images
    assert is_mask_file("x/a.mask.PNG") and not is_mask_file("mask.png") and not is_mask_file("a.masks.png")
    with pytest.raises(ValueError, match="--mask-dir works with a folder"):
        open_dataset("shapes:4", masks=True, mask_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mask folder"):
        open_dataset(os.path.join(root, "art"), masks=True, mask_dir=str(tmp_path / "nowhere"))


def test_broken_and_mismatched_masks_are_counted_and_skipped(tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    for name in ("good", "broken", "empty", "small"):
        image_of(pattern(0)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text("a drawing")
    pattern(0).save(folder / "good.mask.png")
    (folder / "broken.mask.png").write_bytes(b"not a png at all")
    (folder / "empty.mask.png").write_bytes(b"")
    pattern(0).resize((W // 2, H // 2)).save(folder / "small.mask.png")
    dataset = open_dataset(str(folder), resolution=16, masks=True)
    samples = list(dataset)
    assert [s["key"] for s in samples] == ["good"]
    assert dict(dataset.skips.counts) == {"bad_mask": 2, "mask_size_mismatch": 1}
    assert "mask_size_mismatch" in dataset.skips.report() and "first: small" in dataset.skips.report()


def test_loader_batches_and_latent_cache_keep_masks(tmp_path, tiny):
    from ldm.data import make_dataloader
    from ldm.data.latent_cache import build_latent_cache, cache_key_parts, open_latent_cache

    root = write_sources(tmp_path)
    spec = os.path.join(root, "art")
    batch = next(iter(make_dataloader(open_dataset(spec, resolution=64, masks=True, shuffle=False), batch_size=4)))
    assert batch["key"] == ["a", "b", "c", "d"] and batch["mask"].shape == (4, 1, 64, 64)
    assert batch["has_mask"].tolist() == [True, False, True, False]  # b's mask is in masks/, not given here
    vae, tokenizer = tiny["vae"], tiny["tokenizer"]
    manifest = build_latent_cache(spec, vae, tokenizer, str(tmp_path / "cache"), resolution=64, masks=True)
    assert manifest["masked"] == 2 and manifest["count"] == 4
    cache = open_latent_cache(str(tmp_path / "cache"))
    items = {cache[i]["key"]: cache[i] for i in range(len(cache))}
    expected = latent_mask(batch["mask"], (8, 8))  # (4, 1, 8, 8), keys a, b, c, d
    for i, key in enumerate("abcd"):
        assert items[key]["latent_mask"].shape == (1, 8, 8)
        torch.testing.assert_close(items[key]["latent_mask"], expected[i])
    plain = open_dataset(spec, resolution=64, shuffle=False)
    masked = open_dataset(spec, resolution=64, shuffle=False, masks=True)
    assert "masks" not in plain.transform.settings()  # caches built before masks keep their key
    assert cache_key_parts(plain, vae, tokenizer) != cache_key_parts(masked, vae, tokenizer)


def test_finetune_batches_flip_masks_with_latents():
    from ldm.training.finetune import batches_forever

    samples = []
    for i in range(4):
        mask = torch.zeros(1, 8, 8)
        mask[..., : i + 1] = 1  # asymmetric: left columns
        samples.append({"latent_mean": mask.expand(4, 8, 8).clone(), "latent_logvar": torch.zeros(4, 8, 8),
                        "latent_mask": mask, "caption": f"c{i}"})
    flipped = set()
    batches = batches_forever(samples, 2, seed=0, flip=True)
    for _ in range(12):
        batch = next(batches)
        assert batch["latent_mask"].shape == (2, 1, 8, 8)
        torch.testing.assert_close(batch["latent_mask"][:, 0], batch["latent_mean"][:, 0])
        flipped.add(bool(batch["latent_mask"][0, 0, 0, -1] == 1))
    assert flipped == {True, False}


def test_mask_settings_without_masked_loss_are_refused():
    from ldm.training.finetune_config import FinetuneConfig
    from ldm.training.ldm_config import TrainLDMConfig

    with pytest.raises(ValueError, match="add --masked-loss"):
        FinetuneConfig(model="m", data="d", mask_dir="masks").validate()
    with pytest.raises(ValueError, match="add --masked-loss"):
        TrainLDMConfig(masked_loss_floor=0.1).validate()
    with pytest.raises(ValueError, match="masked_loss_floor"):
        TrainLDMConfig(masked_loss=True, masked_loss_floor=1.5).validate()


# --- the trainers -------------------------------------------------------------------------------------------------

FLOOR = 0.25


def masked_art(folder) -> str:
    """Five pictures of different sizes; four with a sidecar mask whose left half is white; returns the folder."""
    from ldm.data.shapes import SceneObject, render_scene

    folder.mkdir()
    for i, (w, h) in enumerate([(48, 32), (32, 64), (40, 40), (64, 48), (36, 32)]):
        render_scene([SceneObject("circle", "red", "left")], 64, (20 + 30 * i, 20, 30)).resize((w, h)).save(
            folder / f"img{i}.png")
        if i:
            mask = Image.new("L", (w, h), 0)
            mask.paste(255, (0, 0, w // 2, h))
            mask.save(folder / f"img{i}.mask.png")
    return str(folder)


def captured_weights(monkeypatch) -> list:
    """Records the pixel_weight every training loss receives (ldm.training.step.diffusion_loss)."""
    from ldm.training import step

    seen, original = [], step.diffusion_loss

    def spy(*args, **kwargs):
        seen.append(args[8] if len(args) > 8 else kwargs.get("pixel_weight"))
        return original(*args, **kwargs)

    monkeypatch.setattr(step, "diffusion_loss", spy)
    return seen


@pytest.mark.parametrize("preset", ["tiny", pytest.param("sdxl-tiny", marks=pytest.mark.slow)])  # ~8 s each
@pytest.mark.filterwarnings("ignore:finetune. no samples")
def test_finetune_weighs_the_loss_by_each_images_mask(preset, tmp_path, monkeypatch):
    from ldm import Pipeline
    from ldm.training import finetune
    from ldm.training.finetune_config import FinetuneConfig

    model, parts = tmp_path / preset, build_components(preset, seed=0)
    Pipeline(**parts).save_pretrained(model)
    factor = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    seen = captured_weights(monkeypatch)
    cfg = FinetuneConfig(model=str(model), data=masked_art(tmp_path / "art"), out=str(tmp_path / "run"),
                         instance_prompt="sks art", resolution=32, max_steps=3, batch_size=2, random_flip=True,
                         masked_loss=True, masked_loss_floor=FLOOR, validation_every=100, num_validation_samples=1,
                         validation_sample_steps=2, checkpoint_every=0, device="cpu")
    cfg.validate()
    report = finetune.main(cfg)
    assert report["num_masked_images"] == 4 and report["steps"] == 3
    assert len(seen) == 3 and all(w is not None and w.shape[1] == 1 for w in seen)
    images = finetune.read_images(cfg, 32)  # the same crops, with their pixel masks
    expected = [loss_weight(latent_mask(s["mask"], (s["mask"].shape[-2] // factor, s["mask"].shape[-1] // factor)),
                            FLOOR) for s in images]
    expected += [w.flip(-1) for w in expected]  # random_flip flips masks with their latents
    assert sum(float(s["mask"].min()) == 0 for s in images) == 4  # four half-black masks, img0 all white
    for weights in seen:
        for w in weights:
            assert any(torch.allclose(w, e, atol=1e-6) for e in expected if e.shape == w.shape), w


@pytest.mark.parametrize("cache", [pytest.param(True, marks=pytest.mark.slow), False])  # the cache build: ~10 s
def test_ldm_train_reads_masks_from_the_latent_cache_or_the_stream_and_counts_them(tmp_path, monkeypatch, cache):
    from ldm.training import train_ldm
    from ldm.training.ldm_config import TrainLDMConfig

    seen = captured_weights(monkeypatch)
    cfg = TrainLDMConfig(data=masked_art(tmp_path / "art"), resolution=32, model="tiny", max_steps=2, batch_size=2,
                         latent_cache=str(tmp_path / "cache") if cache else "", masked_loss=True,
                         output_dir=str(tmp_path / "run"),
                         validation_every=0, checkpoint_every=0, use_ema=False, report_to="none", val_loss_samples=2,
                         aspect_buckets=True)
    cfg.validate()
    result = train_ldm.main(cfg)
    assert result["masked_images"]["with_mask"] <= result["masked_images"]["images"] <= 5
    assert result["masked_images"]["images"] >= 2 and len(seen) == 2
    for weights in seen:  # floor 0: the masked images weigh their left half only (no flips), img0 everything
        assert weights is not None and weights[..., :, :1].eq(1).all()
        assert all(w.min() < 0.05 or w.eq(1).all() for w in weights)
    assert any(w.min() < 0.05 for weights in seen for w in weights)


# --- what a masked fine-tune learns (slow) --------------------------------------------------------------------------

BACKGROUNDS = [(22, 22, 30), (90, 20, 20), (20, 80, 30), (20, 30, 110), (100, 80, 10), (80, 20, 90), (10, 90, 90),
               (60, 60, 60)]  # the folder's backgrounds: each unlike the others and unlike the base's light grey


def write_masked_folder(folder: str, count: int = 16) -> str:
    """Writes `count` uncaptioned 16 px pictures of one red circle on backgrounds of eight colours, each with a
    sidecar mask of the circle's own pixels (white) around which the background is black."""
    import random

    from PIL import ImageChops

    from ldm.data.shapes import SceneObject, render_scene

    os.makedirs(folder, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        background = BACKGROUNDS[i % len(BACKGROUNDS)]
        obj = SceneObject("circle", "red", "center", dx=rng.uniform(-0.04, 0.04), dy=rng.uniform(-0.04, 0.04))
        image = render_scene([obj], 16, background)
        image.save(os.path.join(folder, f"art-{i:03d}.png"))
        shape = ImageChops.difference(image, Image.new("RGB", image.size, background)).convert("L")
        shape.point(lambda v: 255 if v > 8 else 0).save(os.path.join(folder, f"art-{i:03d}.mask.png"))
    return folder


def background_pixels(images: torch.Tensor) -> torch.Tensor:
    """Returns the 3-pixel frame of 16 px images (N, 3, 16, 16): (N, 3, 156), where no circle ever reaches."""
    frame = torch.ones(images.shape[-2:], dtype=torch.bool)
    frame[3:-3, 3:-3] = False
    return images[..., frame]


@torch.no_grad()
def region_losses(pipe, folder: str, prompt: str) -> tuple[float, float]:
    """Returns the denoising MSE (fixed noise, 5 timesteps) of the folder's images inside and outside their masks."""
    from ldm.data.transforms import to_tensor

    names = sorted(f for f in os.listdir(folder) if f.endswith(".png") and not f.endswith(".mask.png"))
    pixels = torch.stack([to_tensor(Image.open(os.path.join(folder, f))) for f in names])  # (N, 3, 16, 16)
    masks = torch.stack([to_tensor(Image.open(os.path.join(folder, f[:-4] + ".mask.png")).convert("RGB"))[:1]
                         for f in names]) * 0.5 + 0.5  # (N, 1, 16, 16)
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor  # (N, 4, 8, 8)
    cells = latent_mask(masks, tuple(latents.shape[-2:]))  # (N, 1, 8, 8)
    ids = pipe.tokenizer([prompt] * len(names), padding="max_length", max_length=77, return_tensors="pt").input_ids
    context = pipe.text_encoder(ids)[0]
    objective, generator = objective_for(pipe.scheduler), torch.Generator().manual_seed(0)
    inside = outside = 0.0
    for step in (100, 300, 500, 700, 900):
        t = torch.full((len(names),), step)
        noise = torch.randn(latents.shape, generator=generator)
        pred = denoise(pipe.unet, objective.noised(latents, noise, t), objective.model_time(t), context)
        target = objective.target(latents, noise, t)
        inside += float(diffusion.per_sample_loss(pred, target, "mse", weight=cells).mean()) / 5
        outside += float(diffusion.per_sample_loss(pred, target, "mse", weight=1 - cells).mean()) / 5
    return inside, outside


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_masked_finetune_keeps_the_base_backgrounds_and_learns_inside_the_mask(base_model, tmp_path_factory):
    """LoRA on pictures whose backgrounds differ from each other, masks around the circle: the masked run's samples
    keep the base model's backgrounds (mean colour distance of the frame pixels to the base's samples, same seeds)
    and the unmasked run's do not; the masked run lowers the denoising loss inside the masks, while only the
    unmasked run learns the backgrounds' (the loss outside them). The base: the 16 px model of test_finetune_e2e."""
    from test_finetune_e2e import sample

    from ldm import Pipeline
    from ldm.training.finetune import main
    from ldm.training.finetune_config import FinetuneConfig

    base = base_model
    root = tmp_path_factory.mktemp("masked")
    folder, prompt = write_masked_folder(str(root / "art")), "a painting in the style of sks"
    base_pipe = Pipeline.from_pretrained(base)
    base_background = background_pixels(sample(base_pipe, prompt))
    base_inside, base_outside = region_losses(base_pipe, folder, prompt)
    results = {}
    for masked in (False, True):
        report = main(FinetuneConfig(model=base, data=folder, out=str(root / f"masked-{masked}"), instance_prompt=prompt,
                                     masked_loss=masked, max_steps=300, learning_rate=2e-3, num_validation_samples=1,
                                     validation_sample_steps=5, validation_every=300, device="cpu"))
        tuned = Pipeline.from_pretrained(base)
        tuned.load_lora_weights(report["outputs"]["lora"])
        distance = float((background_pixels(sample(tuned, prompt)) - base_background).abs().mean())
        results[masked] = (distance, *region_losses(tuned, folder, prompt))
        assert report["num_masked_images"] == (16 if masked else None)
    print(f"background distance to the base's samples: unmasked {results[False][0]:.3f}, masked {results[True][0]:.3f}; "
          f"loss inside the masks: base {base_inside:.4f}, unmasked {results[False][1]:.4f}, masked "
          f"{results[True][1]:.4f}; outside: base {base_outside:.4f}, unmasked {results[False][2]:.4f}, masked "
          f"{results[True][2]:.4f}")
    assert results[True][0] < 0.5 * results[False][0]
    assert results[True][1] < 0.8 * base_inside  # the masked run learns the circle's pixels
    assert results[False][2] < results[True][2]  # only the unmasked run learns the backgrounds


def test_cache_latents_command_caches_masks(tiny_folder, tmp_path, capsys):
    from ldm.cli import main as ldm

    root = write_sources(tmp_path)
    assert ldm(["cache-latents", os.path.join(root, "art"), "--vae", tiny_folder, "--out", str(tmp_path / "cache"),
                "--masked-loss", "--mask-dir", os.path.join(root, "masks"), "--device", "cpu"]) == 0
    assert "4 samples, 3 with a loss mask" in capsys.readouterr().out
    from ldm.data.latent_cache import open_latent_cache

    items = {item["key"]: item for item in open_latent_cache(str(tmp_path / "cache"))}
    assert items["b"]["has_mask"] and not items["d"]["has_mask"] and items["d"]["latent_mask"].eq(1).all()
