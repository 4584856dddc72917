"""LPIPS(vgg): the perceptual distance of Zhang et al. 2018 (arXiv:1801.03924), loaded from two local files.

Files (safetensors; pickled .pth only with allow_pickle):
- the VGG16 trunk: torchvision's ImageNet VGG16 (`vgg16-397923af.pth` from download.pytorch.org/models, keys
  `features.N.weight/bias`; its `classifier.*` keys are ignored);
- the linear heads: the LPIPS v0.1 `vgg.pth` (github.com/richzhang/PerceptualSimilarity, lpips/weights/v0.1,
  keys `lin0.model.1.weight` ... `lin4.model.1.weight`).
Convert a .pth once: `safetensors.torch.save_file(torch.load(p, weights_only=True), p[:-4] + ".safetensors")`.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.folders import load_state_dict

# torchvision's VGG16 `features` (config "D"), cut after relu5_3: conv widths, "M" = 2x2 max-pool
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (4, 9, 16, 23, 30)           # ends of the slices giving relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
TRUNK_FILE = "lpips_vgg_weights: torchvision's VGG16 (vgg16-397923af.pth from download.pytorch.org/models)"
HEADS_FILE = "lpips_weights: the LPIPS v0.1 linear heads (lpips/weights/v0.1/vgg.pth from " \
             "github.com/richzhang/PerceptualSimilarity)"


def vgg16_features() -> nn.Sequential:
    """Returns VGG16's conv layers up to relu5_3 with torchvision's layer indices (random init)."""
    layers, channels = [], 3
    for width in VGG16_LAYERS:
        if width == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """d(x0, x1) = sum_l mean_hw || w_l * (f_l(x0) - f_l(x1)) ||^2 over unit-normalised VGG features (Eq. 1,
    Zhang et al. 2018). Inputs (B, 3, H, W) in [-1, 1]; returns (B,)."""

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        self.lin = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        # the LPIPS package's ScalingLayer: [-1, 1] inputs to ImageNet-normalised ones
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Returns the five ReLU outputs, each normalised to unit length over channels."""
        out, h, start = [], (x - self.shift) / self.scale, 0
        for end in TAPS:
            h = self.features[start:end](h)
            out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))  # (B, C_l, H_l, W_l)
            start = end
        return out

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for lin, f in zip(self.lin, self.taps(torch.cat([x0, x1]))):  # one trunk pass: (2B, C_l, H_l, W_l)
            f0, f1 = f.chunk(2)  # (B, C_l, H_l, W_l) each
            total = total + lin((f0 - f1).pow(2)).mean(dim=(1, 2, 3))  # spatial mean of the 1x1 head: (B,)
        return total


def _check(state: dict, expected: dict, ignored: tuple, which: str, path: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in state if k not in expected and not k.startswith(ignored))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})" for k in sorted(expected)
             if k in state and state[k].shape != expected[k].shape]
    problems = [f"{label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
    if problems:
        raise ValueError(f"{path} is not the file {which} expects ({'; '.join(problems)}). Expected {which}.")


def load_lpips(heads_path: str, trunk_path: str, allow_pickle: bool = False) -> LPIPS:
    """Returns a frozen LPIPS with the VGG16 trunk from `trunk_path` and the linear heads from `heads_path`."""
    if not heads_path or not trunk_path:
        raise ValueError(f"LPIPS needs two files: {HEADS_FILE}; and {TRUNK_FILE}. Got lpips_weights="
                         f"{heads_path!r}, lpips_vgg_weights={trunk_path!r}; without the trunk file LPIPS would "
                         "compare random VGG features")
    model = LPIPS()
    trunk = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    heads = {f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(model.lin)}
    trunk_state = load_state_dict(trunk_path, allow_pickle=allow_pickle)
    _check(trunk_state, trunk, ("classifier.",), TRUNK_FILE, trunk_path)
    heads_state = load_state_dict(heads_path, allow_pickle=allow_pickle)
    _check(heads_state, heads, (), HEADS_FILE, heads_path)
    model.features.load_state_dict({k[len("features."):]: trunk_state[k] for k in trunk})
    for i, lin in enumerate(model.lin):
        lin.weight.data.copy_(heads_state[f"lin{i}.model.1.weight"])
    return model.eval().requires_grad_(False)
