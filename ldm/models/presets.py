"""Model presets: plain functions returning a `ModelSpec`, collected in `MODEL_PRESETS` (DiT style).

A spec holds the constructor arguments of each component, so every model can be built offline from code:
    spec = MODEL_PRESETS["sd15"]()
    unet = build_denoiser(spec)      # diffusers UNet2DConditionModel, random init
    dit = build_denoiser(get_spec("dit-xl-2"))   # ldm.models.dit.LatentDiT (a transformer/ component)
Latents are always 1/8 of the image side for sd15/sd21 and the DiT-* presets; tiny and small (and their DiT
twins) use fewer VAE levels (see each preset).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDIMScheduler, PixArtTransformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection


@dataclass
class ModelSpec:
    """Everything needed to build a latent diffusion model from nothing."""
    name: str
    resolution: int                      # native image side in pixels
    unet: dict | None                    # UNet2DConditionModel kwargs; None for a transformer backbone
    vae: dict                            # AutoencoderKL kwargs
    text_encoder: dict                   # CLIPTextConfig kwargs
    tokenizer_pad_token: str = "<|endoftext|>"
    scheduler: dict = field(default_factory=dict)  # DDIMScheduler kwargs: the noise schedule, saved with the model
    token_embedding_std: float | None = None       # re-initialise the text encoder's token table N(0, std^2)
    transformer: dict | None = None                # the transformer backbone's kwargs (instead of `unet`)
    transformer_class: str = "LatentDiT"           # or "PixArtTransformer2DModel" (diffusers')
    # SDXL's second text encoder (CLIPTextModelWithProjection kwargs): its penultimate hidden states are
    # concatenated to the first's, and its projected pooled embedding plus the size/crop micro-conditioning
    # (time_ids) reach the UNet's time embedding (Podell et al. 2023, arXiv:2307.01952, Sec. 2.2)
    text_encoder_2: dict | None = None
    tokenizer_2_pad_token: str = "!"
    force_zeros_for_empty_prompt: bool = True     # SDXL base: an empty negative prompt is zeros, not encoded ""

    @property
    def backbone(self) -> str:
        """The denoiser's folder name: "unet" or "transformer"."""
        return "unet" if self.unet is not None else "transformer"

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders, a pooled text embedding and micro-conditioning: the SDXL family."""
        return self.text_encoder_2 is not None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _latent_scheduler(**overrides) -> dict:
    # clip_sample=False: clipping x0 to [-1, 1] suits pixels, not latents (diffusers' DDPM default is True).
    # "trailing" spacing starts sampling at t = T - 1, where the initial N(0, I) noise belongs, and lets any
    # number of steps up to T run (Lin et al. 2023, arXiv:2305.08891, Sec. 3.3); SD's "leading" + steps_offset=1
    # never visits T - 1 and asks for t = T at T steps.
    config = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                  timestep_spacing="trailing")  # trailing ignores steps_offset; 1 keeps diffusers' SD check quiet
    return {**config, **overrides}


def _clip_text(hidden: int, layers: int, heads: int, intermediate: int, act: str = "quick_gelu", **extra) -> dict:
    return dict(vocab_size=49408, max_position_embeddings=77, hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, intermediate_size=intermediate, hidden_act=act,
                projection_dim=extra.pop("projection_dim", hidden), bos_token_id=49406, eos_token_id=49407,
                pad_token_id=extra.pop("pad_token_id", 49407), **extra)


def tiny() -> ModelSpec:
    """A few hundred thousand UNet parameters: unit tests. 64 px images -> 4x8x8 latents."""
    return ModelSpec(
        name="tiny", resolution=64,
        unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  # 8 heads (diffusers' naming) of 4 and 8 channels; kept, as the unit tests' recorded numbers
                  # were measured with it (`small`, the model people train, has 16-channel heads)
                  attention_head_dim=8, norm_num_groups=8),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                 block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64),
        text_encoder=_clip_text(hidden=32, layers=2, heads=4, intermediate=64),
        scheduler=_latent_scheduler(),
    )


def small() -> ModelSpec:
    """The CPU demo model: 32 px images -> 4x8x8 latents (VAE factor 4), trains in minutes on two cores.

    Sized for `ldm demo` on a laptop CPU: the UNet (~1 M parameters) attends to the prompt at 8x8 and 4x4 and
    also adds an attention-pooled prompt embedding to its timestep embedding.
    """
    return ModelSpec(
        name="small", resolution=32,
        unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
                  # diffusers reads attention_head_dim as heads per block (SD 1.x's naming): 2 and 4 heads of 16
                  # channels. Heads of 2-4 channels (16 per block) trained no better and were much slower on the
                  # CPU, whose attention kernels do poorly on such slivers (benchmarks/BENCHMARKS.md, Training).
                  attention_head_dim=(2, 4), norm_num_groups=8,
                  # The prompt also reaches every ResNet block through the time embedding (attention-pooled text,
                  # as in unCLIP / Kandinsky): a global path that learns colour and shape in minutes.
                  addition_embed_type="text", addition_embed_type_num_heads=4),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                 block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, sample_size=32),
        text_encoder=_clip_text(hidden=128, layers=2, heads=4, intermediate=256),
        scheduler=_latent_scheduler(),
        # A text encoder trained from nothing with the UNet, from CLIP's init (token std 0.02, as small as its
        # position table), barely separated "left" from "right", and the demo's position adherence stayed at
        # chance. Tokens drawn at std 1 stay distinct through a frozen random encoder, which fixed it
        # (docs/src/reports/demo.md; `ldm demo` keeps this encoder frozen).
        token_embedding_std=1.0,
    )


def sd15() -> ModelSpec:
    """Stable Diffusion 1.5's architecture: 512 px -> 4x64x64 latents, CLIP ViT-L/14 text encoder (77x768)."""
    return ModelSpec(
        name="sd15", resolution=512,
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=768, attention_head_dim=8),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                 block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215),
        text_encoder=_clip_text(hidden=768, layers=12, heads=12, intermediate=3072),
        scheduler=_latent_scheduler(),
    )


