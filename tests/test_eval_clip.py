"""CLIP score with a tiny randomly initialised open_clip model saved locally: shapes, ranges, loading and errors."""
import json

import pytest
import torch
from PIL import Image

from ldm.evaluation.clip_score import clip_score, load_clip

CONFIG = {"model_cfg": {"embed_dim": 16,
                        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
          "preprocess_cfg": {"mean": [0.481, 0.458, 0.408], "std": [0.269, 0.261, 0.276]}}


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("clip")
    (folder / "open_clip_config.json").write_text(json.dumps(CONFIG))
    torch.manual_seed(0)
    model = CLIP(**CONFIG["model_cfg"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return str(folder), model.state_dict()


def _images():
    colours = [(255, 0, 0), (0, 0, 255), (0, 160, 0)]
    return [Image.new("RGB", (48, 48), c) for c in colours]


def test_clip_score_shape_and_range(tiny_clip_folder):
    folder, state = tiny_clip_folder
    model, preprocess, tokenizer = load_clip(folder)
    assert torch.equal(model.state_dict()["visual.conv1.weight"], state["visual.conv1.weight"])  # our weights
    prompts = ["a red square", "a blue square", "a green square"]
    result = clip_score(model, preprocess, tokenizer, _images(), prompts)
    assert set(result) == {"clip_score", "per_image", "cosine"}
    assert len(result["per_image"]) == 3 and len(result["cosine"]) == 3
    assert all(0.0 <= s <= 100.0 for s in result["per_image"])
    assert all(-1.0 <= c <= 1.0 for c in result["cosine"])
    assert result["per_image"] == pytest.approx([max(100 * c, 0.0) for c in result["cosine"]], abs=1e-4)
    assert result["clip_score"] == pytest.approx(sum(result["per_image"]) / 3, abs=1e-5)
    # deterministic: the same inputs score the same
    assert clip_score(model, preprocess, tokenizer, _images(), prompts)["cosine"] == pytest.approx(result["cosine"])


def test_clip_errors_are_clear(tmp_path, tiny_clip_folder):
    folder, _ = tiny_clip_folder
    model, preprocess, tokenizer = load_clip(folder)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(model, preprocess, tokenizer, _images(), ["only one"])
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_clip(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_clip("ViT-B-32", str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_clip("not-a-model", None)
