"""train_text_encoder: a CLIP text encoder trained contrastively from nothing on the shapes pairs (CPU) learns (the
held-out loss falls, retrieval beats chance), maps a wording it never saw next to a trained wording of the same
scene rather than to that wording with another colour or position, and `ldm train --text_encoder` loads it (and
refuses one of the wrong width); the CLI checks its flags before any work."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTextModel

from ldm.cli import main as ldm_main
from ldm.data import COLOURS, POSITIONS, SHAPES, open_dataset
from ldm.data.shapes import POSITION_PHRASES
from ldm.training import train_ldm, train_text_encoder
from ldm.training.ldm_config import TrainLDMConfig
from ldm.training.train_text_encoder import TrainTextEncoderConfig

pytestmark = pytest.mark.usefixtures("one_thread")

HELD_OUT = "one "  # SINGLE_TEMPLATES' "one {colour} {shape} {where}": filtered out of the training captions


def config(output_dir, **overrides) -> TrainTextEncoderConfig:
    base = dict(data="shapes:512@32", max_steps=100, validation_every=50, log_every=0, checkpoint_every=0,
                output_dir=str(output_dir))
    return TrainTextEncoderConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, one_thread):
    cfg = config(tmp_path_factory.mktemp("text_encoder") / "run")
    cfg.validate()
    return cfg, train_text_encoder.main(cfg)


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, one_thread):
    """A text encoder trained for two steps: what `ldm train --text_encoder` loads, without the short run's cost."""
    cfg = config(tmp_path_factory.mktemp("text_encoder") / "two_steps", data="shapes:48@32", val_samples=8,
                 batch_size=8, max_steps=2, validation_every=2)
    cfg.validate()
    return cfg, train_text_encoder.main(cfg)


@pytest.mark.slow
def test_short_run_lowers_held_out_loss_and_retrieves_above_chance(short_run):
    cfg, result = short_run
    before, after = result["initial"], result["history"][-1]
    assert result["step"] == 100 and after["step"] == 100 and len(result["history"]) == 2
    assert after["val_loss"] < 0.5 * before["val_loss"], (before, after)
    assert after["val_retrieval"] > max(0.25, 10 * after["val_chance"]), (before, after)
    folder = result["text_encoder_dir"]
    assert os.path.isfile(os.path.join(folder, "text_encoder", "model.safetensors"))
    assert os.path.isfile(os.path.join(folder, "tokenizer", "vocab.json"))


def test_resumed_run_ends_with_the_same_text_encoder(tmp_path):
    small = dict(data="shapes:48@32", val_samples=8, batch_size=8, max_steps=4, validation_every=2)
    straight = train_text_encoder.main(config(tmp_path / "straight", **small))
    first = train_text_encoder.main(config(tmp_path / "split", **{**small, "max_steps": 2}))
    resumed = train_text_encoder.main(config(tmp_path / "split", **small, resume="latest"))
    assert first["step"] == 2 and resumed["step"] == 4 and resumed["initial"] == {}
    assert [r["val_loss"] for r in resumed["history"]] == [r["val_loss"] for r in straight["history"]]
    saved = [CLIPTextModel.from_pretrained(os.path.join(result["text_encoder_dir"], "text_encoder"))
             for result in (resumed, straight)]
    assert same_weights(*saved)
    metrics = json.load(open(os.path.join(resumed["text_encoder_dir"], "metrics.json"), encoding="utf-8"))
    assert metrics["step"] == 4 and set(metrics) >= {"val_loss", "val_retrieval", "val_chance"}


def test_train_text_encoder_says_where_it_wrote_the_text_encoder(tmp_path, capsys):
    result = train_text_encoder.main(config(tmp_path / "run", data="shapes:48@32", val_samples=8, batch_size=8,
                                            max_steps=1, validation_every=1))
    lines = capsys.readouterr().out.splitlines()
    prefix = "train_text_encoder: wrote the text encoder folder: "
    written = next(line for line in lines if line.startswith(prefix)).removeprefix(prefix)
    assert written == os.path.abspath(result["text_encoder_dir"])
    assert os.path.isfile(os.path.join(written, "text_encoder", "model.safetensors"))
    assert f"train_text_encoder: checkpoints: {os.path.abspath(tmp_path / 'run' / 'checkpoints')}" in lines


