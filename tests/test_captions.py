"""Caption handling users of kohya's sd-scripts, EveryDream and OneTrainer expect (issue 17): tag shuffling with kept
leading tags, tag dropout, every caption of a multi-caption image kept by the latent cache and picked per step; all
drawn from the step's generator (exact resume), and nothing drawn when off."""
import contextlib
import itertools
import json
import os
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import seeded

from ldm.data.captions import CaptionSpec, augment_tags, caption_options, pick_captions, split_tags
from ldm.data.latent_cache import FORMAT, MANIFEST, build_latent_cache, ensure_latent_cache, open_latent_cache
from ldm.models.presets import build_vae, get_spec
from ldm.models.tokenizer import build_clip_tokenizer
from ldm.training import step, train_ldm
from ldm.training.config import config_from_args, parse_config
from ldm.training.finetune_config import FinetuneConfig
from ldm.training.ldm_config import TrainLDMConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTION = "sks style, 1girl, red hair, smiling"


def coco_captions(i: int) -> list[str]:
    return [f"img{i} first, red, round", f"img{i} second, blue, square", f"img{i} third, green, small"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A COCO-format folder: annotations/captions_train.json beside train/ with four 32 px PNGs, 3 captions each."""
    from ldm.data.shapes import SceneObject, render_scene

    root = tmp_path_factory.mktemp("coco")
    os.makedirs(root / "annotations")
    os.makedirs(root / "train")
    images, annotations = [], []
    for i in range(4):
        image = render_scene([SceneObject("circle", "red", "left")], 32, (30 + 40 * i, 30, 40))
        image.save(root / "train" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png"})
        annotations += [{"image_id": i, "caption": c} for c in coco_captions(i)]
    path = root / "annotations" / "captions_train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return str(path)


# --- tag shuffling and dropout ------------------------------------------------------------------------------------

def test_shuffle_keeps_the_leading_tags_and_permutes_the_rest():
    spec, generator = CaptionSpec(shuffle_tags=True, keep_tags=1), seeded(0)
    tags = split_tags(CAPTION)
    orders = set()
    for _ in range(300):
        out = split_tags(augment_tags(CAPTION, spec, generator))
        assert out[0] == "sks style" and sorted(out) == sorted(tags)  # kept in place; the same multiset
        orders.add(tuple(out[1:]))
    assert orders == set(itertools.permutations(tags[1:]))  # every order of the 3-tag tail appears
    two = CaptionSpec(shuffle_tags=True, keep_tags=2)
    assert all(split_tags(augment_tags(CAPTION, two, generator))[:2] == tags[:2] for _ in range(50))


def test_shuffle_is_a_pure_function_of_the_generator():
    spec = CaptionSpec(shuffle_tags=True, keep_tags=1, tag_dropout=0.3)
    a, b, c = seeded(7), seeded(7), seeded(8)
    first = [augment_tags(CAPTION, spec, a) for _ in range(20)]
    assert first == [augment_tags(CAPTION, spec, b) for _ in range(20)]
    assert first != [augment_tags(CAPTION, spec, c) for _ in range(20)]


def test_tag_dropout_drops_the_given_fraction_never_a_kept_tag_never_everything():
    caption = "trigger, " + ", ".join(f"tag{i}" for i in range(9))
    spec, generator = CaptionSpec(keep_tags=1, tag_dropout=0.3), seeded(0)
    dropped = 0
    for _ in range(2000):
        out = split_tags(augment_tags(caption, spec, generator))
        assert out[0] == "trigger" and out[1:] == sorted(out[1:], key=lambda t: int(t[3:]))  # no shuffle: in order
        dropped += 9 - (len(out) - 1)
    assert abs(dropped / (2000 * 9) - 0.3) < 0.02
    # no kept tag and every tag dropped: one tag stays, so the caption is never empty
    harsh = CaptionSpec(tag_dropout=0.95)
    outs = [split_tags(augment_tags("a, b", harsh, generator)) for _ in range(200)]
    assert all(len(o) >= 1 for o in outs) and sum(len(o) == 1 for o in outs) > 150
    kept_two = CaptionSpec(keep_tags=2, tag_dropout=0.95)
    assert all(split_tags(augment_tags(CAPTION, kept_two, generator))[:2] == ["sks style", "1girl"]
               for _ in range(100))


def test_untouched_captions_are_returned_as_written_without_draws():
    generator = seeded(0)
    state = generator.get_state()
    spec = CaptionSpec(shuffle_tags=True, tag_dropout=0.5, keep_tags=3)
    assert augment_tags("a red circle on the left", CaptionSpec(shuffle_tags=True), generator) == \
        "a red circle on the left"  # one tag: nothing to shuffle
    assert augment_tags("a,b ,  c", spec, generator) == "a,b ,  c"  # every tag kept: as written
    assert augment_tags("", spec, generator) == ""
    assert torch.equal(generator.get_state(), state)
    assert augment_tags("a; b; c", CaptionSpec(shuffle_tags=True, tag_separator=";"), seeded(1)).count(";") == 2


def test_pick_captions_uses_every_option_and_draws_nothing_for_single_captions():
    generator = seeded(0)
    picks = [pick_captions([["a", "b", "c"], ["d"]], generator) for _ in range(300)]
    assert {p[0] for p in picks} == {"a", "b", "c"} and {p[1] for p in picks} == {"d"}
    assert all(80 < sum(p[0] == c for p in picks) < 120 for c in "abc")
    state = generator.get_state()
    assert pick_captions([["x"], ["y"]], generator) == ["x", "y"] and torch.equal(generator.get_state(), state)
    assert caption_options([" a ", "", None, b"b", b"\xff"]) == ["a", "b"]


# --- the training step --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_step():
    """(accelerator stand-in, tiny components, objective): enough to call step.batch_loss on the CPU."""
    from ldm.models.presets import build_components
    from ldm.objectives import ObjectiveSettings, make_objective
    from ldm.objectives.base import NoiseSchedule

    parts = build_components("tiny", seed=0)
    cfg = TrainLDMConfig()
    objective = make_objective(cfg.prediction_type, NoiseSchedule.from_config(cfg), ObjectiveSettings.from_config(cfg))
    accelerator = SimpleNamespace(autocast=contextlib.nullcontext, device=torch.device("cpu"))
    return accelerator, parts, objective


def cached_batch(captions: list[list[str]]) -> dict:
    """A latent-cache batch of 32 px images: posteriors (B, 4, 4, 4), the first captions and every caption."""
    generator = seeded(3)
    n = len(captions)
    return {"latent_mean": torch.randn((n, 4, 4, 4), generator=generator),
            "latent_logvar": torch.randn((n, 4, 4, 4), generator=generator) - 4,
            "caption": [c[0] for c in captions], "captions": captions}


def old_batch_loss(accelerator, model, batch, vae, embed, objective, spec, generator, caption_dropout):
    """batch_loss as it was before caption settings existed: the reference for 'off changes nothing'."""
    latents = step.batch_latents(batch, vae, generator, accelerator.device)
    captions = list(batch["caption"])
    if caption_dropout is not None:
        captions = step.diffusion.drop_captions(captions, caption_dropout, generator)
    return step.diffusion_loss(model, latents, embed(captions, accelerator.device), objective, spec, generator)[0]


@pytest.mark.parametrize("caption_dropout", [None, 0.5])
def test_features_off_give_bit_identical_losses_and_draw_nothing_extra(tiny_step, caption_dropout):
    accelerator, parts, objective = tiny_step
    embed = step.TextEmbedder(parts["text_encoder"], parts["tokenizer"], cache=True)
    models = (parts["vae"], embed, objective, step.LossSpec())
    single = cached_batch([[CAPTION], ["a red circle"], ["b, c, d"], [CAPTION]])
    reference = seeded(5)
    with torch.no_grad():
        expected = old_batch_loss(accelerator, parts["unet"], single, *models, reference, caption_dropout)
        for batch in (single, {k: v for k, v in single.items() if k != "captions"}):
            for caption_spec in (None, CaptionSpec(), CaptionSpec(keep_tags=2, tag_separator=";")):
                generator = seeded(5)
                loss = step.batch_loss(accelerator, parts["unet"], batch, *models, generator, caption_dropout,
                                       caption_spec=caption_spec)
                assert torch.equal(loss, expected), caption_spec
                assert torch.equal(generator.get_state(), reference.get_state())  # no extra draw


def test_augmented_captions_are_encoded_every_time_but_never_cached(tiny_step):
    accelerator, parts, objective = tiny_step
    embed = step.TextEmbedder(parts["text_encoder"], parts["tokenizer"], cache=True)
    plain = step.TextEmbedder(parts["text_encoder"], parts["tokenizer"])
    batch = cached_batch([coco_captions(0), coco_captions(1)])
    spec = CaptionSpec(shuffle_tags=True, keep_tags=1, tag_dropout=0.2)
    seen = set()
    for i in range(20):
        captions, cacheable = step.batch_captions(batch, spec, 0.3, seeded(i))
        seen |= set(captions)
        with torch.no_grad():
            torch.testing.assert_close(embed(captions, "cpu", cacheable), plain(captions, "cpu"))
    originals = set(coco_captions(0) + coco_captions(1)) | {""}
    assert len(seen - originals) > 5  # shuffled and dropped captions were trained on ...
    assert set(embed.cache) <= originals  # ... and the cache holds only the data's own captions and ""


# --- the latent cache and training --------------------------------------------------------------------------------

def test_latent_cache_keeps_every_caption_and_validation_uses_the_first(coco, tmp_path):
    from ldm.training.validation import first_samples

    torch.manual_seed(0)
    manifest = build_latent_cache(coco, build_vae(get_spec("tiny")), build_clip_tokenizer(), str(tmp_path),
                                  resolution=32, batch_size=3)
    assert manifest["format"] == FORMAT == "ldm-latent-cache/3" and manifest["count"] == 4
    cache = open_latent_cache(str(tmp_path))
    for i in range(4):
        item = cache[i]
        assert item["captions"] == coco_captions(int(item["key"])) and item["caption"] == item["captions"][0]
    val = first_samples(cache, 4)
    assert val["caption"] == [coco_captions(int(k))[0] for k in val["key"]]  # validation: the first, always
    assert val["captions"] == [coco_captions(int(k)) for k in val["key"]]  # collated as a list of lists


def recorded(monkeypatch, name: str) -> list[tuple]:
    """Returns the list that gets (arguments, result) of every call of the training step's `name`, in order."""
    calls, original = [], getattr(step, name)

    def record(*args):
        result = original(*args)
        calls.append((args, result))
        return result

    monkeypatch.setattr(step, name, record)
    return calls


@pytest.mark.slow
def test_training_picks_among_all_cached_captions_and_resumes_exactly(coco, tmp_path, monkeypatch):
    def config(name, **overrides):
        base = dict(model="tiny", data=coco, resolution=32, batch_size=4, learning_rate=2e-3, lr_warmup_steps=0,
                    latent_cache=str(tmp_path / "cache"), output_dir=str(tmp_path / name), checkpoint_every=3,
                    validation_every=1000, num_validation_prompts=0, val_loss_samples=4, report_to="none",
                    log_every=1, use_ema=False, caption_dropout=0.2, shuffle_tags=True, keep_tags=1, tag_dropout=0.2)
        cfg = TrainLDMConfig(**{**base, **overrides})
        cfg.validate()
        return cfg

    calls = recorded(monkeypatch, "pick_captions")
    straight = train_ldm.main(config("a", max_steps=6))
    straight_picks = [picked for _, picked in calls]
    assert len(straight_picks) == 6 and all(len(p) == 4 for p in straight_picks)
    assert len({c for p in straight_picks for c in p}) >= 8  # not only the first caption of each of the 4 images
    train_ldm.main(config("b", max_steps=3))
    calls.clear()
    resumed = train_ldm.main(config("b", max_steps=6, resume="latest"))
    assert [picked for _, picked in calls] == straight_picks[3:]  # the same captions at the same steps
    assert list(resumed["losses"]) == [4, 5, 6]
    assert all(abs(resumed["losses"][s] - straight["losses"][s]) <= 1e-6 for s in (4, 5, 6))


def test_every_caption_of_every_image_is_trained_on(coco, tmp_path):
    """The picks of the training step over 60 steps of the stream the trainer reads: each image's 3 captions."""
    from ldm.training.stream import BatchStream

    build_latent_cache(coco, build_vae(get_spec("tiny")), build_clip_tokenizer(), str(tmp_path), resolution=32)
    seen: dict[str, set] = {}
    for i, batch in zip(range(60), BatchStream(open_latent_cache(str(tmp_path)), batch_size=2)):
        captions, _ = step.batch_captions(batch, None, None, step.step_generator(0, i))
        for key, caption in zip(batch["key"], captions):
            seen.setdefault(key, set()).add(caption)
    assert seen == {str(i): set(coco_captions(i)) for i in range(4)}


def test_an_old_format_cache_is_rebuilt_not_misread(coco, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    vae, tokenizer = build_vae(get_spec("tiny")), build_clip_tokenizer()
    _, rebuilt = ensure_latent_cache(coco, vae, tokenizer, str(tmp_path), resolution=32)
    assert rebuilt
    path = os.path.join(tmp_path, MANIFEST)
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**manifest, "format": "ldm-latent-cache/1"}, f)
    shard = os.path.join(tmp_path, manifest["shards"][0]["file"])  # format 1 kept one caption per sample
    with safe_open(shard, framework="pt") as f:
        metadata = f.metadata()
    first = json.dumps([captions[0] for captions in json.loads(metadata["captions"])])
    save_file(load_file(shard), shard, metadata={**metadata, "captions": first})
    item = open_latent_cache(str(tmp_path))[0]  # an old cache still opens: its one caption is the only option
    assert item["captions"] == [item["caption"]] == coco_captions(int(item["key"]))[:1]
    cache, rebuilt = ensure_latent_cache(coco, vae, tokenizer, str(tmp_path), resolution=32)
    assert rebuilt and cache[0]["captions"] == coco_captions(int(cache[0]["key"]))


