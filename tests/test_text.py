"""Tokenizer ids, tokenizer folders, and the two text encoders."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from ldm import Pipeline
from ldm.models.presets import build_components
from ldm.models.text_encoders import OpenCLIPTextEncoder
from ldm.models.tokenizer import build_clip_tokenizer, save_clip_tokenizer

from conftest import seeded

TINY_OPEN_CLIP = {"embed_dim": 16, "text_cfg": dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=3)}


def test_stable_diffusion_token_ids():
    tok = build_clip_tokenizer()
    ids = tok("a red circle on the left", padding="max_length", max_length=77).input_ids
    assert ids[:8] == [49406, 320, 736, 7117, 525, 518, 1823, 49407]
    assert ids[8:] == [49407] * 69 and len(ids) == 77


def test_matches_open_clip_reference_tokenizer():
    import open_clip

    ref, ours = open_clip.get_tokenizer("ViT-L-14"), build_clip_tokenizer()
    for text in ["A photo of a CAT, 4k!! trending", "héllo wörld 123 don't", "  spaces\tand\nnewlines ", "🎨 art"]:
        expected = ref(text)[0]
        assert ours(text).input_ids == expected[: int((expected != 0).sum())].tolist()


def test_sd2_tokenizer_pads_with_exclamation_mark():
    ids = build_clip_tokenizer(pad_token="!")("a", padding="max_length", max_length=77).input_ids
    assert ids[:3] == [49406, 320, 49407] and ids[3:] == [0] * 74
    with pytest.raises(ValueError, match="not in the CLIP vocabulary"):
        build_clip_tokenizer(pad_token="<pad>")


def test_tokenizer_folder_round_trip(tmp_path):
    save_clip_tokenizer(build_clip_tokenizer(), tmp_path)
    assert {"vocab.json", "merges.txt"} <= {p.name for p in tmp_path.iterdir()}
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert loaded("a red circle on the left").input_ids == [49406, 320, 736, 7117, 525, 518, 1823, 49407]
    assert loaded.model_max_length == 77 and loaded.pad_token_id == 49407


def test_open_clip_tower_equals_its_clip_text_model_conversion():
    torch.manual_seed(0)
    encoder = OpenCLIPTextEncoder.from_config(TINY_OPEN_CLIP)
    ids = build_clip_tokenizer("!")(["a red circle", "a blue square"], padding="max_length", max_length=77,
                                    return_tensors="pt").input_ids
    converted = encoder.to_clip_text_model()
    assert converted.config.num_hidden_layers == 2  # penultimate layer of a 3-layer tower
    assert torch.allclose(encoder(ids)[0], converted(ids)[0], atol=1e-5)
    last = OpenCLIPTextEncoder.from_config(TINY_OPEN_CLIP, layer="last")
    last.load_state_dict(encoder.state_dict())
    assert not torch.allclose(last(ids)[0], encoder(ids)[0])


def test_open_clip_tower_loads_local_weights_of_a_full_clip_model(tmp_path):
    import open_clip

    model = open_clip.model.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=16),
                                 text_cfg=TINY_OPEN_CLIP["text_cfg"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "clip.safetensors")
    encoder = OpenCLIPTextEncoder.from_pretrained(str(tmp_path / "clip.safetensors"), TINY_OPEN_CLIP)
    assert torch.equal(encoder.tower.token_embedding.weight, model.token_embedding.weight)
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    with pytest.raises(ValueError, match="pickled checkpoint"):
        OpenCLIPTextEncoder.from_pretrained(str(tmp_path / "clip.pt"), TINY_OPEN_CLIP)


def test_pipeline_runs_with_open_clip_tower_and_saves_it_as_clip_text_model(tmp_path):
    c = build_components("tiny")
    c["text_encoder"] = OpenCLIPTextEncoder.from_config(TINY_OPEN_CLIP)
    c["tokenizer"] = build_clip_tokenizer("!")
    pipe = Pipeline(**c)
    pipe.set_progress_bar_config(disable=True)
    a = pipe("a red circle", num_inference_steps=3, output_type="np", generator=seeded()).images
    pipe.save_pretrained(tmp_path / "sd2style")
    loaded = Pipeline.from_pretrained(tmp_path / "sd2style")
    loaded.set_progress_bar_config(disable=True)
    b = loaded("a red circle", num_inference_steps=3, output_type="np", generator=seeded()).images
    assert np.abs(a - b).max() <= 1e-4
