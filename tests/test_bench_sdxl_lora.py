"""benchmarks/bench_sdxl_lora.py in its CPU smoke mode (sdxl-tiny, 64 px, 2 steps): it runs, trains the adapters,
and its reference differs from the recipe only where it says. No timing asserts."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_sdxl_lora
    finally:
        sys.path.pop(0)
    return bench_sdxl_lora


def test_smoke_mode_measures_the_recipe_against_no_checkpointing(bench, tmp_path, capsys):
    out = bench.main(["--model", "sdxl-tiny", "--resolution", "64", "--steps", "2", "--warmup", "0",
                      "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["ratios"] == out["ratios"]
    recipe, reference = out["results"]["recipe"], out["results"]["reference"]
    assert recipe["weights_dtype"] == reference["weights_dtype"] == "bfloat16"
    assert recipe["gradient_checkpointing"] and not reference["gradient_checkpointing"]
    assert recipe["peak_memory_gib"] is None and recipe["optimizer"] == "adamw"  # CPU: no CUDA memory, no bnb
    # rank 16 on sdxl-tiny's attention projections (to_q/k/v/out of 6 transformer blocks, 2 attentions each)
    assert recipe["lora_parameters"] == reference["lora_parameters"] > 0
    # checkpointing recomputes, it does not change the loss of the same batch and noise
    assert recipe["loss"] == reference["loss"] and 0.5 < recipe["loss"] < 2.0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("ratio_images_per_s_recipe_over_reference: ") and float(lines[-1].split()[-1]) > 0


def test_cached_batch_has_sdxl_shapes_at_1024_px(bench):
    from ldm.models.presets import get_spec

    batch = bench.cached_batch(get_spec("sdxl"), 2, 1024, step=0, device="cpu")
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "latents": (2, 4, 128, 128), "context": (2, 77, 2048), "pooled": (2, 1280), "time_ids": (2, 6)}
    assert batch["time_ids"][0].tolist() == [1024, 1024, 0, 0, 1024, 1024]
    with pytest.raises(ValueError, match=r"multiple of 32 \(the VAE's factor 8 times the UNet's 4\)"):
        bench.cached_batch(get_spec("sdxl"), 1, 1000, step=0, device="cpu")
    assert bench.variants("fp32")["reference"] == {"weights_dtype": "float32", "gradient_checkpointing": True}
