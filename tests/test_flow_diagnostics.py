"""The diagnostics on flow-matching models: `ldm diagnose timesteps|sampling|all` on a tiny trained flow model (the
velocity's loss and bias per sigma bin, the drift trace of euler and heun, the guidance breakdown), and the flow
probe's report and the trace's forward marginal checked against the exact velocity field of Gaussian data."""
import json
import math
import os

import pytest
import torch

from ldm.cli import main

FLOW_BIN_FIELDS = {"bin", "sigma_lo", "sigma_hi", "n", "sigma_mean", "loss_v", "loss_x0", "loss_eps", "v_pred_mean",
                   "v_pred_std", "v_mean", "v_std", "bias", "bias_se", "bias_z", "biased_channels", "biased",
                   "norm_ratio", "x0_rmse", "eps_rmse"}
FLOW_GAUSSIAN_FIELDS = {"gaussian_loss_v", "gaussian_loss_x0", "excess_loss_v", "mse_to_gaussian_v"}
FLOW_STEP_FIELDS = {"step", "timestep", "sigma", "latent_mean", "latent_std", "latent_min", "latent_max", "x0_mean",
                    "x0_std", "x0_min", "x0_max", "x0_change", "marginal_w2", "marginal_w2_mean"}
GUIDANCE_FIELDS = {"guidance_diff_rms", "guidance_inflation", "rescale_std_ratio", "rescale_phi", "rescale_change_rms"}
SHAPE = (4, 2, 2)
Z = 5.0

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flow_folder(tmp_path_factory, one_thread):
    """A tiny flow-matching model trained for 30 steps on shapes; returns its pipeline folder."""
    from ldm.training import train_ldm
    from ldm.training.ldm_config import TrainLDMConfig

    out = tmp_path_factory.mktemp("flow")
    cfg = TrainLDMConfig(model="tiny", data="shapes:48@32", resolution=32, batch_size=8, max_steps=30,
                         learning_rate=2e-3, lr_warmup_steps=0, output_dir=str(out / "run"), checkpoint_every=1000,
                         validation_every=10, num_validation_prompts=0, val_loss_samples=4, report_to="none",
                         prediction_type="flow")
    return os.path.join(train_ldm.main(cfg)["checkpoint"], "pipeline")


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def _diagnose(command: str, folder: str, out, report: str, *flags: str) -> dict:
    """Runs `ldm diagnose <command>` on a model folder into `out` and returns the JSON report it wrote."""
    assert main(["diagnose", command, "--model", folder, "--out", str(out), *flags]) == 0
    return json.loads((out / report).read_text())


def _finite(values) -> bool:
    """Whether every number in a nested list / dict is finite (None allowed only where documented: x0_change)."""
    if isinstance(values, dict):
        return all(_finite(v) for k, v in values.items() if not (k == "x0_change" and v is None))
    if isinstance(values, list):
        return all(_finite(v) for v in values)
    return not isinstance(values, float) or math.isfinite(values)


@pytest.mark.slow
def test_diagnose_timesteps_on_a_flow_model(flow_folder, tmp_path):
    out = tmp_path / "t"
    report = _diagnose("timesteps", flow_folder, out, "timesteps.json", "--data", "shapes:8", "--num-images", "2",
                       "--bins", "4", "--per-bin", "2", "--gaussian-reference", "--reference-images", "4")
    assert report["prediction_type"] == "flow" and report["prediction"] == "velocity"
    assert report["num_samples"] == 2 * 4 * 2 and len(report["bins"]) == 4
    for b, row in enumerate(report["bins"]):
        assert FLOW_BIN_FIELDS | FLOW_GAUSSIAN_FIELDS <= set(row) and _finite(row)
        assert "loss_eps" in row and "eps_pred_mean" not in row  # the velocity is what is reported
        assert (row["sigma_lo"], row["sigma_hi"]) == (b / 4, (b + 1) / 4)
        assert row["sigma_lo"] < row["sigma_mean"] < row["sigma_hi"]
        assert len(row["v_pred_mean"]) == 4 and len(row["bias"]) == 4 and len(row["bias_z"]) == 4
    header = (out / "timesteps.csv").read_text().splitlines()[0].split(",")
    assert {"loss_v", "bias_3", "v_pred_mean_0", "sigma_mean", "gaussian_loss_v"} <= set(header)
    for name in ("timesteps_loss.png", "timesteps_bias.png", "timesteps_x0_error.png"):
        assert _png(out / name)


