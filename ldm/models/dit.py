"""A text-conditioned latent diffusion transformer (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers", arXiv:2212.09748), with the four ways of conditioning that the paper compares (its Sec. 3.2):

    in_context        the timestep and the prompt's tokens are extra tokens in the image sequence
    cross_attention   every block also attends to [timestep token, prompt tokens]
    adaln             LayerNorms whose scale and shift are regressed from c = time + pooled prompt
    adaln_zero        adaLN plus a per-branch gate, the gates and the output layer initialised to zero (DiT's choice)

    model = LatentDiT(sample_size=32, num_layers=28, num_attention_heads=16, attention_head_dim=72,
                      cross_attention_dim=768, conditioning="adaln_zero")      # DiT-XL/2 at 256 px, text c
    eps = model(latents, t, text_context)                                     # (B, 4, 32, 32)

Notation: x = image tokens (B, N, D), N = (h/p)(w/p) patches of p x p latent pixels, D = heads x head_dim;
c = conditioning vector (B, D); the prompt arrives as CLIP token embeddings (B, L, E).

Why our own module: diffusers' DiTTransformer2DModel is class-conditional only (its adaLN-Zero blocks embed a
class label and the timestep again in every block), and PixArtTransformer2DModel implements only PixArt-alpha's
combination (cross-attention to the prompt, adaLN-single from the timestep alone), which `ldm` uses as it is for
the `pixart` presets (ldm.models.denoiser adapts its call). The pieces are diffusers' (Attention, FeedForward,
PatchEmbed with fixed 2-D sin-cos positions, Timesteps/TimestepEmbedding, TextTimeEmbedding's attention pooling,
PixArtAlphaTextProjection), so LoRA targets, attention processors and SDPA behave as in diffusers' models, and
the `transformer/` folder we save opens with `LatentDiT.from_pretrained` (diffusers' ModelMixin).
"""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import (PatchEmbed, PixArtAlphaTextProjection, TextTimeEmbedding, TimestepEmbedding,
                                         Timesteps)
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import scale_lora_layers, unscale_lora_layers
from torch import nn

