"""Editing an image the user brings: img2img and inpainting, as hooks of the Pipeline's denoising loop.

    pipe("a red circle", image="in.png", strength=0.6)                      # img2img
    pipe("a red circle", image="in.png", mask_image="mask.png")             # inpainting (white = repaint)

img2img (SDEdit, Meng et al. 2022, arXiv:2108.01073): the init image's latents z_0 are noised to the timestep
that `strength` picks, z_t = add_noise(z_0, eps, t_start), and denoised from there; the timesteps are
diffusers' StableDiffusionImg2ImgPipeline.get_timesteps (strength * steps of them, the last ones).
Inpainting, chosen by the denoiser's input channels:
  * any model (in_channels = the latent channels): after every step the latents outside the mask are replaced by
    the original re-noised to the next timestep, z = (1 - m) * add_noise(z_0, eps, t_next) + m * z, as
    diffusers' StableDiffusionInpaintPipeline does with a 4-channel UNet (and A1111's "inpaint with any model");
  * an inpainting UNet (in_channels = 2 * latent + 1, e.g. 9): its input is cat[z_t, mask, z(masked image)],
    as diffusers' StableDiffusionInpaintPipeline and runwayml's stable-diffusion-inpainting.
The mask is preprocessed as diffusers' mask processor does (grayscale, resized to the image, binarised:
>= 0.5 repaints), after an optional Gaussian blur of mask_blur pixels (A1111's "mask blur"). The blurred
(unbinarised) mask is the alpha of the paste-back: the final pixels are the init image's outside the mask,
composited with the result (A1111's default). masked_content="noise" replaces the original's latents under
the mask by the noise before they are noised (A1111's "latent noise"), so nothing of it shows through.

Noise draws, with the call's generator(s), in diffusers' order: the VAE posterior sample of the init image (not
at strength 1 without a mask, nor for an inpainting UNet at strength 1), the noise eps, then (inpainting UNet)
the masked image's posterior sample. With a list of generators, image i is encoded with generator i.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from ldm.objectives import is_flow_scheduler
from ldm.pipelines.checks import check_number
from ldm.ranges import check_multiple

MASKED_CONTENT = ("original", "noise")
IMG2IMG_STRENGTH, INPAINT_STRENGTH = 0.8, 1.0  # diffusers' defaults when strength=None
MASK_THRESHOLD = 0.5  # diffusers' VaeImageProcessor.binarize: mask values >= 0.5 are repainted


def open_image(value, name: str = "image"):
    """Returns a PIL image for a path (opened and converted: RGB for images, kept for masks by the caller), or the
    PIL image / tensor as given; raises ValueError naming the argument when the file is missing or unreadable."""
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not os.path.isfile(path):
            raise ValueError(f"{name}: no file at {path!r}; pass the path of a PNG or JPEG image")
        try:
            with PIL.Image.open(path) as img:
                img.load()
                return img.copy()
        except (PIL.UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{name}: {path!r} is not an image PIL can read ({e}); pass a PNG or JPEG") from e
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim == 3:
            value = value.unsqueeze(0)
        if value.ndim != 4:
            raise ValueError(f"{name}: a tensor must be (B, C, H, W) in [0, 1], got shape {tuple(value.shape)}")
        return value
    raise ValueError(f"{name} must be a path, a PIL image or a (B, C, H, W) tensor in [0, 1], not "
                     f"{type(value).__name__}")


def check_edit_images(image, mask=None) -> None:
    """Raises ValueError when the init image or the mask cannot be read, or when the mask's aspect ratio is not
    the image's (a mask of another size but the same shape is resized to the image)."""
    image = open_image(image, "init_image")
    if mask is None:
        return
    mask = open_image(mask, "mask")
    (h, w), (mh, mw) = pixel_size(image), pixel_size(mask)
    if abs(mh * w - h * mw) > 0.01 * h * w:
        raise ValueError(f"mask is {mw}x{mh} pixels but the init image is {w}x{h}: a mask must have the image's "
                         "shape (white = repaint, black = keep); draw it on the image, or resize it to the image")


def pixel_size(image) -> tuple[int, int]:
    """Returns (height, width) of a PIL image or a (B, C, H, W) tensor."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def default_size(image, factor: int) -> tuple[int, int]:
    """Returns the (height, width) a call without height/width samples an init image at: its own size, rounded
    down to a multiple of the VAE's factor (with a warning); raises ValueError for a side under the factor."""
    height, width = pixel_size(image)
    if height < factor or width < factor:
        raise ValueError(f"image is {width}x{height} pixels; the VAE needs at least {factor}x{factor} (a multiple of "
                         f"{factor} per side): pass a larger image, or height= and width= to resize it")
    rounded = (height - height % factor, width - width % factor)
    if rounded != (height, width):
        warnings.warn(f"image is {width}x{height} pixels, not a multiple of the VAE's factor {factor}: resized to "
                      f"{rounded[1]}x{rounded[0]} (pass height= and width= to choose the size)", stacklevel=3)
    return rounded