# --- settings -----------------------------------------------------------------------------------------------------

def test_flags_parse_for_train_and_finetune():
    from ldm.cli import build_parser

    argv = ["--shuffle_tags", "--keep_tags", "1", "--tag_dropout", "0.2", "--tag_separator", ";"]
    expected = dict(shuffle_tags=True, keep_tags=1, tag_dropout=0.2, tag_separator=";")
    assert parse_config(TrainLDMConfig, argv) == TrainLDMConfig(**expected)
    assert config_from_args(TrainLDMConfig, build_parser(["train"]).parse_args(["train", *argv])) == \
        TrainLDMConfig(**expected)
    dashed = ["--model", "m", "--data", "d", "--shuffle-tags", "--keep-tags", "1", "--tag-dropout", "0.2",
              "--tag-separator", ";"]
    cfg = config_from_args(FinetuneConfig, build_parser(["finetune"]).parse_args(["finetune", *dashed]))
    assert cfg == FinetuneConfig(model="m", data="d", **expected)
    assert CaptionSpec.from_config(cfg) == CaptionSpec(True, 1, 0.2, ";")
    TrainLDMConfig(keep_tags=3).validate()  # valid alone: it only matters with shuffle_tags or tag_dropout


@pytest.mark.parametrize("cls, extra", [(TrainLDMConfig, {}), (FinetuneConfig, {"model": "m", "data": "d"})])
@pytest.mark.parametrize("field, value", [("keep_tags", -1), ("keep_tags", 1001), ("tag_dropout", 1.0),
                                          ("tag_dropout", -0.1), ("tag_separator", "")])
