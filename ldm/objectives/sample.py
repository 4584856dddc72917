"""Predict the clean latents x0 directly (diffusers' prediction_type "sample")."""
from ldm.objectives import register
from ldm.objectives.base import VPDiffusion


@register
class SamplePrediction(VPDiffusion):
    name = "sample"
