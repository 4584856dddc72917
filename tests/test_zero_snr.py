"""Zero-terminal-SNR models sample with every named sampler, and NaN latents raise an error naming the step."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from ldm import Pipeline, diffusion
from ldm.pipelines import NonFiniteError
from ldm.pipelines.schedulers import SCHEDULERS, ZERO_SNR_ALPHA_BAR, make_scheduler
from ldm.objectives import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zero_snr_folder(tmp_path_factory):
    """A tiny v-prediction model whose scheduler config is what train_ldm saves with --zero_terminal_snr true."""
    from ldm.models.presets import build_components

    parts = build_components("tiny", seed=0)
    betas = diffusion.rescale_zero_terminal_snr(diffusion.make_betas("scaled_linear"))
    schedule = NoiseSchedule(betas, diffusion.alphas_cumprod(betas), "scaled_linear", rescaled=True)
    config = schedule.scheduler_config(parts["scheduler"].config, "v_prediction")
    parts["scheduler"] = DDIMScheduler.from_config(config)
    assert parts["scheduler"].alphas_cumprod[-1] == 0  # the schedule as trained: SNR(T-1) = 0
    path = tmp_path_factory.mktemp("models") / "zero_snr"
    Pipeline(**parts).save_pretrained(path)
    return str(path)


def _oracle_unet(pipe, x0: torch.Tensor):
    """Patches the UNet into the exact v-prediction for data that is always x0, on the schedule as trained
    (alpha_bar[T-1] = 0 included)."""
    alpha_bar = diffusion.alphas_cumprod(torch.tensor(pipe._schedule_config["trained_betas"], dtype=torch.float64))

    def forward(x_t, t, **kwargs):  # x_t: the variance-preserving model input (B, 4, h, w)
        t = torch.tensor([int(round(float(t)))])
        a = alpha_bar[t]
        eps = (x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()  # x_t = sqrt(a) x0 + sqrt(1 - a) eps, solved for eps
        return (diffusion.training_target(x0, eps, t, alpha_bar, "v_prediction").to(x_t.dtype),)

    pipe.unet.forward = forward


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_sampler_samples_a_zero_snr_model(zero_snr_folder, name):
    pipe = Pipeline.from_pretrained(zero_snr_folder, scheduler=name)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0))

    # The random tiny model: finite, non-constant images (before the fix, every sampler but DDPM and DDIM
    # returned all-NaN images)
    images = pipe(**call, output_type="np").images  # (1, 64, 64, 3)
    assert np.isfinite(images).all() and images.std() > 0.01

    # A model that knows its data (always x0): every sampler lands on x0, so the clamped schedule samples the
    # model trained on the exact one. DDIM and PNDM stop at t = 0, not at x0: noise of RMS
    # sqrt(1 - alpha_bar_0) = 0.03 is left; PNDM's multistep needs about 10 steps to get there (as on a
    # schedule without zero SNR)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _oracle_unet(pipe, x0)
    latents = pipe(**{**call, "num_inference_steps": 10}, output_type="latent").images
    assert (latents.double() - x0).pow(2).mean().sqrt() < 0.05


def test_folder_sigma_scheduler_and_rescale_flag_are_clamped(zero_snr_folder, tmp_path):
    # a folder that stores a sigma sampler with the zero-SNR betas loads clamped
    pipe = Pipeline.from_pretrained(zero_snr_folder, scheduler="euler")
    pipe.save_pretrained(tmp_path / "euler")
    loaded = Pipeline.from_pretrained(tmp_path / "euler").scheduler
    assert isinstance(loaded, EulerDiscreteScheduler)
    assert loaded.alphas_cumprod[-1] == pytest.approx(ZERO_SNR_ALPHA_BAR, rel=1e-3)

    # rescale_betas_zero_snr=True, which LMS and PNDM ignore, gives them the rescaled schedule, clamped
    config = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    expected = diffusion.alphas_cumprod(diffusion.rescale_zero_terminal_snr(diffusion.make_betas("scaled_linear")))
    for name in ("lms", "pndm"):
        alpha_bar = make_scheduler(name, config).alphas_cumprod.double()
        torch.testing.assert_close(alpha_bar[:-1], expected[:-1], rtol=1e-4, atol=1e-9)
        assert alpha_bar[-1] == pytest.approx(ZERO_SNR_ALPHA_BAR, rel=1e-3)


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_nan_latents_name_the_first_bad_step(tiny_pipe, name):
    tiny_pipe.set_scheduler(name)
    forward, calls, k = tiny_pipe.unet.forward, [], 2

    def nan_from_step_k(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(1)
        return (out[0] * float("nan"),) if len(calls) > k else out

    tiny_pipe.unet.forward = nan_from_step_k
    tiny_pipe.scheduler.set_timesteps(5)
    t_k = float(tiny_pipe.scheduler.timesteps[k])
    with pytest.raises(NonFiniteError, match=rf"NaN/inf at denoising step {k} of 5 \(timestep t={t_k:g}, .*"
                                             r"diverged model"):
        tiny_pipe("a red circle", num_inference_steps=5, output_type="np")


def test_nan_pixels_from_finite_latents_blame_the_vae(tiny_pipe):
    decode = tiny_pipe.vae.decode
    tiny_pipe.vae.decode = lambda z, **kwargs: (decode(z, **kwargs)[0] * float("inf"),)  # a float16 overflow, say
    with pytest.raises(NonFiniteError, match="the VAE decoded finite latents to NaN/inf pixels.*float16 overflow"):
        tiny_pipe("a red circle", num_inference_steps=2, output_type="pt")
    assert tiny_pipe("a red circle", num_inference_steps=2, output_type="latent").images.isfinite().all()


def test_raw_zero_snr_scheduler_object_is_named_as_the_cause(zero_snr_folder):
    pipe = Pipeline.from_pretrained(zero_snr_folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_scheduler(EulerDiscreteScheduler.from_config(pipe.scheduler.config))  # no clamp: sigma_max = inf
    with pytest.raises(NonFiniteError, match=r"step 0 of 3 \(timestep t=999, EulerDiscreteScheduler\); likely "
                                             r"cause: the schedule has zero terminal SNR"):
        pipe("a red circle", num_inference_steps=3)
