"""train_ldm / train_vae on each data source kind, and as two processes under `accelerate launch`."""
import json
import os
import re
import subprocess

import pytest
from conftest import two_cpu_processes
from diffusers import AutoencoderKL

from ldm.training import train_ldm, train_vae
from ldm.training.ldm_config import TrainLDMConfig
from ldm.training.train_vae import TrainVAEConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Returns {kind: spec} for the same 32 shapes images as every source kind: the shapes spec, a folder,
    webdataset shards, parquet, COCO captions and a datasets save_to_disk folder."""
    from ldm.data import pack_shards, write_folder

    import datasets

    from ldm.data import ShapesDataset

    root = tmp_path_factory.mktemp("sources")
    write_folder("shapes:32@32", str(root / "folder"))
    pack_shards("shapes:32@32", str(root / "wds"), format="webdataset", shard_size=16)
    pack_shards("shapes:32@32", str(root / "parquet"), format="parquet", shard_size=16)
    samples = [ShapesDataset(32, resolution=32)[i] for i in range(32)]
    # COCO captions: annotations/captions_*.json beside an image folder, two captions per image
    os.makedirs(root / "coco" / "annotations")
    os.makedirs(root / "coco" / "train2017")
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(32)]
    for image, sample in zip(images, samples):
        sample["image"].save(root / "coco" / "train2017" / image["file_name"], quality=95)
    annotations = [{"image_id": i, "id": 2 * i + j, "caption": s["caption"] if j == 0 else s["caption"].upper()}
                   for i, s in enumerate(samples) for j in range(2)]
    coco = root / "coco" / "annotations" / "captions_train2017.json"
    coco.write_text(json.dumps({"images": images, "annotations": annotations}))
    # a Hugging Face datasets save_to_disk folder
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {"image": [s["image"] for s in samples], "text": [s["caption"] for s in samples]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(root / "hf"))
    return {"shapes": "shapes:32@32", "folder": str(root / "folder"), "wds": str(root / "wds"),
            "parquet": str(root / "parquet"), "coco": str(coco), "hf": str(root / "hf")}


def ldm_config(tmp_path, **overrides) -> TrainLDMConfig:
    base = dict(model="tiny", resolution=32, batch_size=8, max_steps=8, learning_rate=2e-3, lr_warmup_steps=0,
                output_dir=str(tmp_path / "run"), checkpoint_every=1000, validation_every=1, num_validation_prompts=0,
                val_loss_samples=4, report_to="none", use_ema=False)
    return TrainLDMConfig(**{**base, **overrides})


@pytest.mark.parametrize("kind", ["shapes", "folder", "wds", "parquet", "coco", "hf"])
def test_ldm_learns_on_each_source_kind(tmp_path, sources, kind):
    result = train_ldm.main(ldm_config(tmp_path, data=sources[kind]))
    losses = [v["val_loss"] for v in result["val"]]
    assert result["step"] == 8 and min(losses[-3:]) < losses[0], losses


def test_ldm_learns_from_the_latent_cache(tmp_path, sources):
    from ldm.data import build_latent_cache, open_latent_cache
    from ldm.models.presets import build_components

    parts = build_components("tiny")
    build_latent_cache(sources["shapes"], parts["vae"], parts["tokenizer"], str(tmp_path / "cache"), resolution=32)
    cache = open_latent_cache(str(tmp_path / "cache"))
    result = train_ldm.main(ldm_config(tmp_path, cache_text_embeddings=True), dataset=cache)
    losses = [v["val_loss"] for v in result["val"]]
    assert min(losses[-3:]) < losses[0], losses


def test_vae_training_improves_psnr_and_stores_the_scaling_factor(tmp_path):
    cfg = TrainVAEConfig(model="tiny", data="shapes:32@32", resolution=32, batch_size=8, max_steps=20,
                         learning_rate=2e-3, output_dir=str(tmp_path / "vae"), checkpoint_every=10, disc_start=10,
                         checkpoints_total_limit=1, val_samples=4)
    cfg.validate()
    result = train_vae.main(cfg)
    first = json.load(open(tmp_path / "vae" / "samples" / "../checkpoints" / "checkpoint-00000020" / "metrics.json"))
    assert result["step"] == 20 and result["losses"][20] < result["losses"][1]
    assert os.path.isfile(tmp_path / "vae" / "samples" / "recon-00000020.png")
    vae = AutoencoderKL.from_pretrained(result["vae_dir"])
    assert abs(vae.config.scaling_factor - first["scaling_factor"]) < 1e-9 and vae.config.scaling_factor > 0


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_read_disjoint_data(tmp_path):
    out = tmp_path / "ddp"
    command = two_cpu_processes("train_ldm.py", "--model", "tiny", "--data", "shapes:64@32", "--resolution", "32",
                                "--batch_size", "4", "--max_steps", "3", "--output_dir", str(out),
                                "--validation_prompts", "[]", "--report_to", "none", "--val_loss_samples", "4",
                                "--checkpoint_every", "3")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = done.stdout + done.stderr
    keys = {int(rank): set(re.findall(r"shapes-0-\d+", found))  # the two ranks' lines may interleave
            for rank, found in re.findall(r"\[rank (\d)\] first batch keys: (\[[^\]]*\])", text)}
    assert sorted(keys) == [0, 1] and not keys[0] & keys[1]
    state = json.load(open(out / "checkpoints" / "checkpoint-00000003" / "trainer_state.json"))
    assert state["step"] == 3 and len(state["data"]) == 2  # one data position per rank
    # validation with two ranks: rank 0 alone samples the grid, of captions drawn from the data
    from ldm.data import open_dataset

    captions = {s["caption"] for s in open_dataset("shapes:64@32", shuffle=False)}
    prompts = (out / "samples" / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 4 and set(prompts) <= captions, prompts
    assert sorted(os.listdir(out / "samples")) == ["prompts.txt", "step-00000003.png"]