def prepare_call(pipe, image, mask_image, strength, mask_blur, masked_content: str, paste_back: bool,
                 height: int | None, width: int | None):
    """Returns (Edit or None, height, width) of a pipeline call: without an image, no edit and the size asked for
    (the model's native size where None); with one, its Edit (prepare_edit) at the size asked for, the image's
    own where None (default_size). Raises ValueError for a mask or strength without an image, and for an
    inpainting model without one.

    image: a PIL image, a (B, 3, H, W) tensor in [0, 1] or a path. strength (None: 0.8 for img2img, 1.0 with a
    mask, diffusers' defaults). mask_image: PIL, tensor or path, white (>= 0.5 after the blur) = repaint."""
    native = pipe.denoiser.config.sample_size * pipe.vae_scale_factor
    if image is None:
        if mask_image is not None:
            raise ValueError("mask_image= needs image=: pass the image to inpaint (the mask's white pixels are "
                             "repainted)")
        if strength is not None:
            raise ValueError("strength= needs image= (img2img): pass the image to start from, or drop strength")
        channels, latent = pipe.denoiser.config.in_channels, pipe.vae.config.latent_channels
        if is_inpainting_model(channels, latent):
            raise ValueError(f"this denoiser is an inpainting model ({channels} input channels): it samples only with "
                             "image= and mask_image= (white = repaint)")
        return None, height or native, width or native
    image = open_image(image, "image")
    if height is None or width is None:
        own_height, own_width = default_size(image, pipe.vae_scale_factor)
        height, width = height or own_height, width or own_width
    check_multiple("height", height, pipe.vae_scale_factor)  # before resizing the image to it
    check_multiple("width", width, pipe.vae_scale_factor)
    return prepare_edit(pipe, image, mask_image, height, width, strength, mask_blur, masked_content,
                        paste_back), height, width


@dataclass
class Edit:
    """One call's edit: the init image and mask, preprocessed, and (after initial_latents) their latents.

    image: (N, 3, H, W) in [-1, 1]. mask: (N, 1, H, W) in {0, 1}, 1 = repaint. soft_mask: the blurred mask
    in [0, 1], paste-back's alpha. concat: the denoiser is an inpainting UNet (cat[z, mask, masked latents]).
    """
    image: torch.Tensor
    mask: torch.Tensor | None
    soft_mask: torch.Tensor | None
    strength: float
    masked_content: str
    paste_back: bool
    concat: bool
    image_latents: torch.Tensor | None = None    # (B, 4, h, w), z_0 of the init image
    noise: torch.Tensor | None = None            # (B, 4, h, w), eps
    latent_mask: torch.Tensor | None = None      # (B, 1, h, w) in {0, 1}
    masked_latents: torch.Tensor | None = None   # (B, 4, h, w), z of the image with the mask zeroed (concat only)

    @property
    def blend(self) -> bool:
        """Whether the latents outside the mask are replaced after every step (inpainting with any model)."""
        return self.mask is not None and not self.concat


def is_inpainting_model(in_channels: int, latent_channels: int) -> bool:
    """Returns whether a denoiser takes cat[latents, mask, masked image latents] (in = 2 * latent + 1)."""
    return in_channels == 2 * latent_channels + 1


def refuse_inpainting_training(parts: dict, command: str) -> None:
    """Raises ValueError when the components' denoiser is an inpainting UNet, which the trainers (text-to-image
    losses, 4-channel inputs) do not train."""
    denoiser = parts.get("unet") if parts.get("unet") is not None else parts.get("transformer")
    channels, latent = denoiser.config.in_channels, parts["vae"].config.latent_channels
    if is_inpainting_model(channels, latent):
        raise ValueError(f"`ldm {command}` trains text-to-image models, and this one is an inpainting model "
                         f"({channels} input channels: latents, mask and masked image latents), which it cannot "
                         "train; train the text-to-image model (e.g. --model tiny, or sd15 instead of sd15-inpaint) "
                         "and inpaint with it: pipe(prompt, image=..., mask_image=...) blends any model's latents")


