"""Predict the noise eps (Ho et al. 2020, Eq. 14; DDPM and Stable Diffusion 1.x)."""
from ldm.objectives import register
from ldm.objectives.base import VPDiffusion


@register
class EpsilonPrediction(VPDiffusion):
    name = "epsilon"
