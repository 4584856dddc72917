"""Predict the noise eps (Ho et al. 2020, Eq. 14; DDPM and Stable Diffusion 1.x)."""
import torch

from ldm import diffusion
from ldm.objectives import register
from ldm.objectives.base import VPDiffusion


@register
class EpsilonPrediction(VPDiffusion):
    name = prediction_type = "epsilon"

    def target(self, x0, noise, t):
        return noise

    def x0_and_eps(self, prediction, x_t, a):
        return diffusion.eps_to_x0(prediction, x_t, a), prediction

    def eps_loss_factor(self, snr_t):
        return torch.ones_like(snr_t)