@pytest.mark.slow
def test_diagnose_sampling_on_a_flow_model(flow_folder, tmp_path):
    out = tmp_path / "s"
    report = _diagnose("sampling", flow_folder, out, "sampling.json", "--prompt", "a red circle", "--steps", "3",
                       "--strip", "2", "--guidance-scale", "4", "--data", "shapes:2")
    assert report["prediction"] == "velocity"
    assert set(report["schedulers"]) == {"euler", "heun"}  # a flow model's default samplers
    for name, calls in (("euler", 3), ("heun", 2 * 3 - 1)):  # Heun: two model calls a step but the last
        rep = report["schedulers"][name]
        assert len(rep["steps"]) == calls and len(rep["latent_histograms"]) == calls
        first = rep["steps"][0]
        assert first["sigma"] == pytest.approx(1.0) and first["timestep"] == pytest.approx(1000.0)
        assert "alpha_bar_t" not in first
        for row in rep["steps"]:
            assert FLOW_STEP_FIELDS | GUIDANCE_FIELDS <= set(row) and _finite(row)
            assert 0 < row["sigma"] <= 1 and row["guidance_inflation"] > 0
        sigmas = [r["sigma"] for r in rep["steps"]]
        assert sigmas == sorted(sigmas, reverse=True)
        # x_1 = eps ~ N(0, I) is the forward marginal at sigma = 1 whatever the data
        assert first["marginal_w2_mean"] < 0.2 and all(abs(s - 1) < 0.2 for s in first["latent_std"])
        assert (out / f"sampling_{name}.csv").exists() and _png(out / f"sampling_{name}_ridge.png")
    for name in ("sampling_drift.png", "sampling_guidance.png", "sampling_x0_strip.png"):
        assert _png(out / name)


@pytest.mark.slow
def test_diagnose_all_on_a_flow_model(flow_folder, tmp_path):
    out = tmp_path / "all"
    index = _diagnose("all", flow_folder, out, "index.json", "--data", "shapes:6", "--steps", "2", "--num-images", "2")
    expected = {"timesteps_loss.png", "timesteps_bias.png", "timesteps_x0_error.png", "sampling_drift.png",
                "sampling_guidance.png", "sampling_x0_strip.png", "sampling_euler_ridge.png",
                "sampling_heun_ridge.png", "schedule_sigmas.png", "schedule_timesteps.png"}
    assert expected <= set(index["files"]) and all(_png(out / f) for f in expected)
    assert all(os.path.exists(out / f) for f in index["files"])
    schedule = json.loads((out / "schedule.json").read_text())
    assert schedule["objective"] == "flow" and set(schedule["visited"]) == {"euler", "heun"}
    assert schedule["visited"]["euler"]["linspace"][0] == pytest.approx(1000.0)


@pytest.mark.slow
def test_a_noise_sampler_on_a_flow_model_is_a_clear_error(flow_folder, tmp_path, capsys):
    rc = main(["diagnose", "sampling", "--model", flow_folder, "--prompt", "x", "--out", str(tmp_path),
               "--schedulers", "ddim", "--steps", "2"])
    assert rc == 2 and "euler" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gaussian_flow():
    from ldm.diagnostics.gaussian import random_gaussian

    mu, sigma = random_gaussian(16, seed=0)
    return mu, sigma