def sd21() -> ModelSpec:
    """Stable Diffusion 2.1's architecture: 768 px v-prediction, OpenCLIP ViT-H/14 text tower (penultimate layer,
    hence 23 layers), linear attention projections, 77x1024 embeddings padded with "!"."""
    return ModelSpec(
        name="sd21", resolution=768,
        unet=dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
        vae=sd15().vae | dict(sample_size=768),
        text_encoder=_clip_text(hidden=1024, layers=23, heads=16, intermediate=4096, act="gelu",
                                projection_dim=512, pad_token_id=0),
        tokenizer_pad_token="!",
        scheduler=_latent_scheduler(prediction_type="v_prediction"),
    )


def sdxl() -> ModelSpec:
    """Stable Diffusion XL base 1.0's architecture: 1024 px -> 4x128x128 latents; CLIP ViT-L/14 (768) and OpenCLIP
    ViT-bigG/14 with projection (1280) read at their penultimate layers and concatenated (77x2048); the UNet's
    time embedding adds bigG's pooled embedding and six size/crop numbers (each 256 sinusoidal channels).
    The VAE is SD's architecture with SDXL's scaling factor."""
    return ModelSpec(
        name="sdxl", resolution=1024,
        unet=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                  cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=1280 + 6 * 256),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                 block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025,
                 force_upcast=True),
        text_encoder=_clip_text(hidden=768, layers=12, heads=12, intermediate=3072),
        text_encoder_2=_clip_text(hidden=1280, layers=32, heads=20, intermediate=5120, act="gelu",
                                  projection_dim=1280, pad_token_id=0),
        scheduler=_latent_scheduler(),
    )


def sdxl_tiny() -> ModelSpec:
    """SDXL's structure at unit-test size (as diffusers' own SDXL tests build it): two 32-wide text encoders
    (64-channel context), a two-level UNet with text_time conditioning, tiny's VAE. 64 px -> 4x8x8 latents."""
    return ModelSpec(
        name="sdxl-tiny", resolution=64,
        unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                  attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8),
        vae=tiny().vae | dict(scaling_factor=0.13025, force_upcast=True),
        text_encoder=_clip_text(hidden=32, layers=2, heads=4, intermediate=37),
        text_encoder_2=_clip_text(hidden=32, layers=2, heads=4, intermediate=37, act="gelu", projection_dim=32,
                                  pad_token_id=0),
        scheduler=_latent_scheduler(),
    )


def inpainting(base: ModelSpec, name: str) -> ModelSpec:
    """Returns `base` as an inpainting model: its UNet takes cat[latents, mask, masked image latents] (4 + 1 + 4
    = 9 channels, runwayml's stable-diffusion-inpainting layout; ldm.pipelines.editing), the rest unchanged."""
    latent = base.vae["latent_channels"]
    return dataclasses.replace(base, name=name, unet=dict(base.unet, in_channels=2 * latent + 1))