CONDITIONINGS = ("in_context", "cross_attention", "adaln", "adaln_zero")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) normalised, then scaled and shifted per sample by (B, D) vectors (DiT eq. in Sec. 3.2)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Self-attention and an MLP, each a pre-norm residual branch; cross-attention between them for
    `cross_attention`; LayerNorms modulated by c for the adaLN kinds (gated branches for adaln_zero)."""

    def __init__(self, dim: int, heads: int, head_dim: int, conditioning: str, mlp_ratio: float, eps: float):
        super().__init__()
        self.conditioning = conditioning
        modulated = conditioning in ("adaln", "adaln_zero")
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=not modulated)
        self.attn = Attention(dim, heads=heads, dim_head=head_dim, bias=True, out_bias=True)
        if conditioning == "cross_attention":
            self.norm_cross = nn.LayerNorm(dim, eps=eps)
            self.cross_attn = Attention(dim, cross_attention_dim=dim, heads=heads, dim_head=head_dim, bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=not modulated)
        self.ff = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu-approximate", bias=True)
        if modulated:  # (shift, scale[, gate]) for each of the two branches, regressed from c
            chunks = 6 if conditioning == "adaln_zero" else 4
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None, context: torch.Tensor | None) -> torch.Tensor:
        if self.conditioning not in ("adaln", "adaln_zero"):
            x = x + self.attn(self.norm1(x))
            if self.conditioning == "cross_attention":
                x = x + self.cross_attn(self.norm_cross(x), encoder_hidden_states=context)
            return x + self.ff(self.norm2(x))
        mod = self.modulation(c).chunk(6 if self.conditioning == "adaln_zero" else 4, dim=1)
        gate_attn, gate_ff = (mod[4][:, None], mod[5][:, None]) if len(mod) == 6 else (1.0, 1.0)
        x = x + gate_attn * self.attn(modulate(self.norm1(x), mod[0], mod[1]))
        return x + gate_ff * self.ff(modulate(self.norm2(x), mod[2], mod[3]))


class LatentDiT(ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    """Patchify, transformer blocks, unpatchify; conditioned on the timestep and the prompt (see module doc).

    Called as forward(latents (B, C, h, w), time (B,) or scalar, text_context (B, L, E), pooled_text=None);
    returns the prediction (B, out_channels, h, w). h and w may differ from sample_size (positions are
    interpolated); both must be multiples of patch_size. pooled_text is not used: the adaLN kinds pool the prompt's
    tokens themselves (attention pooling, learned with the model), as the `small` UNet does.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]

    @register_to_config
    def __init__(self, sample_size: int = 32, patch_size: int = 2, in_channels: int = 4, out_channels: int = 4,
                 num_layers: int = 28, num_attention_heads: int = 16, attention_head_dim: int = 72,
                 cross_attention_dim: int = 768, conditioning: str = "adaln_zero", mlp_ratio: float = 4.0,
                 frequency_embedding_size: int = 256, text_pool_heads: int = 8, norm_eps: float = 1e-6):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {', '.join(CONDITIONINGS)}, got {conditioning!r}")
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not a multiple of patch_size {patch_size}")
        dim = num_attention_heads * attention_head_dim
        self.gradient_checkpointing = False
        self.patch_embed = PatchEmbed(height=sample_size, width=sample_size, patch_size=patch_size,
                                      in_channels=in_channels, embed_dim=dim)  # fixed sin-cos positions (a buffer)
        self.time_proj = Timesteps(frequency_embedding_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(frequency_embedding_size, dim)
        if conditioning in ("adaln", "adaln_zero"):  # c = time embedding + attention-pooled prompt
            self.text_pool = TextTimeEmbedding(cross_attention_dim, dim, num_heads=text_pool_heads)
            self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        else:  # the prompt as tokens of the model's width
            self.text_proj = PixArtAlphaTextProjection(cross_attention_dim, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, num_attention_heads, attention_head_dim, conditioning, mlp_ratio,
                                             norm_eps) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=conditioning not in ("adaln", "adaln_zero"))
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: Xavier-uniform linears, zero biases, N(0, 0.02) time MLP; zero output layer, and for
        adaln_zero zero modulations, so that every block starts as the identity."""
        def xavier(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(xavier)
        conv = self.patch_embed.proj
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)
        for linear in (self.time_embed.linear_1, self.time_embed.linear_2):
            nn.init.normal_(linear.weight, std=0.02)
        zero = [self.proj_out]
        if self.config.conditioning == "adaln_zero":
            zero += [block.modulation[-1] for block in self.blocks] + [self.final_modulation[-1]]
        for linear in zero:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def unpatchify(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, N, p*p*C) tokens -> (B, C, height, width) latents."""
        p, channels = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], height // p, width // p, p, p, channels)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], channels, height, width)

    def forward(self, latents: torch.Tensor, time: torch.Tensor, text_context: torch.Tensor,
                pooled_text: torch.Tensor | None = None, cross_attention_kwargs: dict | None = None) -> torch.Tensor:
        lora_scale = (cross_attention_kwargs or {}).get("scale")  # as the UNet's: weights every LoRA layer
        if lora_scale is not None:
            scale_lora_layers(self, lora_scale)
        try:
            return self._forward(latents, time, text_context)
        finally:
            if lora_scale is not None:
                unscale_lora_layers(self, lora_scale)

    def _forward(self, latents: torch.Tensor, time: torch.Tensor, text_context: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = latents.shape
        x = self.patch_embed(latents)  # (B, N, D)
        time = torch.as_tensor(time, device=latents.device).reshape(-1).expand(batch)
        t = self.time_embed(self.time_proj(time).to(x.dtype))  # (B, D)
        c, context, kind = None, None, self.config.conditioning
        if kind in ("adaln", "adaln_zero"):
            c = t + self.text_pool(text_context.to(x.dtype))
        else:
            context = torch.cat([t[:, None], self.text_proj(text_context.to(x.dtype))], dim=1)  # (B, 1 + L, D)
        if kind == "in_context":
            x = torch.cat([context, x], dim=1)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c, context)
            else:
                x = block(x, c, context)
        if kind == "in_context":
            x = x[:, context.shape[1]:]
        x = self.norm_out(x)
        if c is not None:
            shift, scale = self.final_modulation(c).chunk(2, dim=1)
            x = modulate(x, shift, scale)
        return self.unpatchify(self.proj_out(x), height, width)
