"""Predict v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho 2022, Sec. 4; Stable Diffusion 2.x)."""
from ldm.objectives import register
from ldm.objectives.base import VPDiffusion


@register
class VPrediction(VPDiffusion):
    name = "v_prediction"
