"""Each `ldm diagnose` command runs on a tiny random model and writes its PNGs, JSON and CSV with the documented fields."""
import json
import os

import pytest

from ldm.cli import main

BIN_FIELDS = {"bin", "t_lo", "t_hi", "n", "alpha_bar_mean", "loss_eps", "loss_v", "loss_x0", "eps_pred_mean",
              "eps_pred_std", "bias", "bias_se", "bias_z", "biased_channels", "biased", "norm_ratio", "x0_rmse"}
GAUSSIAN_FIELDS = {"gaussian_loss_eps", "gaussian_loss_x0", "excess_loss_eps", "mse_to_gaussian_eps"}
STEP_FIELDS = {"step", "timestep", "alpha_bar_t", "latent_mean", "latent_std", "latent_min", "latent_max", "x0_mean",
               "x0_std", "x0_min", "x0_max", "x0_change", "marginal_w2", "marginal_w2_mean"}
GUIDANCE_FIELDS = {"guidance_diff_rms", "guidance_inflation", "rescale_std_ratio", "rescale_phi", "rescale_change_rms"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_diagnose_timesteps(tiny_folder, tmp_path):
    out = tmp_path / "t"
    rc = main(["diagnose", "timesteps", "--model", tiny_folder, "--data", "shapes:4", "--out", str(out),
               "--num-images", "2", "--bins", "4", "--per-bin", "2", "--gaussian-reference", "--reference-images", "4"])
    assert rc == 0
    report = json.loads((out / "timesteps.json").read_text())
    assert {"num_samples", "z_threshold", "biased_bins", "bins", "prediction_type", "data"} <= set(report)
    assert report["num_samples"] == 2 * 4 * 2 and len(report["bins"]) == 4
    for row in report["bins"]:
        assert BIN_FIELDS | GAUSSIAN_FIELDS <= set(row)
        assert len(row["eps_pred_mean"]) == 4 and len(row["bias"]) == 4  # per latent channel
    header = (out / "timesteps.csv").read_text().splitlines()[0].split(",")
    assert "bias_3" in header and "loss_x0" in header and len((out / "timesteps.csv").read_text().splitlines()) == 5
    for name in ("timesteps_loss.png", "timesteps_bias.png", "timesteps_x0_error.png"):
        assert _png(out / name)


@pytest.mark.slow
def test_diagnose_sampling(tiny_folder, tmp_path):
    out = tmp_path / "s"
    rc = main(["diagnose", "sampling", "--model", tiny_folder, "--prompt", "a red circle", "--out", str(out),
               "--schedulers", "ddpm,ddim,lms", "--steps", "3", "--strip", "2", "--guidance-scale", "4",
               "--data", "shapes:2"])
    assert rc == 0
    report = json.loads((out / "sampling.json").read_text())
    assert set(report["schedulers"]) == {"ddpm", "ddim", "lms"} and report["strip_steps"] == [0, 2]
    for name, rep in report["schedulers"].items():
        assert len(rep["steps"]) == 3 and len(rep["latent_histograms"]) == 3
        assert len(rep["histogram_edges"]) == len(rep["latent_histograms"][0]) + 1
        for row in rep["steps"]:
            assert STEP_FIELDS | GUIDANCE_FIELDS <= set(row)
            assert row["guidance_inflation"] > 0
        assert rep["steps"][0]["x0_change"] is None and rep["steps"][1]["x0_change"] >= 0
        assert (out / f"sampling_{name}.csv").exists() and _png(out / f"sampling_{name}_ridge.png")
    for name in ("sampling_drift.png", "sampling_guidance.png", "sampling_x0_strip.png"):
        assert _png(out / name)
    from PIL import Image

    assert Image.open(out / "sampling_x0_strip.png").size == (2 * 64, 3 * 64)  # 2 steps x 3 samplers


def test_sampling_starts_on_the_forward_marginal(tiny_folder):
    # x_T ~ N(0, I) is the forward marginal at T up to sqrt(alpha_bar_T): W2 is small at step 0 for every sampler.
    import torch

    from ldm import Pipeline
    from ldm.diagnostics.sampling import trace_report

    pipe = Pipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    for name in ("ddim", "lms"):
        pipe.set_scheduler(name)
        out = pipe("x", num_inference_steps=2, guidance_scale=1.0, output_type="latent", trace=True,
                   generator=torch.Generator().manual_seed(0), num_images_per_prompt=8)
        first = trace_report(out.trace, pipe.scheduler, 1.0)["steps"][0]
        assert first["marginal_w2_mean"] < 0.15, name
        assert all(abs(s - 1) < 0.15 for s in first["latent_std"]), name


@pytest.mark.slow
def test_diagnose_schedule(tmp_path):
    out = tmp_path / "sch"
    rc = main(["diagnose", "schedule", "--beta-schedule", "linear", "scaled_linear", "--out", str(out), "--steps", "5"])
    assert rc == 0
    report = json.loads((out / "schedule.json").read_text())
    assert set(report["schedules"]) == {"linear", "scaled_linear"}
    assert set(report["visited"]) == {"ddpm", "ddim", "lms"}
    assert set(report["visited"]["ddim"]) == {"linspace", "leading", "trailing"}
    assert report["schedules"]["linear"]["beta_start"] == 1e-4
    rows = (out / "schedule_linear.csv").read_text().splitlines()
    assert len(rows) == 1001 and "vlb_weight_t" in rows[0] and "posterior_variance_t" in rows[0]
    for name in ("schedule_alpha_bar.png", "schedule_posterior_variance.png", "schedule_vlb_weights.png",
                 "schedule_timesteps.png"):
        assert _png(out / name)


def test_diagnose_training_heatmap(tmp_path):
    history = tmp_path / "val.jsonl"
    lines = [{"step": s, "val_loss": 1.0, **{f"val_loss_bin{b}": 1.0 / (1 + s * (b + 1) / 100) for b in range(5)}}
             for s in (0, 100, 200, 300)]
    history.write_text("\n".join(json.dumps(line) for line in lines))
    rc = main(["diagnose", "training", "--history", str(history), "--out", str(tmp_path)])
    assert rc == 0 and _png(tmp_path / "training_heatmap.png")


@pytest.mark.slow
def test_diagnose_all_renders_every_figure(tiny_folder, tmp_path):
    out = tmp_path / "all"
    rc = main(["diagnose", "all", "--model", tiny_folder, "--out", str(out), "--data", "shapes:6", "--steps", "2",
               "--num-images", "2"])
    assert rc == 0
    index = json.loads((out / "index.json").read_text())
    pngs = {f for f in index["files"] if f.endswith(".png")}
    assert {"timesteps_loss.png", "timesteps_bias.png", "sampling_drift.png", "sampling_x0_strip.png",
            "sampling_ddim_ridge.png", "schedule_vlb_weights.png", "schedule_timesteps.png"} <= pngs
    assert all(os.path.exists(out / f) for f in index["files"])


def test_training_heatmap_reads_tensorboard_logs(tmp_path):
    # what training writes: accelerator.log({"val_loss_bin0": ...}, step=...) to RUN/logs/<project>/events...
    from torch.utils.tensorboard import SummaryWriter

    from ldm.diagnostics.training_heatmap import history_matrix, read_history

    writer = SummaryWriter(str(tmp_path / "logs" / "train_ldm"))
    for step in (100, 200, 300):
        writer.add_scalar("loss", 1.0, step)
        for b in range(3):
            writer.add_scalar(f"val_loss_bin{b}", 1.0 / (step * (b + 1)), step)
    writer.close()
    matrix, bins, steps = history_matrix(read_history(str(tmp_path / "logs")))
    assert bins == [0, 1, 2] and steps == [100, 200, 300]
    assert matrix[1, 0] == pytest.approx(1 / 200)
    assert main(["diagnose", "training", "--history", str(tmp_path / "logs"), "--out", str(tmp_path)]) == 0
    assert _png(tmp_path / "training_heatmap.png")


@pytest.mark.parametrize("argv,needle", [
    (["diagnose", "timesteps", "--model", "/nonexistent/model", "--data", "shapes:2", "--out", "/tmp/x"], "does not exist"),
    (["diagnose", "training", "--history", "/nonexistent/val.jsonl", "--out", "/tmp/x"], "no validation history"),
])
def test_diagnose_errors_are_clear(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_diagnose_sampling_applies_and_records_the_drift_remedies(tiny_folder, tmp_path):
    def run(name, *flags):
        out = tmp_path / name
        assert main(["diagnose", "sampling", "--model", tiny_folder, "--prompt", "a red circle", "--out", str(out),
                     "--schedulers", "ddim", "--steps", "4", "--strip", "2", "--num-images", "1", *flags]) == 0
        return json.loads((out / "sampling.json").read_text())

    plain, neutral = run("plain"), run("neutral", "--eps-scale", "1")
    assert plain["remedies"] == {} and neutral["remedies"] == {}
    assert neutral["schedulers"] == plain["schedulers"]  # a remedy at its neutral setting changes nothing
    scaled = run("scaled", "--eps-scale", "1.5")
    assert scaled["remedies"] == {"eps_scale": 1.5}
    first, plain_first = scaled["schedulers"]["ddim"]["steps"][0], plain["schedulers"]["ddim"]["steps"][0]
    assert first["latent_mean"] == plain_first["latent_mean"]  # the same noise enters; its x0 prediction differs
    assert first["x0_std"] != plain_first["x0_std"]
    assert scaled["schedulers"]["ddim"]["steps"][-1]["latent_mean"] != plain["schedulers"]["ddim"]["steps"][-1]["latent_mean"]
    restarted = run("restart", "--restart", "300", "800", "1")
    assert restarted["remedies"] == {"restart": [300.0, 800.0, 1]}
    assert len(restarted["schedulers"]["ddim"]["steps"]) > len(plain["schedulers"]["ddim"]["steps"])  # steps re-run
