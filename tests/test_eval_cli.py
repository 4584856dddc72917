"""`ldm eval` end to end on a tiny random model with tiny local feature and CLIP weights."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    from ldm.evaluation.features import TinyFeatureNet

    root = tmp_path_factory.mktemp("eval")
    (root / "prompts.txt").write_text("a red circle on the left\n\na blue square at the top\n")
    for name, seed in (("reference", 0), ("train", 1)):
        (root / name).mkdir()
        rng = np.random.default_rng(seed)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    torch.manual_seed(0)
    torch.save(TinyFeatureNet(dim=8).state_dict(), root / "features.pt")
    cfg = {"model_cfg": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                                        "head_width": 16},
                         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}}
    (root / "clip").mkdir()
    (root / "clip" / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in CLIP(**cfg["model_cfg"]).state_dict().items()},
              str(root / "clip" / "open_clip_model.safetensors"))
    return root


@pytest.mark.slow
def test_eval_writes_every_metric(tiny_folder, assets, tmp_path):
    out = tmp_path / "out"
    rc = main(["eval", "--model", tiny_folder, "--prompts", str(assets / "prompts.txt"), "--out", str(out),
               "--reference", str(assets / "reference"), "--features", "tiny", "--feature-weights",
               str(assets / "features.pt"), "--clip-model", str(assets / "clip"), "--train-data", str(assets / "train"),
               "--images-per-prompt", "2", "--steps", "2"])
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["num_images"] == 4 and len(list((out / "images").glob("*.png"))) == 4
    assert set(report["adherence"]) == {"colour", "shape", "position", "all", "n"} and report["adherence"]["n"] == 4
    assert report["fid"] >= 0 and set(report["kid"]) == {"mean", "std"} and report["num_reference"] == 6
    assert 0 <= report["clip_score"]["clip_score"] <= 100 and len(report["clip_score"]["per_image"]) == 4
    assert len(report["memorisation"]["nearest"]) == 4 and len(report["memorisation"]["ratios"]) == 4
    assert {"d_train", "near_copies", "warning", "message"} <= set(report["memorisation"])
    assert report["skipped"] == {}


def test_eval_skips_what_is_not_asked_and_non_shapes_prompts(tiny_folder, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\n")
    assert main(["eval", "--model", tiny_folder, "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                 "--steps", "1"]) == 0
    report = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert set(report["skipped"]) == {"adherence", "fid", "kid", "clip_score", "memorisation"}


def test_eval_missing_inception_weights_is_a_clear_error(tiny_folder, assets, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)
    rc = main(["eval", "--model", tiny_folder, "--prompts", str(assets / "prompts.txt"), "--out", str(tmp_path),
               "--reference", str(assets / "reference"), "--inception-weights", str(tmp_path / "nope.pth")])
    err = capsys.readouterr().err
    assert rc == 2 and "inception_v3_google-0cc3c7bd.pth" in err and "nope.pth" in err
    assert not (tmp_path / "images").exists()  # failed before sampling anything


def test_eval_clip_model_without_weights_says_to_give_them_locally(tiny_folder, assets, tmp_path, capsys):
    args = ["eval", "--model", tiny_folder, "--prompts", str(assets / "prompts.txt"), "--out", str(tmp_path),
            "--clip-model", "ViT-B-32"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "weights must be given as a local file with --clip-weights PATH" in err and "nothing is downloaded" in err
    assert "None" not in err and not (tmp_path / "images").exists()  # refused before sampling anything
    assert main(args + ["--clip-weights", str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "CLIP weights file" in err and "nope.safetensors (--clip-weights, for ViT-B-32) does not exist" in err
