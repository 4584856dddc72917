"""Image feature extractors for FID / KID, loaded only from local weights files.

    extractor = load_feature_extractor("inception", "~/.cache/ldm/inception_v3_google-0cc3c7bd.pth")
    features = extract_features(extractor, images)      # images (N, 3, H, W) in [0, 1] -> (N, 2048)

"inception": torchvision's Inception v3 (pool3, 2048 features) from its ImageNet weights file. Published FIDs use
the TensorFlow graph's weights (pytorch-fid's FIDInceptionA..E), so our numbers compare across our own runs but
differ slightly from papers'. "tiny": a small CNN (TinyFeatureNet) for tests and smoke runs.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
INCEPTION_ENV = "LDM_INCEPTION_WEIGHTS"
DEFAULT_INCEPTION_PATH = os.path.join("~", ".cache", "ldm", "inception_v3_google-0cc3c7bd.pth")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TinyFeatureNet(nn.Module):
    """Three strided convolutions and a global average pool: (N, 3, H, W) in [0, 1] -> (N, dim)."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.SiLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.SiLU(),
                                 nn.Conv2d(32, dim, 3, 2, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1).mean(dim=(2, 3))                  # (N, dim)


class InceptionFeatures(nn.Module):
    """Inception v3's 2048-d pooled features of images (N, 3, H, W) in [0, 1], resized to 299 px."""

    def __init__(self, state_dict: dict):
        super().__init__()
        from torchvision.models.inception import Inception3

        self.net = Inception3(aux_logits="AuxLogits.fc.weight" in state_dict, init_weights=False)
        self.net.load_state_dict(state_dict)
        self.net.fc = nn.Identity()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)                       # (N, 2048)


def read_state_dict(path: str) -> dict:
    """Returns the tensors of a .safetensors or torch (.pt/.pth, loaded weights_only) file."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def resolve_weights(kind: str, path: str | None) -> str:
    """Returns the weights path for a feature extractor: the argument, $LDM_INCEPTION_WEIGHTS or the default
    location; raises FileNotFoundError saying what to download and where to put it."""
    if kind == "inception":
        path = path or os.environ.get(INCEPTION_ENV) or DEFAULT_INCEPTION_PATH
    if path is None:
        raise FileNotFoundError(f"the {kind!r} feature extractor needs a weights file; pass its path")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        hint = (f"download {INCEPTION_URL} (torchvision's Inception v3) and put it at {path}, or pass "
                f"--feature-weights PATH / set {INCEPTION_ENV}; nothing is downloaded for you"
                if kind == "inception" else "save a TinyFeatureNet state dict there (torch.save or safetensors)")
        raise FileNotFoundError(f"feature weights not found at {path}: {hint}")
    return path


def load_feature_extractor(kind: str = "inception", weights: str | None = None) -> nn.Module:
    """Returns the named feature extractor ("inception" or "tiny") in eval mode, from a local weights file."""
    if kind not in ("inception", "tiny"):
        raise ValueError(f"unknown feature extractor {kind!r}; choose 'inception' or 'tiny'")
    state = read_state_dict(resolve_weights(kind, weights))
    if kind == "inception":
        model = InceptionFeatures(state)
    else:
        model = TinyFeatureNet(dim=state["net.4.weight"].shape[0])
        model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Returns features (N, d) of images (N, 3, H, W) in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    device = next(extractor.parameters()).device
    return torch.cat([extractor(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])
