"""The models of benchmarks/compare_drift.py (issue #35): what each case is, how its model folder is built, and its
training through the one training loop (ldm.training.train_ldm.main), with or without a training remedy.

A case is a data set, a space and a denoiser size:
    digits-pixel-under   digits in pixel space, 8x8 RGB, black background (-1 in most pixels), an under-capacity UNet
    digits-pixel         the same with the `small` preset's UNet: the adequate-capacity control
    digits-latent-under  digits at 32 px through the small VAE (4x8x8 latents), the same under-capacity UNet
    digits               digits, latent, the `small` preset's UNet (the demo's), trained as compare_objectives does
    shapes               the demo's shapes, latent, `small`; single shapes captioned in 8 of 12 wordings (the other
                         4 are the held-out wordings graded)
Pixel space needs no second loop: the model folder's "VAE" is never run. Training takes the images themselves as
cached posterior means (logvar -30: a draw is the image to 1e-6) with scaling factor 1, so train_ldm.main trains on
pixels unchanged; sampling asks the Pipeline for output_type="latent" and those latents are the images
(compare_drift.sample). The folder's AutoencoderKL (one level, 3 channels, scale factor 1) only gives the Pipeline
its shapes: decoding through it is not the identity.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import torch

# The training remedies (TrainLDMConfig fields each sets; {} = plain training). Hybrid (L_simple + lambda L_vlb,
# Nichol & Dhariwal 2021) needs learned variances, which ldm's models do not have: not in the list.
TRAINING_REMEDIES = {
    "none": {},
    "input_perturbation": {"input_perturbation": 0.1},               # DDPM-IP, Ning et al. 2023: the paper's gamma
    "self_step": {"self_step_prob": 0.25, "self_step_k": 20},        # the user's idea (issue #35)
    "vlb": {"weighting": "vlb"},                                     # Ho et al. 2020 Eq. (12)'s weights on L_simple
    "huber": {"loss": "huber", "huber_c": 0.1},
    "flow": {"prediction_type": "flow"},                             # the ODE comparison point
}


@dataclass(frozen=True)
class Case:
    name: str
    dataset: str          # digits or shapes
    pixel: bool           # True: pixel space (8x8); False: the small VAE's 4x8x8 latents of 32 px images
    under: bool           # True: the under-capacity UNet
    steps: int            # training steps (fixed)


def cases(under_steps: int, normal_steps: int) -> dict[str, Case]:
    """Returns the cases by name."""
    return {c.name: c for c in (Case("digits-pixel-under", "digits", True, True, under_steps),
                                Case("digits-pixel", "digits", True, False, normal_steps),
                                Case("digits-latent-under", "digits", False, True, under_steps),
                                Case("digits", "digits", False, False, normal_steps),
                                Case("shapes", "shapes", False, False, normal_steps))}


def under_capacity_unet(unet: dict) -> dict:
    """Returns `small`'s UNet kwargs at an eighth of its width (block_out_channels 8, 16; ~1/20 of its
    parameters), the issue's "half a million parameters for 64 px faces" scaled to 8x8 inputs."""
    return dict(unet, block_out_channels=(8, 16), attention_head_dim=(2, 4), norm_num_groups=4)


def model_spec(case: Case):
    """Returns the ModelSpec of a case: `small`, narrowed for under-capacity, 3-channel in and out for pixels."""
    from ldm.models.presets import small

    spec = small()
    unet = under_capacity_unet(spec.unet) if case.under else dict(spec.unet)
    if not case.pixel:
        return replace(spec, name=case.name, unet=unet)
    # A one-level AutoencoderKL: scale factor 1, 3 latent channels, scaling_factor 1 (never run, see the docstring)
    vae = dict(spec.vae, latent_channels=3, block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
               up_block_types=("UpDecoderBlock2D",), sample_size=8, scaling_factor=1.0)
    return replace(spec, name=case.name, resolution=8, unet=dict(unet, in_channels=3, out_channels=3), vae=vae)


def write_model_folder(case: Case, folder: str, seed: int) -> str:
    """Writes the case's randomly initialised pipeline folder (train_ldm's --model) and returns it."""
    from ldm.models.presets import build_components
    from ldm.pipelines import Pipeline

    parts = build_components(model_spec(case), seed=seed)
    Pipeline(parts["vae"], parts["text_encoder"], parts["tokenizer"], unet=parts["unet"],
             scheduler=parts["scheduler"]).save_pretrained(folder)
    return folder


class PixelLatents(torch.utils.data.Dataset):
    """Map-style {"latent_mean": (3, 8, 8) the image in [-1, 1], "latent_logvar": -30, "caption", "captions"}:
    images as train_ldm's cached posteriors, so that its loop trains in pixel space."""

    def __init__(self, pixels):
        self.mean, self.captions, self.options = pixels.pixels, pixels.captions, pixels.options
        self.logvar = torch.full_like(self.mean[:1], -30.0)[0]  # (3, 8, 8)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {"latent_mean": self.mean[i], "latent_logvar": self.logvar, "caption": self.captions[i],
                "captions": self.options[i]}


def pixel_dataset(case: Case, seed: int, num_samples: int, resolution: int):
    """Returns the case's training images as a PixelDataset (ldm.training.demo): the digits train split in its
    canonical wording, white on black (ldm renders them black on white; compare_drift.grade inverts them back),
    or the demo's shapes with the held-out wordings left out."""
    from ldm.data.digits import DigitsDataset
    from ldm.data.transforms import to_tensor
    from ldm.training.demo import PixelDataset

    if case.dataset == "shapes":
        return PixelDataset(num_samples, resolution, seed, 0.1, hold_out_wordings=True)
    digits = DigitsDataset("train", resolution, canonical_captions=True)
    samples = [digits[i] for i in range(len(digits))]
    # -x: white ink on black, as scikit-learn stores them (ink 0 = background): most values saturated at -1
    return PixelDataset.from_tensors(-torch.stack([to_tensor(s["image"]) for s in samples]),  # (N, 3, R, R)
                                     [s["caption"] for s in samples])


def train_config(case: Case, remedy: str, folder: str, vae_dir: str, seed: int):
    """Returns the TrainLDMConfig: the demo's LDM recipe (ldm.training.demo.ldm_config) on the case's model folder,
    the case's steps, plus the training remedy's settings."""
    from ldm.training.demo import DemoConfig, ldm_config

    demo = DemoConfig(out=folder, minutes=60.0, ldm_steps=case.steps, threads=1, seed=seed)
    cfg = replace(ldm_config(demo, vae_dir), model=os.path.join(folder, "init"), vae=vae_dir,
                  report_to="none", validation_every=0, **TRAINING_REMEDIES[remedy])
    cfg.validate()
    return cfg


def train(case: Case, remedy: str, folder: str, vae_dir: str, dataset, seed: int) -> dict:
    """Trains the case's model with `remedy` in `folder`; returns {"pipeline", "val_loss", "steps", "minutes"}."""
    from ldm.training import train_ldm

    started = time.time()
    write_model_folder(case, os.path.join(folder, "init"), seed)
    result = train_ldm.main(train_config(case, remedy, folder, vae_dir, seed), dataset=dataset)
    if result["stopped_by"] in ("SIGTERM", "SIGINT"):
        raise SystemExit(f"{case.name}/{remedy}: training stopped by {result['stopped_by']}; run again to redo it")
    return {"pipeline": os.path.join(result["checkpoint"], "pipeline"),
            "val_loss": result["val"][-1]["val_loss"] if result["val"] else None,
            "steps": result["step"], "minutes": (time.time() - started) / 60}