def _dit(base: ModelSpec, name: str, layers: int, heads: int, head_dim: int, patch: int = 2,
         conditioning: str = "adaln_zero", **extra) -> ModelSpec:
    """Returns `base` with its UNet replaced by a LatentDiT of this size (latents as the base's VAE makes them)."""
    latent = base.resolution // base.vae_scale_factor
    cross = base.text_encoder["hidden_size"]
    dit = dict(sample_size=latent, patch_size=patch, in_channels=4, out_channels=4, num_layers=layers,
               num_attention_heads=heads, attention_head_dim=head_dim, cross_attention_dim=cross,
               conditioning=conditioning, text_pool_heads=extra.pop("text_pool_heads", 8), **extra)
    return dataclasses.replace(base, name=name, unet=None, transformer=dit, transformer_class="LatentDiT")


def _pixart(base: ModelSpec, name: str, layers: int, heads: int, head_dim: int, patch: int = 2) -> ModelSpec:
    """Returns `base` with diffusers' PixArtTransformer2DModel as its backbone: cross-attention to the prompt's
    tokens (projected from the text encoder's width) and adaLN-single, whose modulation comes from the timestep
    alone (Chen et al. 2023, arXiv:2310.00426). It predicts epsilon only (out_channels 4; PixArt's own also
    learns the variance, 8)."""
    pixart = dict(sample_size=base.resolution // base.vae_scale_factor, patch_size=patch, in_channels=4,
                  out_channels=4, num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim,
                  cross_attention_dim=heads * head_dim, caption_channels=base.text_encoder["hidden_size"],
                  use_additional_conditions=False, norm_type="ada_norm_single", norm_elementwise_affine=False,
                  norm_eps=1e-6)
    return dataclasses.replace(base, name=name, unet=None, transformer=pixart,
                               transformer_class="PixArtTransformer2DModel")


def dit_tiny() -> ModelSpec:
    """tiny's VAE and text encoder with a two-block DiT (patch 2 over 8x8 latents: 16 tokens): unit tests."""
    return _dit(tiny(), "dit-tiny", layers=2, heads=2, head_dim=16, text_pool_heads=4)


def dit_small(conditioning: str = "adaln_zero", name: str = "dit-small") -> ModelSpec:
    """small's VAE and text encoder (32 px -> 4x8x8) with a CPU-sized DiT of the `small` UNet's parameter count
    (test_presets): 4 blocks of width 120 (4 heads of 30), patch 1, so 64 tokens, one per latent pixel."""
    return _dit(small(), name, layers=4, heads=4, head_dim=30, patch=1, conditioning=conditioning)


def pixart_small() -> ModelSpec:
    """dit-small's size with PixArt-alpha's conditioning (diffusers' PixArtTransformer2DModel)."""
    return _pixart(small(), "pixart-small", layers=4, heads=4, head_dim=30, patch=1)


