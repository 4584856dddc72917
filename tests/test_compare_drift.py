"""benchmarks/compare_drift.py (issue #35): the quick run end to end (JSON, PNGs, tables), the pixel-space path
through the one training loop, and (slow tier) the reproduction: the under-capacity model drifts, a normal one not."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def benchmarks_path():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    yield
    sys.path.pop(0)


@pytest.mark.slow  # a subprocess that trains two models and samples them: like the other benchmarks' smoke runs
def test_compare_drift_quick_writes_results_plots_and_tables(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compare_drift.py"), "--quick", "--out",
                          str(tmp_path), "--seeds", "0", "--cases", "digits-pixel-under", "--training-remedies",
                          "none", "flow"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    runs = results["runs"]["digits-pixel-under"]["0"]
    assert set(runs) == {"none", "flow"}
    plain = {r["sampling"]: r for r in runs["none"]["rows"]}
    assert set(plain) == {"none", "eps_scale", "restart", "dynamic_thresholding"}
    assert [r["sampling"] for r in runs["flow"]["rows"]] == ["none"]   # the sampling remedies are DDIM's
    assert len(plain["none"]["w2"]) == 10 and len(plain["restart"]["w2"]) > 10  # restart re-runs steps
    assert plain["eps_scale"]["final_mean_gap"] != plain["none"]["final_mean_gap"]
    for row in plain.values():
        assert 0 <= row["quality"] <= 1 and all(w >= 0 for w in row["w2"])
    assert len(runs["none"]["bias"]["bias"]) == 10
    for png in ("bias.png", "trace_digits-pixel-under.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "| digits-pixel-under | none | restart |" in out.stdout and "### per-t bias" in out.stdout


def test_pixel_latents_train_on_the_images_themselves(benchmarks_path):
    from drift_cases import Case, PixelLatents, model_spec, pixel_dataset

    from ldm.models.vae import sample_latents

    case = Case("digits-pixel-under", "digits", True, True, 1)
    pixels = pixel_dataset(case, 0, 0, 8)
    item = PixelLatents(pixels)[3]
    assert item["latent_mean"].shape == (3, 8, 8) and float((item["latent_mean"] == -1).float().mean()) > 0.3
    drawn = sample_latents(item["latent_mean"][None], item["latent_logvar"][None], torch.Generator(), 1.0)
    assert torch.allclose(drawn[0], item["latent_mean"], atol=1e-5)  # what train_ldm trains on: the pixels
    spec = model_spec(case)
    assert spec.vae_scale_factor == 1 and spec.unet["in_channels"] == 3 and spec.vae["scaling_factor"] == 1.0


@pytest.mark.slow
def test_under_capacity_digits_drift_and_the_normal_model_does_not(benchmarks_path, tmp_path):
    """Issue #35 item 1, in pixel space (8x8 digits, white on black), compare_drift's recipe: after 800 training
    steps the under-capacity UNet's samples leave the data (their mean rises off the saturated black, the gap grows
    along the run); after 600 the `small` UNet's stay on it. Bounds: final mean gap > 0.15 and W2(x0, data) > 0.4
    for the former, < 0.08 and < 0.2 for the latter (the measured values: docs/src/reports/drift.md)."""
    from compare_drift import Settings, case_data, run_model
    from drift_cases import cases

    torch.set_num_threads(1)
    settings = Settings(sample_steps=(50,), remedy_steps=(50,), sampling_remedies=("none",))
    by_name = cases(800, 600)
    rows = {}
    for name in ("digits-pixel-under", "digits-pixel"):
        case = by_name[name]
        rows[name] = run_model(case, "none", case_data(case, settings, str(tmp_path)), settings, str(tmp_path))
    under, normal = (rows[n]["rows"][0] for n in ("digits-pixel-under", "digits-pixel"))
    assert under["final_mean_gap"] > 0.15 and under["final_w2"] > 0.4, under
    assert under["mean_gap"][-1] > under["mean_gap"][len(under["mean_gap"]) // 2] > under["mean_gap"][0]  # it grows
    assert abs(normal["final_mean_gap"]) < 0.08 and normal["final_w2"] < 0.2, normal


def test_report_tables_give_the_seeds_mean_and_range_and_mark_untested_cells(benchmarks_path):
    from drift_report import metric_table, rows_of

    def row(sampling, steps, gap, w2):
        return {"sampling": sampling, "steps": steps, "quality": 0.5, "brightness_gap": 0.0, "w2": [0.1, w2],
                "final_w2": 0.2, "mean_gap": [0.0], "final_mean_gap": gap}

    def seed(gap: float, w2: float) -> dict:
        return {"none": {"rows": [row("none", 10, gap, w2), row("none", 1000, 0.3, 0.1), row("restart", 10, 0.0, 0.1)]}}

    results = {"settings": {"sample_steps": [10, 1000]}, "runs": {"c": {"0": seed(0.1, 0.5), "1": seed(0.3, 0.7)}}}
    assert [r["peak_w2"] for r in rows_of(results)[("c", "none", "none", 10)]] == [0.5, 0.7]
    gap = metric_table(results, "final_mean_gap").splitlines()
    assert gap[2] == "| c | none | none | +0.20 (+0.10..+0.30) | +0.30 (+0.30..+0.30) |"
    assert gap[3] == "| c | none | restart | +0.00 (+0.00..+0.00) | - |"  # the remedies skip 1000 steps
    assert metric_table(results, "peak_w2").splitlines()[2].startswith("| c | none | none | 0.60 (0.50..0.70) |")
