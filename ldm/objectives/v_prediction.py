"""Predict v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho 2022, Sec. 4; Stable Diffusion 2.x)."""
from ldm import diffusion
from ldm.objectives import register
from ldm.objectives.base import VPDiffusion


@register
class VPrediction(VPDiffusion):
    name = prediction_type = "v_prediction"

    def target(self, x0, noise, t):
        return diffusion.velocity_at(x0, noise, t, self.schedule.alpha_bar)

    def x0_and_eps(self, prediction, x_t, a):
        return diffusion.v_to_x0_eps(prediction, x_t, a)

    def eps_loss_factor(self, snr_t):
        return diffusion.v_eps_loss_factor(snr_t)
