"""Validation prompts of `ldm train`: by default captions of the user's own validation images, fixed by seed."""
import os

import pytest
from PIL import Image

from ldm.training import train_ldm
from ldm.training.config import parse_config
from ldm.training.ldm_config import TrainLDMConfig
from ldm.training.validation import draw_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PETS = ["a photo of a cat", "a photo of a dog", "a photo of a hamster", "a photo of a parrot",
        "a photo of a goldfish", "a photo of a rabbit"]


def write_pet_folder(folder) -> list[str]:
    """Writes 8 images with NAME.txt captions (two captions twice); returns the captions in key order."""
    folder.mkdir()
    captions = PETS + PETS[:2]
    for i, caption in enumerate(captions):
        Image.new("RGB", (32, 32), (30 * i, 100, 200 - 20 * i)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(caption)
    return captions


def pet_run(tmp_path, name, **overrides):
    cfg = TrainLDMConfig(**{**dict(model="tiny", data=str(tmp_path / "pets"), resolution=32, batch_size=4,
                                   max_steps=1, lr_warmup_steps=0, output_dir=str(tmp_path / name),
                                   checkpoint_every=1000, validation_steps=2, val_loss_samples=8,
                                   report_to="none", use_ema=False), **overrides})
    cfg.validate()
    return train_ldm.main(cfg)


def test_draw_prompts_is_fixed_by_seed_distinct_and_skips_empty_captions():
    captions = [f"caption {i}" for i in range(20)] + ["caption 3", "", "  "]
    picks = {seed: draw_prompts(captions, 4, seed) for seed in range(6)}
    assert all(draw_prompts(captions, 4, seed) == picks[seed] for seed in picks)  # the same seed, the same picks
    assert len({tuple(p) for p in picks.values()}) > 1  # another seed, other captions
    assert all(len(set(p)) == 4 and set(p) <= set(captions[:20]) for p in picks.values())
    assert draw_prompts(["a", "b", "a", ""], 4, 0) == ["a", "b"]  # fewer distinct captions than asked: all


def test_default_grid_prompts_are_the_folders_own_captions_and_explicit_ones_win(tmp_path):
    captions = write_pet_folder(tmp_path / "pets")
    result = pet_run(tmp_path, "default")
    written = (tmp_path / "default" / "samples" / "prompts.txt").read_text().splitlines()
    assert len(written) == 4 and set(written) <= set(PETS)
    # drawn by the seed from the validation images' captions (the folder's first 8, by key)
    assert written == draw_prompts(captions, 4, seed=0) == result["val"][-1]["prompts"]
    assert (tmp_path / "default" / "samples" / "step-00000001.png").is_file()
    explicit = pet_run(tmp_path, "explicit", validation_prompts=["a red circle on the left"])
    assert (tmp_path / "explicit" / "samples" / "prompts.txt").read_text().splitlines() == \
        ["a red circle on the left"] == explicit["val"][-1]["prompts"]


def test_no_grid_when_asked_for_none(tmp_path):
    write_pet_folder(tmp_path / "pets")
    result = pet_run(tmp_path, "none", num_validation_prompts=0)
    assert result["val"][-1]["prompts"] == [] and not (tmp_path / "none" / "samples").exists()
    # 0 turns the grid off even where the config lists prompts (configs/sd15.yaml does)
    result = pet_run(tmp_path, "listed", num_validation_prompts=0, validation_prompts=["a cat"])
    assert result["val"][-1]["prompts"] == [] and not (tmp_path / "listed" / "samples").exists()


def test_empty_prompt_list_passes_through_yaml_and_flags(tmp_path):
    assert TrainLDMConfig().validation_prompts == [] and TrainLDMConfig().num_validation_prompts == 4
    (tmp_path / "c.yaml").write_text("validation_prompts: []\nnum_validation_prompts: 2\n")
    cfg = parse_config(TrainLDMConfig, ["--config", str(tmp_path / "c.yaml")])
    assert cfg.validation_prompts == [] and cfg.num_validation_prompts == 2
    assert parse_config(TrainLDMConfig, ["--validation_prompts", "[]"]).validation_prompts == []
    flags = parse_config(TrainLDMConfig, ["--validation_prompts", "a cat", "--validation_prompts", "a dog"])
    assert flags.validation_prompts == ["a cat", "a dog"]
    sd15 = parse_config(TrainLDMConfig, ["--config", os.path.join(REPO, "configs", "sd15.yaml")])
    assert sd15.validation_prompts[0] == "a photograph of an astronaut riding a horse"