def test_held_out_pairs_never_enter_a_training_batch():
    batch = {"pixel_values": torch.arange(4.0).reshape(4, 1), "caption": list("abcd"), "key": ["k0", "k1", "k2", "k3"],
             "captions": [["a"], ["b"], ["c"], ["d"]]}
    kept = train_text_encoder.without_keys(batch, {"k1", "k3"})
    assert kept["key"] == ["k0", "k2"] and kept["caption"] == ["a", "c"] and kept["captions"] == [["a"], ["c"]]
    assert kept["pixel_values"].flatten().tolist() == [0.0, 2.0]


def test_retrieval_counts_identical_captions_as_hits():
    text = torch.eye(3)
    image = torch.eye(3)[[1, 0, 2]]  # texts 0 and 1 find each other's image
    assert train_text_encoder.retrieval_hits(text, image, ["x", "x", "y"]) == pytest.approx((3.0, 5 / 3))
    assert train_text_encoder.retrieval_hits(text, image, ["x", "z", "y"]) == pytest.approx((1.0, 1.0))


def test_identical_captions_are_refused(tmp_path):
    pairs = [{"pixel_values": torch.zeros(3, 32, 32), "caption": "a photo of sks dog", "key": f"{i}"} for i in range(8)]
    with pytest.raises(ValueError, match="nothing to contrast"):
        train_text_encoder.main(config(tmp_path / "same", val_samples=4, batch_size=2), dataset=pairs)


def scene_wordings(colour: str, shape: str, position: str, phrase: int) -> tuple[str, str, list[str], list[str]]:
    """Returns (held-out wording, trained wording, held-out wording with each other colour, ... each other
    position) of a one-shape scene, the position said with POSITION_PHRASES[position][phrase]."""
    where = lambda p: POSITION_PHRASES[p][phrase]  # noqa: E731
    article = "an" if colour[0] in "aeiou" else "a"
    return (f"one {colour} {shape} {where(position)}", f"{article} {colour} {shape} {where(position)}",
            [f"one {c} {shape} {where(position)}" for c in COLOURS if c != colour],
            [f"one {colour} {shape} {where(p)}" for p in POSITIONS if p != position])


@torch.no_grad()
def wording_margins(encoder: CLIPTextModel, tokenizer) -> dict[str, torch.Tensor]:
    """Returns, per representation, (scenes, 2): cos(held-out, trained wording) minus the largest cos(held-out,
    same wording with another colour), and minus the largest with another position, for every one-shape scene
    and two position phrasings. Representations, as a diffusion model gets them (77 tokens, padded): "eos", the
    EOS token's state (pooler_output), and "mean", the mean of all 77 token states."""
    margins = {"eos": [], "mean": []}
    for colour, shape, position, phrase in ((c, s, p, i) for c in COLOURS for s in SHAPES for p in POSITIONS
                                            for i in (0, 1)):
        held_out, trained, other_colours, other_positions = scene_wordings(colour, shape, position, phrase)
        ids = tokenizer([held_out, trained, *other_colours, *other_positions], padding="max_length", max_length=77,
                        truncation=True, return_tensors="pt").input_ids  # (1 + 1 + 5 + 4, 77)
        out = encoder(ids)
        for name, states in (("eos", out.pooler_output), ("mean", out.last_hidden_state.mean(dim=1))):
            cos = F.normalize(states, dim=-1)[1:] @ F.normalize(states[0], dim=-1)  # (10,)
            margins[name].append(torch.stack([cos[0] - cos[1:6].max(), cos[0] - cos[6:].max()]))
    return {name: torch.stack(rows) for name, rows in margins.items()}  # (180, 2) each