def test_bad_values_raise_naming_the_field(cls, extra, field, value):
    with pytest.raises(ValueError, match=field.replace("_", "[_-]")):
        cls(**extra, **{field: value}).validate()
    if value != 1001:  # CaptionSpec, a library type, has no upper bound on keep_tags
        with pytest.raises(ValueError, match=field):
            CaptionSpec(**{field: value})


@pytest.mark.slow
def test_finetune_shuffles_the_instance_captions_keeping_the_instance_prompt(tiny_folder, tmp_path, monkeypatch):
    from ldm.data.shapes import SceneObject, render_scene
    from ldm.training import finetune

    for i in range(4):
        render_scene([SceneObject("circle", "red", "left")], 32, (30 + 40 * i, 30, 40)).save(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(f"img{i}, red, round, left")
    calls = recorded(monkeypatch, "augment_captions")
    cfg = FinetuneConfig(model=tiny_folder, data=str(tmp_path), out=str(tmp_path / "out"), instance_prompt="sks art",
                         resolution=32, max_steps=4, batch_size=2, lr_warmup_steps=1, validation_every=100,
                         num_validation_samples=1, validation_sample_steps=2, checkpoint_every=0, device="cpu",
                         shuffle_tags=True, keep_tags=1)
    cfg.validate()
    finetune.main(cfg)
    assert {args[1] for args, _ in calls} == {CaptionSpec(shuffle_tags=True, keep_tags=1)}
    captions = [c for _, out in calls for c in out]
    assert len(calls) == 4 and all(split_tags(c)[0] == "sks art" for c in captions)  # one batch per step
    assert len({tuple(split_tags(c)[2:]) for c in captions}) > 1  # the other tags move


def test_a_caption_past_the_text_window_is_cut_with_one_warning(tiny_step):
    accelerator, parts, _ = tiny_step
    embed = step.TextEmbedder(parts["text_encoder"], parts["tokenizer"])
    short = ["a red circle on the left"]
    long = ["a red circle on the left, " * 20 + "and a green square at last"]  # past 75 tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embed(short, accelerator.device)  # within the window: no warning
    with pytest.warns(UserWarning, match=r"more than the 75 tokens the text encoder reads.*a red circle on the left"):
        cut = embed(long, accelerator.device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = embed(long, accelerator.device)  # once per run
    head = parts["tokenizer"].decode(parts["tokenizer"](long).input_ids[0][1:76])
    assert torch.equal(cut, again) and torch.equal(cut, embed([head], accelerator.device))  # its first window