def _gaussian_flow_probe(mu, sigma, n=2000):
    from ldm.diagnostics.probe import build_flow_probe

    g = torch.Generator().manual_seed(2)
    x0 = (mu + torch.randn(n, 16, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T).float()
    return build_flow_probe(x0.reshape(n, *SHAPE), torch.zeros(n, 1, 4), n_bins=10, per_bin=1, seed=3)


def test_flow_probe_report_of_the_exact_velocity_has_no_bias(gaussian_flow):
    from ldm.diagnostics.bias import flow_per_bin_report
    from ldm.diagnostics.gaussian import GaussianFlowModel
    from ldm.diffusion import flow_noised

    mu, sigma = gaussian_flow
    probe = _gaussian_flow_probe(mu, sigma)
    assert probe.flow and torch.allclose(probe.x_t, flow_noised(probe.x0, probe.eps, probe.sigmas))
    assert torch.allclose(probe.timesteps.double(), probe.sigmas * 1000, atol=1e-3)  # the denoiser's time input
    reports = {}
    for bias in (0.0, 0.1):
        model = GaussianFlowModel(mu, sigma, SHAPE, bias=bias)
        v_pred = model(probe.x_t, probe.timesteps, probe.context)  # through the denoiser interface, time = s * 1000
        reports[bias] = flow_per_bin_report(v_pred, probe.eps, probe.x0, probe.x_t, probe.sigmas, probe.n_bins, Z)
    assert len(reports[0.0]) == 10
    for row in reports[0.0]:  # the exact velocity: no bin flagged, |bias| within 5 s.e. on every channel
        assert not row["biased"] and max(row["bias_z"]) < Z, row
    for row in reports[0.1]:  # v* + 0.1: flagged in every sigma bin, on every channel, at the right size
        assert row["biased"] and row["biased_channels"] == [0, 1, 2, 3], row
        assert all(abs(b - 0.1) < 5 * se for b, se in zip(row["bias"], row["bias_se"]))
    for good, bad in zip(reports[0.0], reports[0.1]):
        for key in ("loss_v", "loss_x0", "loss_eps"):
            assert good[key] < bad[key]
        # one sigma per bin: an x0 error is -s times the velocity error, an eps error (1 - s) times it
        s = good["sigma_mean"]
        assert good["loss_x0"] == pytest.approx(s ** 2 * good["loss_v"], rel=1e-4)
        assert good["loss_eps"] == pytest.approx((1 - s) ** 2 * good["loss_v"], rel=1e-4)


@pytest.mark.parametrize("method,bound", [("euler", 0.06), ("heun", 0.02)])
def test_flow_trace_follows_the_forward_marginal(gaussian_flow, method, bound):
    # The exact velocity field carries x_1 = eps through the marginals of x_s = (1 - s) x0 + s eps: the trace's W2
    # to N((1 - s) m, sqrt((1 - s)^2 v + s^2)) stays small at every step (Euler's looser bound: its O(1/N) error in
    # the covariance grows toward the end), and its guidance breakdown is finite. The unguided mean's marginal,
    # 0.1 away at the end, is told apart.
    from ldm.diagnostics.gaussian import GaussianFlowModel, gaussian_pipeline, gaussian_prompt_embeds
    from ldm.diagnostics.sampling import trace_report

    mu, sigma = gaussian_flow
    second = (sigma.diagonal() + mu ** 2).reshape(SHAPE)                     # E[x0^2] per coordinate
    data_mean = mu.reshape(SHAPE).mean(dim=(1, 2))                           # per-channel pooled moments of x0
    data_std = (second.mean(dim=(1, 2)) - data_mean ** 2).sqrt()
    pipe = gaussian_pipeline(GaussianFlowModel(mu, sigma, SHAPE, mu_uncond=mu - 0.2), None, method)
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = gaussian_prompt_embeds(2000, seq_len=1, dim=4)
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=16, width=16, num_inference_steps=20,
               guidance_scale=1.5, output_type="latent", generator=torch.Generator().manual_seed(0), trace=True)
    # guided, the target is N(mu + 0.5 * 0.2, Sigma): the same channel std, the mean shifted by 0.1
    rows = trace_report(out.trace, pipe.scheduler, 1.5, 0.0, data_mean.float() + 0.1, data_std.float())["steps"]
    assert len(rows) == (20 if method == "euler" else 39)
    assert max(r["marginal_w2_mean"] for r in rows) < bound, [round(r["marginal_w2_mean"], 3) for r in rows]
    unguided = trace_report(out.trace, pipe.scheduler, 1.5, 0.0, data_mean.float(), data_std.float())["steps"]
    assert unguided[-1]["marginal_w2_mean"] > 0.08
    assert all(r["guidance_diff_rms"] > 0 and math.isfinite(r["guidance_inflation"]) for r in rows)
    assert rows[-1]["sigma"] < 0.01