@pytest.mark.slow
def test_a_held_out_wording_lands_next_to_a_trained_wording_of_the_same_scene(tmp_path):
    """The evidence for training the text encoder: a frozen random encoder ranks "one red circle on the left"
    nearer "one blue circle on the left" than "a red circle on the left" (shared words win); after contrastive
    training on captions that never use the "one ..." template, every scene's held-out wording is nearer its
    trained wording than any other colour's or position's, in the EOS state and in the mean token state."""
    pairs = [s for s in open_dataset("shapes:2000@32", shuffle=False) if not s["caption"].startswith(HELD_OUT)]
    assert 1600 < len(pairs) < 1900  # drawn for 1 in 6 single-shape captions: 1 in 8
    cfg = config(tmp_path / "held_out", max_steps=300, validation_every=300)
    result = train_text_encoder.main(cfg, dataset=pairs)
    assert result["history"][-1]["val_retrieval"] > 0.5

    untrained, tokenizer = train_text_encoder.build_text_side(cfg)
    before = wording_margins(untrained.eval(), tokenizer)
    assert (before["eos"][:, 0] > 0).float().mean() < 0.5  # mostly the wording, not the colour, decides
    assert (before["mean"][:, 0] > 0).float().mean() < 0.5

    trained, tokenizer = train_text_encoder.load_text_encoder(cfg.output_dir)
    after = wording_margins(trained.eval(), tokenizer)
    for name, margin in after.items():
        assert (margin > 0).all(), f"{name}: {int((margin <= 0).sum())} of {margin.numel()} comparisons fail, " \
                                   f"smallest margins (colour, position) {margin.min(dim=0).values.tolist()}"


def ldm_config(tmp_path, **overrides) -> TrainLDMConfig:
    base = dict(model="small", data="shapes:16@32", resolution=32, batch_size=4, max_steps=2, lr_warmup_steps=0,
                output_dir=str(tmp_path / "ldm"), checkpoint_every=0, validation_every=0, num_validation_prompts=0,
                val_loss_samples=2, report_to="none", use_ema=False, log_every=0)
    return TrainLDMConfig(**{**base, **overrides})


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_ldm_train_loads_the_trained_text_encoder(two_step_run, tmp_path):
    te_cfg, te_result = two_step_run
    saved = CLIPTextModel.from_pretrained(os.path.join(te_result["text_encoder_dir"], "text_encoder"))
    cfg = ldm_config(tmp_path, text_encoder=te_cfg.output_dir, max_token_length=16)  # the run folder: newest
    cfg.validate()
    parts = train_ldm.build_models(cfg)
    assert same_weights(parts["text_encoder"], saved)
    assert parts["tokenizer"].model_max_length == 16
    result = train_ldm.main(cfg)
    assert result["step"] == 2
    folder = os.path.join(result["checkpoint"], "pipeline")
    assert same_weights(CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")), saved)  # frozen


def test_ldm_train_refuses_a_text_encoder_of_another_width(two_step_run, tmp_path, capsys):
    te_cfg, _ = two_step_run
    with pytest.raises(ValueError, match=r"128 wide .* attends to 32-wide text"):
        train_ldm.build_models(ldm_config(tmp_path, model="tiny", text_encoder=te_cfg.output_dir))
    code = ldm_main(["train", "--model", "dit-tiny", "--text_encoder", te_cfg.output_dir, "--report_to", "none",
                     "--output_dir", str(tmp_path / "dit")])
    err = capsys.readouterr().err
    assert code == 2 and "128 wide" in err and "32-wide" in err and "ldm train-text-encoder" in err, err


def test_cli_help_and_a_bad_value_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit) as exit_:
        ldm_main(["train-text-encoder", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{name}" in text for name in ("data", "model", "embed-dim", "num-validation-images",
                                                 "validation-every"))
    out = tmp_path / "never"
    assert ldm_main(["train-text-encoder", "--batch_size", "0", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and not out.exists(), err
