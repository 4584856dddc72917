"""End to end on the CPU: a small base model trained here on light-background shapes, then fine-tuned with LoRA on
a folder of uncaptioned dark-background pictures (a style the base never saw) with an instance prompt.

Runs single-threaded: on a shared 2-core machine one thread is many times faster than two for these sizes.
"""
import os
import random

import pytest
import torch

from ldm.models.presets import ModelSpec, _clip_text, _latent_scheduler, build_components

INSTANCE = "a painting in the style of sks"
OTHER = "a red circle on the left"
DARK = (22, 22, 30)


def micro_spec() -> ModelSpec:
    """A 16 px model (VAE factor 2 -> 4x8x8 latents, 0.36 M UNet parameters) that learns shapes in a minute."""
    return ModelSpec(
        name="micro", resolution=16,
        unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                  norm_num_groups=8),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                 block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16),
        text_encoder=_clip_text(hidden=32, layers=2, heads=4, intermediate=64), scheduler=_latent_scheduler(),
        token_embedding_std=1.0)  # distinct tokens through the frozen random encoder: "sks" reads unlike the rest


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # every test here trains hundreds of steps


def train_vae(vae, steps: int = 300) -> None:
    """Trains the autoencoder on shapes with light and dark backgrounds (a general VAE, as SD's saw everything)."""
    from ldm.data import ShapesDataset
    from ldm.data.shapes import render_scene
    from ldm.data.transforms import to_tensor

    shapes = ShapesDataset(256, resolution=16, seed=1)
    images = []
    for i in range(256):
        objects, background, _ = shapes.scene(i)
        images.append(to_tensor(render_scene(objects, 16, background if i % 2 else DARK)))
    x = torch.stack(images)  # (256, 3, 16, 16)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = x[torch.randint(0, len(x), (32,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        loss = torch.nn.functional.mse_loss(vae.decode(posterior.sample(generator)).sample, batch)
        loss = loss + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval()


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """Returns a base pipeline folder: micro VAE trained above, UNet trained by `finetune --method full` on shapes."""
    from ldm import Pipeline
    from ldm.training.finetune import main
    from ldm.training.finetune_config import FinetuneConfig

    root = tmp_path_factory.mktemp("base")
    parts = build_components(micro_spec(), seed=0)
    train_vae(parts["vae"])
    Pipeline(**parts).save_pretrained(root / "init")
    report = main(FinetuneConfig(model=str(root / "init"), data="shapes:400@16", out=str(root / "run"),
                                 method="full", learning_rate=1e-3, max_steps=500, batch_size=16,
                                 caption_dropout=0.1, num_validation_samples=1, validation_sample_steps=5,
                                 validation_every=500, device="cpu"))
    return report["outputs"]["pipeline"]


def write_dark_folder(folder: str, count: int, seed: int = 0, resolution: int = 16) -> str:
    """Writes `count` uncaptioned PNGs: coloured shapes on a dark background."""
    from ldm.data.shapes import COLOURS, POSITIONS, SHAPES, SceneObject, render_scene

    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        obj = SceneObject(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(POSITIONS))
        render_scene([obj], resolution, DARK).save(os.path.join(folder, f"art-{i:03d}.png"))
    return folder


def border_brightness(images: torch.Tensor) -> float:
    """Returns the mean brightness in [0, 1] of the 2-pixel border (the background) of images (N, 3, H, W) in [0, 1]."""
    mask = torch.ones(images.shape[-2:], dtype=torch.bool)
    mask[2:-2, 2:-2] = False
    return float(images[..., mask].mean())


def sample(pipe, prompt: str, n: int = 8, **kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(100 + i) for i in range(n)]
    return pipe([prompt] * n, generator=generators, num_inference_steps=20, guidance_scale=4.0, output_type="pt",
                **kwargs).images  # (n, 3, 16, 16) in [0, 1]


@pytest.fixture(scope="module")
def lora_run(base_model, tmp_path_factory):
    """Fine-tunes with every default on 20 uncaptioned images and an instance prompt; returns (report, out)."""
    from ldm.training.finetune import main
    from ldm.training.finetune_config import FinetuneConfig

    root = tmp_path_factory.mktemp("lora")
    folder = write_dark_folder(str(root / "art"), 20)
    out = str(root / "run")
    report = main(FinetuneConfig(model=base_model, data=folder, out=out, instance_prompt=INSTANCE,
                                 export_webui=True, device="cpu"))
    return report, out, folder


