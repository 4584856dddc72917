"""Predict the clean latents x0 directly (diffusers' prediction_type "sample")."""
from ldm import diffusion
from ldm.objectives import register
from ldm.objectives.base import VPDiffusion


@register
class SamplePrediction(VPDiffusion):
    name = prediction_type = "sample"

    def target(self, x0, noise, t):
        return x0

    def x0_and_eps(self, prediction, x_t, a):
        return prediction, diffusion.x0_to_eps(prediction, x_t, a)

    def eps_loss_factor(self, snr_t):
        return snr_t  # an x0 error e gives an eps error sqrt(SNR) e