def prepare_edit(pipe, image, mask_image, height: int, width: int, strength, mask_blur, masked_content: str,
                 paste_back: bool) -> Edit:
    """Returns the call's Edit after checking its arguments: image and mask resized to height x width."""
    concat = is_inpainting_model(pipe.denoiser.config.in_channels, pipe.vae.config.latent_channels)
    if concat and mask_image is None:
        raise ValueError(f"this denoiser is an inpainting model ({pipe.denoiser.config.in_channels} input channels): "
                         "pass mask_image= (white = repaint; an all-white mask repaints everything)")
    default = INPAINT_STRENGTH if mask_image is not None else IMG2IMG_STRENGTH
    strength = check_number("strength", default if strength is None else strength)
    check_number("mask_blur", mask_blur, integer=True)
    if masked_content not in MASKED_CONTENT:
        raise ValueError(f"masked_content={masked_content!r} must be one of {', '.join(MASKED_CONTENT)}: 'original' "
                         "starts the masked area from the re-noised image, 'noise' from noise alone")
    if not isinstance(paste_back, bool):
        raise ValueError(f"paste_back={paste_back!r} must be True or False")
    image = open_image(image, "image")
    if isinstance(image, PIL.Image.Image):
        image = image.convert("RGB")
    pixels = pipe.image_processor.preprocess(image, height=height, width=width).float()  # (N, 3, H, W) in [-1, 1]
    mask = soft = None
    if mask_image is not None:
        soft = preprocess_mask(open_image(mask_image, "mask_image"), height, width, mask_blur)  # (N, 1, H, W)
        mask = (soft >= MASK_THRESHOLD).to(soft.dtype)
    return Edit(pixels, mask, soft, float(strength), masked_content, paste_back, concat)