def _dit_256(name: str, layers: int, width: int, heads: int) -> ModelSpec:
    """The DiT paper's configurations (its Table 1) at 256 px (4x32x32 latents, patch 2: 256 tokens), with SD's
    VAE and CLIP ViT-L/14 text encoder; the prompt enters by adaLN-Zero from its attention-pooled embedding."""
    base = dataclasses.replace(sd15(), resolution=256, vae=sd15().vae | dict(sample_size=256))
    return _dit(base, name, layers=layers, heads=heads, head_dim=width // heads)


def dit_s_2() -> ModelSpec:
    return _dit_256("dit-s-2", layers=12, width=384, heads=6)


def dit_b_2() -> ModelSpec:
    return _dit_256("dit-b-2", layers=12, width=768, heads=12)


def dit_l_2() -> ModelSpec:
    return _dit_256("dit-l-2", layers=24, width=1024, heads=16)


def dit_xl_2() -> ModelSpec:
    return _dit_256("dit-xl-2", layers=28, width=1152, heads=16)


def pixart_alpha() -> ModelSpec:
    """PixArt-alpha-XL/2 at 512 px (4x64x64 latents): 28 blocks of width 1152, with SD's VAE; captions come from
    CLIP ViT-L/14 (768 wide) instead of PixArt's T5-XXL (4096), which is not in our dependencies."""
    return _pixart(sd15(), "pixart-alpha", layers=28, heads=16, head_dim=72)


def small_photo() -> ModelSpec:
    """`small` with a 4x wider VAE (block_out_channels 32, 64, 64): the same 4x8x8 latents at 32 px, so its VAE
    serves the `small` UNet (`ldm train --model small --vae ...`). Trained on shapes and photographs it reconstructs
    held-out photographs and art far better than `small`'s (docs/src/reports/vae-recipe.md)."""
    spec = small()
    return dataclasses.replace(spec, name="small-photo", vae=dict(spec.vae, block_out_channels=(32, 64, 64)))


def small_photo_deep() -> ModelSpec:
    """`small-photo` with two resnets per encoder level and three per decoder level (layers_per_block 2; 1.29 M
    parameters): the same 4x8x8 latents, for the longer VAE recipe of docs/src/reports/vae-recipe.md (its cost
    per step: BENCHMARKS.md)."""
    spec = small_photo()
    return dataclasses.replace(spec, name="small-photo-deep", vae=dict(spec.vae, layers_per_block=2))


MODEL_PRESETS = {"tiny": tiny, "small": small, "small-photo": small_photo,
                 "small-photo-deep": small_photo_deep, "sd15": sd15, "sd21": sd21,
                 "sd15-inpaint": lambda: inpainting(sd15(), "sd15-inpaint"),
                 "tiny-inpaint": lambda: inpainting(tiny(), "tiny-inpaint"),
                 "dit-tiny": dit_tiny, "dit-small": dit_small, "pixart-small": pixart_small,
                 "dit-small-in-context": lambda: dit_small("in_context", "dit-small-in-context"),
                 "dit-small-cross-attention": lambda: dit_small("cross_attention", "dit-small-cross-attention"),
                 "dit-small-adaln": lambda: dit_small("adaln", "dit-small-adaln"),
                 "dit-s-2": dit_s_2, "dit-b-2": dit_b_2, "dit-l-2": dit_l_2, "dit-xl-2": dit_xl_2,
                 "pixart-alpha": pixart_alpha, "sdxl": sdxl, "sdxl-tiny": sdxl_tiny}


def get_spec(preset: str | ModelSpec) -> ModelSpec:
    """Returns the spec for a preset name (or the spec itself)."""
    if isinstance(preset, ModelSpec):
        return preset
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[preset]()


def build_unet(spec: ModelSpec) -> UNet2DConditionModel:
    if spec.unet is None:
        raise ValueError(f"preset {spec.name!r} has a transformer backbone, not a UNet; use build_denoiser")
    return UNet2DConditionModel(**spec.unet)


def build_denoiser(spec: ModelSpec) -> torch.nn.Module:
    """Returns the spec's backbone, randomly initialised: a UNet2DConditionModel, a LatentDiT or a
    PixArtTransformer2DModel."""
    if spec.unet is not None:
        return build_unet(spec)
    if spec.transformer_class == "PixArtTransformer2DModel":
        return PixArtTransformer2DModel(**spec.transformer)
    from ldm.models.dit import LatentDiT

    return LatentDiT(**spec.transformer)


def build_vae(spec: ModelSpec) -> AutoencoderKL:
    return AutoencoderKL(**spec.vae)


def build_text_encoder(spec: ModelSpec) -> CLIPTextModel:
    model = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
    if spec.token_embedding_std is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, spec.token_embedding_std)
    return model


def build_text_encoder_2(spec: ModelSpec) -> CLIPTextModelWithProjection | None:
    """Returns SDXL's second text encoder (with its text projection), or None for a one-encoder spec."""
    if spec.text_encoder_2 is None:
        return None
    return CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_encoder_2))


def build_scheduler(spec: ModelSpec) -> DDIMScheduler:
    """Returns the folder's default sampler; any other (ldm.pipelines.schedulers) is made from its config."""
    return DDIMScheduler(**spec.scheduler)


def build_components(preset: str | ModelSpec, seed: int = 0) -> dict:
    """Returns {"unet" or "transformer", "vae", "text_encoder", "tokenizer", "scheduler"}, randomly initialised
    from `seed`; an SDXL spec adds "text_encoder_2" and "tokenizer_2"."""
    from ldm.models.tokenizer import build_clip_tokenizer

    spec = get_spec(preset)
    torch.manual_seed(seed)
    parts = dict(**{spec.backbone: build_denoiser(spec)}, vae=build_vae(spec), text_encoder=build_text_encoder(spec),
                 tokenizer=build_clip_tokenizer(pad_token=spec.tokenizer_pad_token), scheduler=build_scheduler(spec))
    if spec.is_sdxl:
        parts.update(text_encoder_2=build_text_encoder_2(spec),
                     tokenizer_2=build_clip_tokenizer(pad_token=spec.tokenizer_2_pad_token))
    return parts


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
