"""The latent cache: reused when valid, rebuilt when the VAE, tokenizer-relevant input or transform changes."""
import json
import os

import pytest
import torch

from ldm.cli import main as cli_main
from ldm.data.latent_cache import (build_latent_cache, ensure_latent_cache, open_latent_cache, read_manifest,
                                   sample_latents)
from ldm.models.presets import build_vae, get_spec
from ldm.models.tokenizer import build_clip_tokenizer


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return build_vae(get_spec("tiny")), build_clip_tokenizer()


def test_cache_contents_match_the_vae(tmp_path, parts):
    vae, tokenizer = parts
    manifest = build_latent_cache("shapes:6", vae, tokenizer, str(tmp_path), batch_size=4, shard_size=4)
    assert manifest["count"] == 6 and [s["count"] for s in manifest["shards"]] == [4, 2]
    cache = open_latent_cache(str(tmp_path))
    item = cache[5]
    assert item["latent_mean"].shape == (4, 8, 8) and item["latent_logvar"].shape == (4, 8, 8)
    assert item["input_ids"].shape == (77,) and item["input_ids"][0] == 49406
    assert item["caption"] and item["key"].startswith("shapes-0-")
    from ldm.data import open_dataset

    sample = next(s for s in open_dataset("shapes:6", shuffle=False) if s["key"] == item["key"])
    with torch.no_grad():
        posterior = vae.encode(sample["pixel_values"][None]).latent_dist
    torch.testing.assert_close(item["latent_mean"], posterior.mean[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(item["latent_logvar"], posterior.logvar[0], atol=1e-5, rtol=1e-4)
    z = sample_latents(item["latent_mean"], item["latent_logvar"], torch.Generator().manual_seed(0))
    assert z.shape == (4, 8, 8) and not torch.equal(z, item["latent_mean"])


@pytest.mark.slow
def test_reused_when_valid_rebuilt_when_vae_or_transform_changes(tmp_path, parts):
    vae, tokenizer = parts
    out = str(tmp_path / "cache")
    cache, rebuilt = ensure_latent_cache("shapes:5", vae, tokenizer, out, batch_size=8)
    assert rebuilt and len(cache) == 5
    built_at = os.path.getmtime(os.path.join(out, "latents-00000.safetensors"))
    cache, rebuilt = ensure_latent_cache("shapes:5", vae, tokenizer, out, batch_size=8)
    assert not rebuilt and os.path.getmtime(os.path.join(out, "latents-00000.safetensors")) == built_at

    changed = build_vae(get_spec("tiny"))
    changed.load_state_dict(vae.state_dict())
    with torch.no_grad():
        changed.encoder.conv_in.bias += 0.1  # one weight differs: a different encoder
    old_key = read_manifest(out)["key"]
    cache, rebuilt = ensure_latent_cache("shapes:5", changed, tokenizer, out)
    assert rebuilt and read_manifest(out)["key"] != old_key
    with pytest.raises(ValueError, match="stale"):
        open_latent_cache(out, expected_key=old_key)

    cache, rebuilt = ensure_latent_cache("shapes:5", changed, tokenizer, out, resolution=32)
    assert rebuilt and cache[0]["latent_mean"].shape == (4, 4, 4)
    cache, rebuilt = ensure_latent_cache("shapes:6", changed, tokenizer, out, resolution=32)
    assert rebuilt and len(cache) == 6  # the source changed
    _, rebuilt = ensure_latent_cache("shapes:6", changed, tokenizer, out, resolution=32)
    assert not rebuilt


def test_missing_cache_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="cache-latents"):
        open_latent_cache(str(tmp_path))


def test_cli_builds_then_reuses(tmp_path, parts, capsys):
    vae, _ = parts
    vae.save_pretrained(str(tmp_path / "vae"))
    args = ["cache-latents", "shapes:4", "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "c"), "--device", "cpu"]
    assert cli_main(args) == 0 and "built latent cache" in capsys.readouterr().out
    assert cli_main(args) == 0 and "reused valid" in capsys.readouterr().out
    assert json.load(open(tmp_path / "c" / "cache.json"))["count"] == 4
    assert cli_main(["cache-latents", "shapes:4", "--vae", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2


def test_cli_refuses_a_resolution_the_vae_cannot_divide_before_any_work(tmp_path, parts, capsys):
    vae, _ = parts
    vae.save_pretrained(str(tmp_path / "vae"))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    assert factor == 8
    args = ["cache-latents", "shapes:4", "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "c"), "--device", "cpu"]
    assert cli_main(args + ["--resolution", "30"]) == 2
    err = capsys.readouterr().err
    assert "--resolution=30 is not a positive multiple of 8" in err and "downsamples 8x" in err
    assert "use --resolution=24 or 32" in err and not os.path.exists(tmp_path / "c")
    assert cli_main(args + ["--resolution", "32"]) == 0
    assert open_latent_cache(str(tmp_path / "c"))[0]["latent_mean"].shape == (4, 4, 4)  # 32 / 8