def test_lora_moves_instance_prompt_to_the_folder_style(base_model, lora_run):
    from ldm import Pipeline
    from ldm.data.transforms import to_tensor
    from PIL import Image

    report, out, folder = lora_run
    target = border_brightness(torch.stack([to_tensor(Image.open(os.path.join(folder, f)))
                                            for f in sorted(os.listdir(folder))]) * 0.5 + 0.5)
    base = Pipeline.from_pretrained(base_model)
    before, other_before = border_brightness(sample(base, INSTANCE)), border_brightness(sample(base, OTHER))
    tuned = Pipeline.from_pretrained(base_model)
    tuned.load_lora_weights(report["outputs"]["lora"])
    after, other_after = border_brightness(sample(tuned, INSTANCE)), border_brightness(sample(tuned, OTHER))
    closed = (before - after) / (before - target)
    print(f"border brightness: folder {target:.3f}; instance prompt {before:.3f} -> {after:.3f} (gap closed "
          f"{closed:.0%}); '{OTHER}' {other_before:.3f} -> {other_after:.3f}; steps {report['steps']}")
    assert closed >= 0.5
    # scale 0 is the base model exactly
    zero = sample(tuned, INSTANCE, cross_attention_kwargs={"scale": 0.0})
    assert torch.equal(zero, sample(base, INSTANCE))


def test_lora_on_the_demo_model_leaves_other_prompts_alone(short_demo, tmp_path):
    """Language drift, on the (shortened) demo model: with prior preservation on a class prompt the base draws
    well, the instance prompt takes the folder's dark style and prompts without "sks" keep their light
    background. (On the 16 px base above, without prior preservation, every prompt turns dark.)"""
    from PIL import Image

    from ldm import Pipeline
    from ldm.data.transforms import to_tensor
    from ldm.training.finetune import main
    from ldm.training.finetune_config import FinetuneConfig

    base_model = short_demo[1]["pipeline"]
    folder = write_dark_folder(str(tmp_path / "art"), 20, resolution=32)
    target = border_brightness(torch.stack([to_tensor(Image.open(os.path.join(folder, f)))
                                            for f in sorted(os.listdir(folder))]) * 0.5 + 0.5)
    report = main(FinetuneConfig(model=base_model, data=folder, out=str(tmp_path / "run"), instance_prompt=INSTANCE,
                                 class_prompt="a green triangle in the center", learning_rate=1e-3, device="cpu"))
    base, tuned = Pipeline.from_pretrained(base_model), Pipeline.from_pretrained(base_model)
    tuned.load_lora_weights(report["outputs"]["lora"])
    before, after = border_brightness(sample(base, INSTANCE)), border_brightness(sample(tuned, INSTANCE))
    others = ["a red circle on the left", "a blue square at the top"]
    drift = [border_brightness(sample(tuned, p)) - border_brightness(sample(base, p)) for p in others]
    closed = (before - after) / (before - target)
    print(f"demo base: instance prompt {before:.3f} -> {after:.3f} (folder {target:.3f}, gap closed {closed:.0%}); "
          f"other prompts moved {[round(d, 3) for d in drift]}")
    # Learning rate 1e-3: since the fixture's VAE also learns photographs, 3e-4 closed only 11% of the gap in
    # the default steps (docs/src/guides/finetune.md, for the measured moves)
    assert closed >= 0.5
    assert sum(abs(d) for d in drift) / len(drift) <= 0.3 * (before - after)


def test_twenty_images_with_defaults_do_not_warn(lora_run):
    report, out, _ = lora_run
    last = report["history"][-1]
    print("near-copy ratios", [round(r, 2) for r in last["memorization"]["ratios"]], "gap", last["gap"])
    assert report["num_train_images"] == 18 and report["num_heldout_images"] == 2
    assert not report["memorization_warning"]
    assert set(last["val_heldout"]) == {"val_loss"} | {f"val_loss_bin{b}" for b in range(5)}
    assert os.path.exists(os.path.join(out, "report.json")) and os.path.exists(last["samples"])


