"""SDXL training (issue 32, item 3): micro-conditioning from each image's real size and crop, both text encoders and
the pooled embedding, `ldm train --model sdxl-tiny` and `ldm finetune` (LoRA, full) on an SDXL folder."""
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.transforms import ImageTransform, crop_box, flipped_crop_top_left
from ldm.models import sdxl
from ldm.training import step, train_ldm
from ldm.training.ldm_config import TrainLDMConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    """An sdxl-tiny pipeline folder (random weights) saved by our Pipeline."""
    from ldm import Pipeline
    from ldm.models.presets import build_components

    path = tmp_path_factory.mktemp("models") / "sdxl-tiny"
    Pipeline(**build_components("sdxl-tiny", seed=0)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """Five pictures of different sizes and aspects (4 train, 1 held out), uncaptioned."""
    from ldm.data.shapes import SceneObject, render_scene

    folder = tmp_path_factory.mktemp("art")
    for i, (w, h) in enumerate([(48, 32), (32, 64), (40, 40), (64, 48), (36, 32)]):
        scene = render_scene([SceneObject("circle", "red", "left")], 64, (20 + 30 * i, 20, 30))
        scene.resize((w, h)).save(folder / f"img{i}.png")
    return str(folder)


def picture(width: int, height: int, seed: int) -> dict:
    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return {"image": Image.fromarray(pixels.numpy()), "caption": f"picture {seed}", "key": f"k{seed}"}


# --- micro-conditioning -------------------------------------------------------------------------------------------

def test_transform_records_the_original_size_and_the_random_crop():
    # 48x32 at 32 px: no resize, the crop slides along the width; 32x64: along the height; 96x64 halves first
    for (w, h), seed in [((48, 32), 0), ((32, 64), 1), ((96, 64), 2)]:
        out = ImageTransform(32, center_crop=False)(picture(w, h, seed), random.Random(seed))
        rng = random.Random(seed)  # the draws resize_and_crop makes: left, then top, in the resized image
        new_w, new_h = (w * 32 // min(w, h), h * 32 // min(w, h))
        left, top = rng.randint(0, new_w - 32), rng.randint(0, new_h - 32)
        assert out["original_size"].tolist() == [h, w] and out["crop_top_left"].tolist() == [top, left]
        assert out["pixel_values"].shape == (3, 32, 32)


def test_a_flipped_crop_is_measured_in_the_flipped_image():
    # diffusers' train_text_to_image_sdxl.py flips and then crops: its left is width - left - crop width of ours
    sample = picture(48, 32, 3)
    plain_of = lambda s: ImageTransform(32, center_crop=False)(sample, random.Random(s))  # noqa: E731
    flipped_of = lambda s: ImageTransform(32, False, random_flip=True)(sample, random.Random(s))  # noqa: E731
    seed = next(s for s in range(50) if not torch.equal(plain_of(s)["pixel_values"], flipped_of(s)["pixel_values"])
                and plain_of(s)["crop_top_left"][1] not in (0, 8, 16))
    plain, flipped = plain_of(seed), flipped_of(seed)
    left = int(plain["crop_top_left"][1])
    assert flipped["crop_top_left"].tolist() == [0, 48 - left - 32]
    assert torch.equal(flipped["pixel_values"], plain["pixel_values"].flip(-1))
    # the flipped image's crop is the same pixels as the crop at that left of the flipped picture
    mirrored = sample["image"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    box = mirrored.crop((48 - left - 32, 0, 48 - left, 32))
    assert torch.equal(ImageTransform(32)({**sample, "image": box}, random.Random(0))["pixel_values"],
                       flipped["pixel_values"])
    assert flipped_crop_top_left((5, 7), (64, 96), (32, 32)) == (5, 48 - 7 - 32)  # 96x64 resized to 48x32 first


def spy_denoise(monkeypatch) -> list:
    """Records the (pooled text, time_ids) that every training denoiser call passes to the UNet."""
    seen, original = [], step.denoise

    def denoise(model, x, t, context, pooled=None, time_ids=None, **kwargs):
        seen.append((context.shape, None if pooled is None else pooled.shape, time_ids))
        return original(model, x, t, context, pooled, time_ids, **kwargs)

    monkeypatch.setattr(step, "denoise", denoise)
    return seen


def sdxl_config(tmp_path, **overrides) -> TrainLDMConfig:
    base = dict(model="sdxl-tiny", data="shapes:48@32", resolution=32, batch_size=8, max_steps=12, learning_rate=2e-3,
                lr_warmup_steps=0, output_dir=str(tmp_path / "run"), checkpoint_every=1000, validation_every=1000,
                num_validation_prompts=0, val_loss_samples=4, report_to="none", log_every=1, use_ema=False)
    cfg = TrainLDMConfig(**{**base, **overrides})
    cfg.validate()
    return cfg


def test_each_images_size_and_crop_reach_the_unets_time_ids_in_training(tmp_path, monkeypatch):
    sizes = [(48, 32), (32, 64)]  # (w, h): random crops along the width, then along the height
    data = [ImageTransform(32, center_crop=False)(picture(w, h, i), random.Random(100 + i))
            for i, (w, h) in enumerate(sizes)]
    crops = [d["crop_top_left"].tolist() for d in data]
    assert crops[0][1] > 0 and crops[1][0] > 0, crops  # real offsets, not (0, 0)
    seen = spy_denoise(monkeypatch)
    train_ldm.main(sdxl_config(tmp_path, max_steps=1, batch_size=2, val_loss_samples=2), dataset=data)
    context_shape, pooled_shape, time_ids = seen[0]  # the first training step (validation comes at the end)
    assert context_shape == (2, 77, 64) and pooled_shape == (2, 32)  # 32 + 32 channels of both encoders; pooled 32
    expected = {(32.0, 48.0, *map(float, crops[0]), 32.0, 32.0), (64.0, 32.0, *map(float, crops[1]), 32.0, 32.0)}
    assert {tuple(row) for row in time_ids.tolist()} == expected  # batch order is the stream's shuffle


def test_latent_cache_keeps_size_and_crop(tmp_path, art):
    from ldm.data.latent_cache import build_latent_cache, open_latent_cache
    from ldm.models.presets import build_vae, get_spec
    from ldm.models.tokenizer import build_clip_tokenizer

    build_latent_cache(art, build_vae(get_spec("sdxl-tiny")), build_clip_tokenizer(), str(tmp_path / "cache"),
                       resolution=32, center_crop=False, caption="art")
    items = {os.path.basename(item["key"]).split(".")[0]: item for item in open_latent_cache(str(tmp_path / "cache"))}
    assert items["img1"]["original_size"].tolist() == [64, 32] and items["img3"]["original_size"].tolist() == [48, 64]
    assert items["img0"]["crop_top_left"][0] == 0 and 0 <= items["img0"]["crop_top_left"][1] <= 16
    assert items["img2"]["crop_top_left"].tolist() == [0, 0]  # 40x40 -> 32x32: nothing cropped


def test_ldm_train_from_a_latent_cache_conditions_on_the_cached_sizes_and_crops(tmp_path, art, monkeypatch):
    from ldm.data.latent_cache import open_latent_cache

    seen = spy_denoise(monkeypatch)
    cfg = sdxl_config(tmp_path, data=art, latent_cache=str(tmp_path / "cache"), center_crop=False, max_steps=2,
                      batch_size=2, val_loss_samples=2)
    train_ldm.main(cfg)
    cached = {(*item["original_size"].tolist(), *item["crop_top_left"].tolist(), 32, 32)
              for item in open_latent_cache(str(tmp_path / "cache"))}
    assert {c[:2] for c in cached} == {(32, 48), (64, 32), (40, 40), (48, 64), (32, 36)}  # (h, w) of the files
    assert any(c[2] or c[3] for c in cached)  # random crops off the corner
    used = {tuple(int(v) for v in row) for _, _, ids in seen[:2] for row in ids.tolist()}  # the 2 training steps
    assert len(used) == 4 and used <= cached


# --- text ---------------------------------------------------------------------------------------------------------

def test_text_embedder_reads_both_encoders_and_caches_the_pooled_one():
    from ldm.models.presets import build_components

    parts = build_components("sdxl-tiny", seed=0)
    args = (parts["text_encoder"], parts["tokenizer"])
    cached = step.TextEmbedder(*args, True, parts["text_encoder_2"], parts["tokenizer_2"])
    plain = step.TextEmbedder(*args, False, parts["text_encoder_2"], parts["tokenizer_2"])
    captions = ["a red circle", "", "a red circle"]  # "": a dropped caption, encoded by both encoders
    with torch.no_grad():
        context, pooled = plain.encode(captions, "cpu")
        ids = [tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
               for tok in (parts["tokenizer"], parts["tokenizer_2"])]
        want_context, want_pooled = sdxl.encode_text(parts["text_encoder"], parts["text_encoder_2"], *ids)
        again = cached.encode(captions, "cpu")
    assert context.shape == (3, 77, 64) and pooled.shape == (3, 32)
    assert torch.equal(context, want_context) and torch.equal(pooled, want_pooled)
    assert torch.allclose(again[0], context, atol=1e-6) and torch.allclose(again[1], pooled, atol=1e-6)
    assert set(cached.cache) == {"a red circle", ""} and not torch.equal(pooled[0], pooled[1])


# --- ldm train ----------------------------------------------------------------------------------------------------

def test_ldm_train_sdxl_tiny_lowers_held_out_validation_loss_and_saves_an_sdxl_folder(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from ldm.data import ShapesDataset

    held_out = [ImageTransform(32)(ShapesDataset(4, resolution=32, seed=7)[i], random.Random(i)) for i in range(4)]
    result = train_ldm.main(sdxl_config(tmp_path, validation_every=1), val_dataset=held_out)
    losses = [v["val_loss"] for v in result["val"]]  # after steps 1..12, on 4 scenes the run never trains on
    assert len(losses) == 12 and max(losses[-3:]) < 0.7 * losses[0], losses
    folder = os.path.join(result["checkpoint"], "pipeline")
    assert {"text_encoder_2", "tokenizer_2"} <= set(os.listdir(folder))
    theirs = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    assert theirs.unet.config.addition_embed_type == "text_time"


def test_ldm_train_sdxl_with_validation_prompts_runs_whether_or_not_the_pipeline_samples_sdxl(tmp_path):
    result = train_ldm.main(sdxl_config(tmp_path, max_steps=2, validation_every=2, num_validation_prompts=2,
                                        validation_steps=2))
    assert result["step"] == 2 and result["val"][0]["prompts"] and result["checkpoint"]


def test_ldm_train_keeps_sdxls_text_encoders_frozen(tmp_path):
    with pytest.raises(ValueError, match="keeps SDXL's two text encoders frozen"):
        train_ldm.build_models(sdxl_config(tmp_path, train_text_encoder=True))


# --- ldm finetune -------------------------------------------------------------------------------------------------

def finetune_run(folder, art, out, **overrides) -> dict:
    from ldm.training import finetune
    from ldm.training.finetune_config import FinetuneConfig

    base = dict(model=folder, data=art, out=str(out), instance_prompt="sks art", resolution=32, max_steps=4,
                batch_size=2, learning_rate=1e-2, lr_warmup_steps=1, validation_every=100, num_validation_samples=1,
                validation_sample_steps=2, checkpoint_every=0, device="cpu")
    cfg = FinetuneConfig(**{**base, **overrides})
    cfg.validate()
    return finetune.main(cfg)


def sdxl_outputs(pipe, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (context, pooled, UNet prediction) of a pipeline's modules on fixed inputs: what a LoRA changes."""
    from ldm.models.denoiser import denoise

    ids = [tok(["sks art"], padding="max_length", max_length=77, return_tensors="pt").input_ids
           for tok in (pipe.tokenizer, pipe.tokenizer_2)]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 4, 4, generator=generator)
    with torch.no_grad():
        context, pooled = sdxl.encode_text(pipe.text_encoder, pipe.text_encoder_2, *ids)
        ids6 = sdxl.time_ids((48, 32), (0, 8), (32, 32))[None]  # (1, 6)
        return context, pooled, denoise(pipe.unet, x, torch.tensor([500]), context, pooled, ids6)


def test_finetune_sdxl_lora_on_both_encoders_loads_in_diffusers_and_kohya_names(sdxl_folder, art, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from ldm import Pipeline

    report = finetune_run(sdxl_folder, art, tmp_path, train_text_encoder=True, random_flip=True, caption_dropout=0.2,
                          export_webui=True)
    assert report["steps"] == 4 and report["num_train_images"] == 4 and report["outputs"]["lora"]
    lora = load_file(report["outputs"]["lora"])
    assert {k.split(".")[0] for k in lora} == {"unet", "text_encoder", "text_encoder_2"}
    kohya = load_file(report["outputs"]["webui"])
    assert {k.split("_")[1] for k in kohya if k.startswith("lora_")} == {"unet", "te1", "te2"}
    theirs = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, local_files_only=True)
    base = sdxl_outputs(theirs)
    theirs.load_lora_weights(str(tmp_path))
    ours = Pipeline.from_pretrained(sdxl_folder)
    ours.load_lora_weights(str(tmp_path))
    for mine, diffusers_, before in zip(sdxl_outputs(ours), sdxl_outputs(theirs), base):
        assert torch.allclose(mine, diffusers_, atol=1e-4)  # the same weights in both loaders
        assert (mine - before).abs().max() > 1e-3  # and the LoRA changed each of the three modules
    kohya_pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, local_files_only=True)
    kohya_pipe.load_lora_weights(report["outputs"]["webui"])  # the web-UI file: the same adapters
    for mine, from_kohya in zip(sdxl_outputs(ours), sdxl_outputs(kohya_pipe)):
        assert torch.allclose(mine, from_kohya, atol=1e-4)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    call = dict(prompt="sks art, a red circle", num_inference_steps=3, guidance_scale=5.0, output_type="np")
    ours.set_progress_bar_config(disable=True)
    theirs.set_progress_bar_config(disable=True)
    mine, diffusers_ = ours(**call, latents=latents).images, theirs(**call, latents=latents).images
    assert np.abs(mine - diffusers_).max() < 1e-4  # the same images from the fine-tuned LoRA in both pipelines


def test_finetune_sdxl_full_saves_an_sdxl_pipeline_folder(sdxl_folder, art, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    report = finetune_run(sdxl_folder, art, tmp_path, method="full", learning_rate=1e-3, max_steps=2)
    folder = report["outputs"]["pipeline"]
    trained = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    base = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, local_files_only=True)
    after, before = sdxl_outputs(trained), sdxl_outputs(base)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])  # encoders frozen by default
    assert (after[2] - before[2]).abs().max() > 1e-3  # the UNet trained


@pytest.mark.slow
def test_finetune_sdxl_resume_reproduces_the_uninterrupted_run(sdxl_folder, art, tmp_path):
    from safetensors.torch import load_file

    common = dict(random_flip=True, caption_dropout=0.3, train_text_encoder=True, validation_every=3,
                  checkpoint_every=3)
    straight = finetune_run(sdxl_folder, art, tmp_path / "a", max_steps=6, **common)
    finetune_run(sdxl_folder, art, tmp_path / "b", max_steps=3, **common)
    resumed = finetune_run(sdxl_folder, art, tmp_path / "b", max_steps=6, resume="latest", **common)
    for i in (4, 5, 6):
        assert abs(resumed["losses"][i] - straight["losses"][i]) <= 1e-6
    a, b = (load_file(tmp_path / name / "pytorch_lora_weights.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
