"""One diffusion training step's pieces: randomness, text embeddings, latents and the loss.

Randomness (VAE posterior draws, caption picks, tag shuffling and dropout, caption dropout, timesteps, noise)
comes from `step_generator`, a pure function of (seed, step, micro-batch, rank): a resumed run draws exactly what
the uninterrupted run drew.
What is noised, predicted and weighted is the objective's (ldm.objectives); the denoiser is called through
ldm.models.denoiser, so the same step trains a UNet or a transformer.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ldm import diffusion
from ldm.data.captions import CaptionSpec, augment_captions, pick_captions
from ldm.data.masks import latent_mask, loss_weight
from ldm.models import sdxl
from ldm.models.denoiser import denoise
from ldm.models.vae import encode_posterior, sample_latents
from ldm.objectives import Objective, VPDiffusion


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """Returns a CPU generator seeded by (seed, step, micro-batch, rank): every trainer's one source of randomness."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 97 + micro) * 4099 + rank)


@dataclass(frozen=True)
class LossSpec:
    """How a prediction is compared with its target (ldm.diffusion.per_sample_loss) and how the noise is drawn."""
    loss: str = "mse"             # mse | l1 | huber
    huber_c: float = 0.1
    offset_noise: float = 0.0     # Guttenberg 2023; 0 = plain Gaussian noise
    masked_loss: bool = False     # weigh each latent pixel by the batch's loss mask (ldm.data.masks)
    masked_loss_floor: float = 0.0  # the weight where the mask is 0 (0 = ignored)
    # exposure bias (the model's input at sampling time is its own output, not a forward-process x_t)
    input_perturbation: float = 0.0  # DDPM-IP's gamma (ldm.diffusion.input_perturbation); 0 = off
    self_step_prob: float = 0.0   # the share of samples whose x_t is the model's own DDIM step (self_step_input)
    self_step_k: int = 10         # from x_{t+k}, k timesteps noisier

    @classmethod
    def from_config(cls, cfg) -> "LossSpec":
        return cls(cfg.loss, cfg.huber_c, cfg.offset_noise, cfg.masked_loss, cfg.masked_loss_floor,
                   cfg.input_perturbation, cfg.self_step_prob, cfg.self_step_k)


