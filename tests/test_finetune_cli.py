"""`ldm finetune`, `ldm merge-lora` and `ldm generate --lora` on a tiny random model: the plumbing, not the learning."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import main as ldm


pytestmark = pytest.mark.usefixtures("one_thread")


def write_folder(folder, count: int, captions: bool = False) -> str:
    from ldm.data.shapes import SceneObject, render_scene

    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        render_scene([SceneObject("circle", "red", "left")], 64, (20 + 10 * i, 20, 30)).save(f"{folder}/img{i}.png")
        if captions:
            with open(f"{folder}/img{i}.txt", "w") as f:
                f.write("a red circle")
    return str(folder)


def finetune(model, data, out, *extra) -> int:
    return ldm(["finetune", "--model", model, "--data", data, "--out", str(out), "--max-steps", "4",
                "--num-validation-samples", "2", "--validation-sample-steps", "2", "--device", "cpu", *extra])


@pytest.mark.slow
def test_finetune_merge_and_generate(tiny_folder, tmp_path):
    data = write_folder(tmp_path / "art", 5)
    assert finetune(tiny_folder, data, tmp_path / "run", "--instance-prompt", "sks art", "--export-webui",
                    "--lora-rank", "4", "--class-prompt", "art", "--num-class-images", "2") == 0
    report = json.load(open(tmp_path / "run" / "report.json"))
    assert report["num_train_images"] == 4 and report["num_heldout_images"] == 1 and report["num_class_images"] == 2
    assert os.path.exists(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert os.path.exists(tmp_path / "run" / "lora_webui.safetensors")
    assert len(os.listdir(tmp_path / "run" / "class_images")) == 3  # 2 PNGs + manifest, reused on the next run
    assert ldm(["merge-lora", "--model", tiny_folder, "--lora", str(tmp_path / "run"), "--out",
                str(tmp_path / "merged")]) == 0
    assert os.path.exists(tmp_path / "merged" / "model_index.json")
    common = ["sks art", "--steps", "2", "--seed", "3", "--device", "cpu"]
    assert ldm(["generate", *common, "--model", tiny_folder, "--out", str(tmp_path / "base.png")]) == 0
    assert ldm(["generate", *common, "--model", tiny_folder, "--out", str(tmp_path / "zero.png"), "--lora",
                str(tmp_path / "run" / "pytorch_lora_weights.safetensors"), "--lora-scale", "0"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "base.png")), np.asarray(Image.open(tmp_path / "zero.png")))


@pytest.mark.slow
def test_full_finetune_writes_a_pipeline_folder(tiny_folder, tmp_path):
    from ldm import Pipeline

    data = write_folder(tmp_path / "art", 3, captions=True)
    assert finetune(tiny_folder, data, tmp_path / "run", "--method", "full", "--instance-prompt", "sks") == 0
    report = json.load(open(tmp_path / "run" / "report.json"))
    assert report["config"]["learning_rate"] == 5e-6 and report["outputs"]["lora"] is None
    Pipeline.from_pretrained(report["outputs"]["pipeline"])


def test_user_errors_name_the_fix(tiny_folder, tmp_path, capsys):
    data = write_folder(tmp_path / "art", 3)
    assert finetune(tiny_folder, data, tmp_path / "run") == 2  # no captions, no instance prompt
    assert "--instance-prompt" in capsys.readouterr().err
    assert ldm(["finetune", "--data", data]) == 2
    assert "--model" in capsys.readouterr().err
    assert finetune(str(tmp_path / "missing"), data, tmp_path / "run", "--instance-prompt", "x") == 2
    assert "does not exist" in capsys.readouterr().err
    assert finetune(tiny_folder, data, tmp_path / "run", "--method", "dora") == 2
    missing = str(tmp_path / "none")
    assert ldm(["merge-lora", "--model", tiny_folder, "--lora", missing, "--out", str(tmp_path / "m")]) == 2


def test_auto_defaults_scale_with_the_folder():
    from ldm.training.finetune_config import FinetuneConfig, auto_steps, resolve_defaults

    assert auto_steps(5, 4, 10, 10) == 200 and auto_steps(18, 4, 10, 10) == 450 and auto_steps(200, 4, 10, 10) == 3000
    cfg = resolve_defaults(FinetuneConfig(model="m", data="d", class_prompt="a painting"), 18, 512)
    assert (cfg.max_steps, cfg.learning_rate, cfg.resolution, cfg.num_class_images, cfg.validation_every) == \
        (450, 1e-4, 512, 18, 112)


def test_holdout_split_is_deterministic_and_leaves_one_out_when_tiny():
    from ldm.evaluation.memorization import holdout_split

    assert [len(x) for x in holdout_split([f"k{i}" for i in range(5)])] == [4, 1]
    assert [len(x) for x in holdout_split([f"k{i}" for i in range(40)])] == [36, 4]
    assert holdout_split(["b", "a", "c"]) == holdout_split(["b", "a", "c"])
    with pytest.raises(ValueError, match="at least 2 images"):
        holdout_split(["only"])


def test_memorization_report_flags_copies_not_new_images():
    from ldm.evaluation.memorization import memorization_report

    generator = torch.Generator().manual_seed(0)
    train = torch.rand(6, 3, 16, 16, generator=generator) * 2 - 1
    copies = train[:4] + 0.02 * torch.randn(4, 3, 16, 16, generator=generator)
    fresh = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1
    assert memorization_report(copies, train).warning
    report = memorization_report(fresh, train)
    assert not report.warning and min(report.ratios) > 0.5