def preprocess_mask(mask, height: int, width: int, blur: int) -> torch.Tensor:
    """Returns the mask as (N, 1, H, W) in [0, 1] at height x width: grayscale (an RGB tensor is averaged),
    resized, then Gaussian-blurred with sigma = blur pixels (0: no blur)."""
    if isinstance(mask, PIL.Image.Image):
        mask = mask.convert("L").resize((width, height), PIL.Image.LANCZOS)
        mask = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).reshape(1, 1, height, width) / 255.0
    else:
        mask = mask.float()
        if mask.shape[1] != 1:
            mask = mask.mean(1, keepdim=True)  # (N, 1, h0, w0)
        if tuple(mask.shape[-2:]) != (height, width):
            mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
    return gaussian_blur(mask, blur).clamp(0, 1) if blur else mask


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Returns x (N, 1, H, W) blurred by a separable Gaussian of std sigma pixels, kernel width
    2 * round(2.5 sigma) + 1, reflected at the borders (as A1111's mask blur with cv2.GaussianBlur)."""
    radius = int(2.5 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    for dim in (2, 3):
        r = min(radius, x.shape[dim] - 1)  # reflect padding needs a pad below the side
        k = kernel[radius - r: radius + r + 1]
        k = k / k.sum()
        pad = (r, r, 0, 0) if dim == 3 else (0, 0, r, r)
        weight = k.view(1, 1, -1, 1) if dim == 2 else k.view(1, 1, 1, -1)
        x = F.conv2d(F.pad(x, pad, mode="reflect"), weight)
    return x


def strength_steps(steps: int, strength: float) -> int:
    """Returns how many of `steps` an edit runs: int(steps * strength), at most steps (diffusers' init_timestep)."""
    return min(int(steps * strength), steps)


def strength_timesteps(scheduler, timesteps: torch.Tensor, host_timesteps: torch.Tensor, steps: int,
                       strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (timesteps, host copy) from the step that strength picks: the last int(steps * strength) steps,
    as diffusers' StableDiffusionImg2ImgPipeline.get_timesteps (none at strength 0); sets the scheduler's begin
    index there, which sigma samplers' add_noise and step read."""
    t_start = (steps - strength_steps(steps, strength)) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start)
    return timesteps[t_start:], host_timesteps[t_start:]


def noise_to(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Returns x0 noised to timestep t (B,) by the scheduler's forward process (scale_noise for flow samplers:
    x_sigma = sigma * eps + (1 - sigma) * x0)."""
    if is_flow_scheduler(scheduler):
        return scheduler.scale_noise(x0, t, noise)
    return scheduler.add_noise(x0, noise, t)


def encode(vae, pixels: torch.Tensor, count: int, generator) -> torch.Tensor:
    """Returns z = scaling_factor * a sample of the VAE posterior for each of `count` images, (count, 4, h, w):
    the given images (N, 3, H, W) encoded once and repeated, or with a list of generators each image with its own
    (diffusers' order of draws)."""
    pixels = pixels.to(vae.device, vae.dtype)
    if isinstance(generator, list):
        pixels = pixels.repeat(count // pixels.shape[0], 1, 1, 1)  # (count, 3, H, W)
        z = torch.cat([vae.encode(pixels[i: i + 1]).latent_dist.sample(generator[i]) for i in range(count)])
    else:
        z = vae.encode(pixels).latent_dist.sample(generator)  # (N, 4, h, w)
        z = z.repeat(count // z.shape[0], 1, 1, 1)
    return vae.config.scaling_factor * z


def initial_latents(pipe, edit: Edit, shape: tuple, generator, latents: torch.Tensor | None, t_start, dtype,
                    device) -> torch.Tensor:
    """Returns the first latents of an edit, (B, 4, h, w), and stores the image latents, noise and masks on `edit`.

    strength 1 starts from pure noise scaled by init_noise_sigma (the image only enters through the mask), so
    img2img at strength 1 is text-to-image from the same draw; otherwise z_0 noised to t_start (none at
    strength 0: z_0 itself, whose decode is the VAE round trip). `latents`, when given, is the noise eps."""
    count = shape[0]
    if count % edit.image.shape[0]:
        raise ValueError(f"{edit.image.shape[0]} init images cannot be spread over {count} images; pass one image "
                         "or one per prompt")
    pure = edit.strength == 1.0
    if not pure or edit.blend:
        edit.image_latents = encode(pipe.vae, edit.image, count, generator).to(device, dtype)
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype) if latents is None else latents
    edit.noise = noise = noise.to(device, dtype)
    if edit.mask is not None:
        edit.latent_mask = latent_mask(edit.mask, shape).to(device, dtype)  # (B, 1, h, w)
    if edit.concat:
        masked = edit.image * (edit.mask < MASK_THRESHOLD)  # the image with the repainted area zeroed
        edit.masked_latents = encode(pipe.vae, masked, count, generator).to(device, dtype)
    if pure:
        return noise * getattr(pipe.scheduler, "init_noise_sigma", 1.0)
    if t_start is None:
        return edit.image_latents
    x0 = edit.image_latents
    if edit.masked_content == "noise" and edit.mask is not None:
        x0 = (1 - edit.latent_mask) * x0 + edit.latent_mask * noise  # A1111's "latent noise"
    return noise_to(pipe.scheduler, x0, noise, t_start.reshape(1).repeat(count))


def latent_mask(mask: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Returns the binary mask (N, 1, H, W) downsampled to the latents (B, 1, h, w) by nearest neighbour, as
    diffusers' prepare_mask_latents, repeated over the batch."""
    small = F.interpolate(mask, size=tuple(shape[-2:]))  # (N, 1, h, w)
    return small.repeat(shape[0] // small.shape[0], 1, 1, 1)


def model_input(edit: Edit | None, x_scaled: torch.Tensor) -> torch.Tensor:
    """Returns the denoiser's input: x_scaled, or for an inpainting UNet cat[x, mask, masked latents]
    (B, 2 * 4 + 1, h, w)."""
    if edit is None or not edit.concat:
        return x_scaled
    return torch.cat([x_scaled, edit.latent_mask.to(x_scaled), edit.masked_latents.to(x_scaled)], dim=1)


def after_step(edit: Edit | None, scheduler, latents: torch.Tensor, i: int, host_timesteps) -> torch.Tensor:
    """Returns the latents after step i: for inpainting with any model, the original re-noised to the next
    timestep (clean after the last step) outside the mask, the sample inside it."""
    if edit is None or not edit.blend:
        return latents
    original = edit.image_latents
    if i < len(host_timesteps) - 1:
        original = noise_to(scheduler, original, edit.noise, host_timesteps[i + 1].reshape(1))
    return (1 - edit.latent_mask) * original + edit.latent_mask * latents


def paste(edit: Edit | None, decoded: torch.Tensor) -> torch.Tensor:
    """Returns the decoded images (B, 3, H, W) in [-1, 1] with the init image's pixels pasted back outside the
    (blurred) mask: x = (1 - m) * image + m * decoded; unchanged without a mask or paste-back."""
    if edit is None or edit.mask is None or not edit.paste_back:
        return decoded
    count = decoded.shape[0]
    image = edit.image.to(decoded).repeat(count // edit.image.shape[0], 1, 1, 1)
    alpha = edit.soft_mask.to(decoded).repeat(count // edit.soft_mask.shape[0], 1, 1, 1)
    return (1 - alpha) * image + alpha * decoded