class TextEmbedder:
    """Captions -> CLIP embeddings (B, 77, D); with `cache`, each distinct cacheable caption is encoded once.

    With SDXL's second encoder and tokenizer (text_encoder_2, tokenizer_2), `encode` returns both encoders'
    penultimate states concatenated (B, 77, D1 + D2) and the second's pooled embedding (B, D2)
    (ldm.models.sdxl.encode_text), and the cache keeps both.
    The cache is unbounded, so only captions from a finite set belong in it: the data's own captions and "".
    Captions changed by tag shuffling or dropout (ldm.data.captions) are combinatorially many and rarely seen
    twice: callers pass them as not `cacheable`, and they are encoded every time and never stored.
    """

    def __init__(self, text_encoder, tokenizer, cache: bool = False, text_encoder_2=None, tokenizer_2=None):
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("SDXL's text embedder needs both text_encoder_2 and tokenizer_2 (or neither)")
        self.text_encoder, self.tokenizer, self.cache = text_encoder, tokenizer, {} if cache else None
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.warned_cut = False  # a caption past the text encoder's window is cut, with one warning per run

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def _ids(self, tokenizer, captions: list[str], device) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)  # (B, 77)

    def _encode(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.warned_cut:
            self._warn_if_cut(captions, self.tokenizer.model_max_length)
        ids = self._ids(self.tokenizer, captions, device)  # (B, 77)
        if not self.is_sdxl:
            return self.text_encoder(ids)[0], None  # (B, 77, D)
        return sdxl.encode_text(self.text_encoder, self.text_encoder_2, ids,
                           self._ids(self.tokenizer_2, captions, device))  # (B, 77, D1 + D2), (B, D2)

    def _warn_if_cut(self, captions: list[str], window: int) -> None:
        """Warns, once, when a caption has more tokens than the text encoder reads: training sees its first
        window only (as Stable Diffusion's training does), where sampling reads long prompts whole."""
        cut = [c for c, ids in zip(captions, self.tokenizer(captions, verbose=False).input_ids) if len(ids) > window]
        if cut:
            self.warned_cut = True
            warnings.warn(f"a caption has more than the {window - 2} tokens the text encoder reads, and training "
                          f"sees only its first {window - 2}: {cut[0][:120]!r}; shorten such captions (this "
                          "warning shows once per run)", stacklevel=4)

    def __call__(self, captions: list[str], device, cacheable: list[bool] | None = None) -> torch.Tensor:
        """Returns the embeddings (B, 77, D); `cacheable` (default all) says which captions may use the cache."""
        return self.encode(captions, device, cacheable)[0]

    def encode(self, captions: list[str], device,
               cacheable: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (embeddings (B, 77, D), pooled embeddings (B, D2) for SDXL, else None)."""
        if self.cache is None:
            return self._encode(captions, device)
        cacheable = [True] * len(captions) if cacheable is None else cacheable
        missing = sorted({c for c, ok in zip(captions, cacheable) if ok and c not in self.cache})
        fresh = [c for c, ok in zip(captions, cacheable) if not ok]
        fresh_rows = iter(())
        if missing or fresh:
            with torch.no_grad():
                context, pooled = self._encode(missing + fresh, device)  # (M + F, 77, D), (M + F, D2) or None
            rows = list(zip(context, pooled if pooled is not None else [None] * len(context)))
            self.cache.update(zip(missing, rows))
            fresh_rows = iter(rows[len(missing):])
        rows = [self.cache[c] if ok else next(fresh_rows) for c, ok in zip(captions, cacheable)]
        context = torch.stack([r[0] for r in rows])  # (B, 77, D)
        return context, (torch.stack([r[1] for r in rows]) if self.is_sdxl else None)  # (B, D2)


def batch_captions(batch: dict, caption_spec: CaptionSpec | None, caption_dropout: float | None,
                   generator: torch.Generator) -> tuple[list[str], list[bool]]:
    """Returns (the batch's training captions, which of them may be cached by TextEmbedder).

    In this order, each step drawing only when it can change something: one of each sample's "captions" picked
    (a latent cache keeps them all; a batch of one caption each draws nothing), its tags shuffled and dropped per
    `caption_spec` (None or off: no draw), then whole captions replaced by "" with probability `caption_dropout`
    (None: no draw). A caption that the tag step changed is not cacheable.
    """
    options = batch.get("captions")
    captions = pick_captions(options, generator) if options is not None else list(batch["caption"])
    augmented = augment_captions(captions, caption_spec, generator)
    cacheable = [a == c for a, c in zip(augmented, captions)]
    if caption_dropout is not None:
        augmented = diffusion.drop_captions(augmented, caption_dropout, generator)
    return augmented, [ok or c == "" for c, ok in zip(augmented, cacheable)]


def batch_latents(batch: dict, vae, generator: torch.Generator, device) -> torch.Tensor:
    """Returns scaled latents z * scaling_factor (B, 4, H/f, W/f), drawn from the VAE posterior.

    Takes cached posteriors ("latent_mean", "latent_logvar") when the batch has them, else encodes "pixel_values".
    """
    if "latent_mean" in batch:
        mean = batch["latent_mean"].to(device, non_blocking=True)  # pinned batches: the copies overlap compute
        logvar = batch["latent_logvar"].to(device, non_blocking=True)
    else:
        mean, logvar = encode_posterior(vae, batch["pixel_values"])
    return sample_latents(mean.float(), logvar.float(), generator, vae.config.scaling_factor)


def batch_time_ids(batch: dict, latents: torch.Tensor, vae) -> torch.Tensor:
    """Returns SDXL's micro-conditioning (B, 6) of a batch: each image's original size and crop top-left (the
    batch's "original_size", "crop_top_left" (B, 2), recorded by ldm.data.transforms; without them, the crop's
    own size and (0, 0)) and the target size = the crop's size (Podell et al. 2023, Sec. 2.2)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    target = (latents.shape[-2] * factor, latents.shape[-1] * factor)  # (h, w) in pixels
    count = latents.shape[0]
    original = batch.get("original_size", torch.tensor([target] * count))  # (B, 2)
    crop = batch.get("crop_top_left", torch.zeros(count, 2, dtype=torch.long))  # (B, 2)
    return torch.stack([sdxl.time_ids(tuple(o.tolist()), tuple(c.tolist()), target, device=latents.device)
                        for o, c in zip(original, crop)])  # (B, 6)


def batch_loss_weight(batch: dict, latents: torch.Tensor, spec: LossSpec) -> torch.Tensor | None:
    """Returns the loss weight per latent pixel (B, 1, h, w) of a batch with loss masks (cached "latent_mask", or
    pixel "mask" averaged over each latent cell) when spec.masked_loss; None (every pixel weighs 1) otherwise."""
    if not spec.masked_loss or ("latent_mask" not in batch and "mask" not in batch):
        return None
    mask = batch["latent_mask"] if "latent_mask" in batch else latent_mask(batch["mask"], tuple(latents.shape[-2:]))
    return loss_weight(mask.to(latents.device, torch.float32), spec.masked_loss_floor)  # (B, 1, h, w)


def diffusion_loss(model, latents: torch.Tensor, context: torch.Tensor, objective: Objective, spec: LossSpec,
                   generator: torch.Generator, pooled: torch.Tensor | None = None,
                   time_ids: torch.Tensor | None = None,
                   pixel_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weighted mean loss, unweighted per-sample loss (B,)) of one noised batch. Algorithm 1, Ho et al. 2020,
    with the objective's timesteps, input, target and weights; SDXL's pooled text (B, D2) and time_ids (B, 6)
    go to the denoiser; `pixel_weight` (B, 1, h, w) weighs each latent pixel (masked loss, batch_loss_weight).
    The exposure-bias remedies of `spec`: input perturbation changes the input's noise, not the target's; the self
    step replaces some samples' x_t by the model's own step and their targets accordingly (self_step_input). Each
    off draws nothing from `generator`, so a run without them is unchanged bit for bit."""
    t = objective.sample_timesteps(latents.shape[0], generator)  # (B,)
    noise = diffusion.offset_noise(torch.randn(latents.shape, generator=generator), spec.offset_noise, generator)
    input_noise = diffusion.input_perturbation(noise, spec.input_perturbation, generator)  # (B, C, h, w)
    t, noise, input_noise = t.to(latents.device), noise.to(latents.device), input_noise.to(latents.device)
    x_t, target = objective.noised(latents, input_noise, t), objective.target(latents, noise, t)
    if spec.self_step_prob > 0:
        chosen = torch.rand(latents.shape[0], generator=generator) < spec.self_step_prob  # (B,), on the CPU
        if chosen.any():
            cond = (context, pooled, time_ids)
            x_t, target = self_step_input(model, latents, input_noise, t, chosen.to(latents.device), cond, objective,
                                          spec.self_step_k, x_t, target)
    pred = denoise(model, x_t, objective.model_time(t), context, pooled, time_ids)
    per_sample = diffusion.per_sample_loss(pred, target, spec.loss, spec.huber_c, pixel_weight)  # (B,)
    return (objective.weight(t).to(per_sample) * per_sample).mean(), per_sample.detach()


def self_step_input(model, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, chosen: torch.Tensor,
                    cond: tuple, objective: Objective, k: int, x_t: torch.Tensor,
                    target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x_t, target), each (B, C, h, w), with the `chosen` rows (B,) bool replaced: x_t made by one DDIM
    step (eta = 0; Eq. (12), Song et al. 2021, arXiv:2010.02502) of the current model from x_{t+k} (the same x0
    and noise, t + k clamped to T - 1), under no_grad, so the gradient flows through the prediction at x_t only.

    The user's idea of issue #35 ("train on the model's own previous step"), a research setting. The target is the
    objective's target for the noise consistent with (x0, that x_t), eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t):
    the prediction that maps the model's own x_t back to the true x0, so the model learns to undo its drift
    (training toward the original eps would instead teach it the forward x_t's noise at an input that is not
    that x_t). With an exact model the step lands on the forward x_t and the target is the plain one."""
    if not isinstance(objective, VPDiffusion):  # a DDIM step needs (x0, eps) of a variance-preserving prediction
        raise ValueError(f"self_step_prob applies to the diffusion objectives (epsilon, v_prediction, sample), not to "
                         f"prediction_type {objective.name}; set --self-step-prob 0")
    rows = chosen.nonzero().squeeze(1)  # (n,)
    t_next = (t[rows] + k).clamp(max=objective.schedule.num_train_timesteps - 1)  # (n,)
    x_next = objective.noised(latents[rows], noise[rows], t_next)  # (n, C, h, w)
    context, pooled, time_ids = (c[rows] if c is not None else None for c in cond)
    with torch.no_grad():
        pred = denoise(model, x_next, objective.model_time(t_next), context, pooled, time_ids)
        parts = objective.parameterisations(pred.float(), x_next, objective.schedule.alpha_bar.to(t.device)[t_next])
        x_self = objective.noised(parts["x0"], parts["eps"], t[rows])  # DDIM: x0_pred, eps_pred re-noised at t
    a_t = diffusion.broadcast_alpha_bar(objective.schedule.alpha_bar.to(t.device)[t[rows]], x_self)  # (n, 1, 1, 1)
    implied_noise = diffusion.x0_to_eps(latents[rows], x_self, a_t)  # (n, C, h, w)
    x_t, target = x_t.clone(), target.clone()
    x_t[rows], target[rows] = x_self.to(x_t.dtype), objective.target(latents[rows], implied_noise, t[rows]).to(target)
    return x_t, target


def batch_loss(accelerator, model, batch: dict, vae, embed: TextEmbedder, objective: Objective, spec: LossSpec,
               generator: torch.Generator, caption_dropout: float | None = None,
               channels_last: bool = False, caption_spec: CaptionSpec | None = None) -> torch.Tensor:
    """Returns the weighted diffusion loss of a batch of images or cached posteriors with captions: latents drawn
    from the posterior, captions picked, tag-augmented per caption_spec and dropped with probability caption_dropout
    (`batch_captions`; None or off: no draw at all; SDXL encodes a dropped caption "" with both encoders, as
    diffusers' train_text_to_image_sdxl.py does), embedded, noised and predicted, each latent pixel weighed by the
    batch's loss mask with spec.masked_loss (`batch_loss_weight`). Every LDM trainer's loss
    (`ldm train`, `ldm finetune`, the demo) is this function."""
    # The frozen VAE and text encoder run in the mixed-precision dtype too (diffusers' script casts their weights;
    # autocast leaves the stored weights in float32): in fp32 the VAE encode of a large batch would cost more than
    # the denoiser's step on a GPU.
    with accelerator.autocast():
        latents = batch_latents(batch, vae, generator, accelerator.device)  # (B, 4, h, w), float32
        captions, cacheable = batch_captions(batch, caption_spec, caption_dropout, generator)
        context, pooled = embed.encode(captions, accelerator.device, cacheable)  # (B, 77, D), SDXL: (B, D2)
    time_ids = batch_time_ids(batch, latents, vae) if embed.is_sdxl else None  # (B, 6)
    if channels_last:
        latents = latents.contiguous(memory_format=torch.channels_last)
    return diffusion_loss(model, latents, context, objective, spec, generator, pooled, time_ids,
                          batch_loss_weight(batch, latents, spec))[0]