def test_three_images_many_steps_warn_and_stop_early(base_model, tmp_path):
    from ldm.training.finetune import main
    from ldm.training.finetune_config import FinetuneConfig

    folder = write_dark_folder(str(tmp_path / "art"), 3, seed=5)
    report = main(FinetuneConfig(model=base_model, data=folder, out=str(tmp_path / "run"), instance_prompt=INSTANCE,
                                 max_steps=1200, learning_rate=1e-3, lora_rank=16, batch_size=2, validation_every=200,
                                 early_stop_on_memorization=True, device="cpu"))
    ratios = [round(min(r["memorization"]["ratios"]), 2) for r in report["history"]]
    print("min near-copy ratio per check", ratios, "stopped at", report["steps"])
    assert report["memorization_warning"] and "MEMORISATION WARNING" in report["warnings"][0]
    assert report["stopped_by"] == "memorization" and report["steps"] < 1200


def colour_histogram(images: torch.Tensor, bins: int = 4) -> torch.Tensor:
    """Returns the joint RGB histogram (bins^3,) of images (N, 3, H, W) in [0, 1], summing to 1."""
    index = (images.clamp(0, 1) * bins).long().clamp(max=bins - 1)  # (N, 3, H, W) bin per channel
    flat = (index[:, 0] * bins + index[:, 1]) * bins + index[:, 2]
    return torch.bincount(flat.flatten(), minlength=bins ** 3).float() / flat.numel()


def histogram_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Returns the total-variation distance between the colour histograms of two image sets: 0 same, 1 disjoint."""
    return 0.5 * float((colour_histogram(a) - colour_histogram(b)).abs().sum())


def test_lora_on_the_demo_model_learns_a_folder_of_photographs(short_demo, tmp_path):
    """A folder of real photographs (crops of one the demo's VAE never saw) fine-tuned into the demo model: the
    instance prompt's images move toward the folder's colours (histogram distance), shapes prompts barely."""
    from PIL import Image

    from ldm import Pipeline
    from ldm.data.photos import write_photo_folder
    from ldm.data.transforms import to_tensor
    from ldm.training.finetune import main
    from ldm.training.finetune_config import FinetuneConfig

    base_model, instance = short_demo[1]["pipeline"], "a photo in the style of sks"
    paths = write_photo_folder(str(tmp_path / "photos"), 20, resolution=32)
    folder = torch.stack([to_tensor(Image.open(p)) for p in paths]) * 0.5 + 0.5  # (20, 3, 32, 32) in [0, 1]
    report = main(FinetuneConfig(model=base_model, data=str(tmp_path / "photos"), out=str(tmp_path / "run"),
                                 instance_prompt=instance, class_prompt="a green triangle in the center",
                                 learning_rate=3e-4, device="cpu"))
    base, tuned = Pipeline.from_pretrained(base_model), Pipeline.from_pretrained(base_model)
    tuned.load_lora_weights(report["outputs"]["lora"])
    before = histogram_distance(sample(base, instance), folder)
    after = histogram_distance(sample(tuned, instance), folder)
    others = ["a red circle on the left", "a blue square at the top", "a yellow circle on the right",
              "a purple triangle at the bottom"]
    toward = [histogram_distance(sample(base, p), folder) - histogram_distance(sample(tuned, p), folder)
              for p in others]  # how far each other prompt moved toward the folder's colours
    print(f"photo folder: instance prompt's histogram distance to the folder {before:.3f} -> {after:.3f}; other "
          f"prompts moved toward it by {[round(d, 3) for d in toward]}")
    # The 700-step VAE encodes the photographs' colours only roughly, so the instance prompt gets their palette,
    # not their detail (docs/src/guides/finetune.md). Both bounds leave a margin over the spread measured over two demo seeds
    # times two fine-tuning seeds, and over a run of this test on another 2-core machine (its floating point moves
    # the trajectory as a seed does): the drift of the other prompts depends on the demo model, so it is bounded on
    # the histogram distance's own scale (0 same colours, 1 disjoint) rather than as a fraction of the instance
    # prompt's move. The figures are in the docs (Fine-tune).
    assert after <= 0.9 * before
    assert sum(toward) / len(toward) <= 0.2
