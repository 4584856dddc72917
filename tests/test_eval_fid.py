"""FID / KID from local weights: zero for identical folders, positive for different ones; the math against closed forms."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.evaluation.features import (InceptionFeatures, TinyFeatureNet, extract_features, load_feature_extractor,
                                     resolve_weights)
from ldm.evaluation.fid import fid_from_features, frechet_distance, kernel_inception_distance
from ldm.evaluation.images import load_image_folder
from ldm.evaluation.memorization import memorization_report


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_folder(path, seed, count=24, kind="noise"):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        if kind == "noise":
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        else:  # smooth colour fields: a different distribution
            pixels = np.full((32, 32, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path / f"{i:03d}.png")
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    return {"a": _write_folder(root / "a", 0), "a_copy": _write_folder(root / "a_copy", 0),
            "b": _write_folder(root / "b", 1, kind="flat")}


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny_features.pt"
    torch.save(TinyFeatureNet(dim=16).state_dict(), path)
    return str(path)


def test_frechet_distance_closed_form():
    # diagonal covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_sqrtm_formula():
    from scipy import linalg

    g = np.random.default_rng(0)
    a, b = g.normal(size=(50, 8)), g.normal(size=(40, 8)) @ g.normal(size=(8, 8)) + 0.5
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)


def test_kid_unbiased_near_zero_for_same_distribution_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    same, _ = kernel_inception_distance(x, y, subsets=5, subset_size=200)
    shifted, _ = kernel_inception_distance(x, y + 1.0, subsets=5, subset_size=200)
    assert abs(same) < 0.05 and shifted > 0.5


def test_fid_kid_zero_for_identical_folders_positive_for_different(folders, tiny_weights):
    extractor = load_feature_extractor("tiny", tiny_weights)
    features = {k: extract_features(extractor, load_image_folder(v)) for k, v in folders.items()}
    assert features["a"].shape == (24, 16)
    assert fid_from_features(features["a"], features["a_copy"]) == pytest.approx(0.0, abs=1e-6)
    kid_same, _ = kernel_inception_distance(features["a"], features["a_copy"], subsets=3)
    kid_diff, _ = kernel_inception_distance(features["a"], features["b"], subsets=3)
    fid_diff = fid_from_features(features["a"], features["b"])
    # identical sets: the unbiased estimate with full subsets is known exactly, 2 (S - D) / (m (m - 1)) - 2 S / m^2
    # (S: sum of the kernel matrix, D: its trace), a hair below zero
    x = features["a"].double()
    k = (x @ x.T / x.shape[1] + 1) ** 3
    m, total, trace = len(x), k.sum().item(), k.trace().item()
    assert kid_same == pytest.approx(2 * (total - trace) / (m * (m - 1)) - 2 * total / m ** 2, rel=1e-6)
    assert fid_diff > 0 and kid_diff > 0 and abs(kid_same) < kid_diff


@pytest.mark.slow
def test_inception_loads_from_a_local_file(tmp_path, folders):
    # A randomly initialised torchvision Inception v3 saved locally stands in for the ImageNet weights.
    from torchvision.models.inception import Inception3

    torch.manual_seed(0)
    path = tmp_path / "inception.pth"
    torch.save(Inception3(aux_logits=False, init_weights=False).state_dict(), path)
    extractor = load_feature_extractor("inception", str(path))
    assert isinstance(extractor, InceptionFeatures)
    images = load_image_folder(folders["a"], limit=2)
    features = extract_features(extractor, images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert torch.equal(features, extract_features(extractor, images))  # eval mode: deterministic


def test_missing_weights_say_what_to_download(tmp_path, monkeypatch):
    monkeypatch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="inception_v3_google-0cc3c7bd.pth.*nothing is downloaded"):
        resolve_weights("inception", str(tmp_path / "missing.pth"))
    monkeypatch.setenv("LDM_INCEPTION_WEIGHTS", str(tmp_path / "env.pth"))
    with pytest.raises(FileNotFoundError, match="env.pth"):
        load_feature_extractor("inception")
    with pytest.raises(ValueError, match="unknown feature extractor"):
        load_feature_extractor("resnet", "x")


def test_memorisation_flags_copies_only(folders):
    train = load_image_folder(folders["a"], size=16)
    copies, fresh = train[:3], load_image_folder(folders["b"], size=16)[:3]
    report = memorization_report(torch.cat([copies, fresh]), train)
    assert report.nearest[:3] == [0, 1, 2] and report.ratios[0] == pytest.approx(0.0, abs=1e-6)
    assert max(report.ratios[:3]) < report.near_copy_ratio < min(report.ratios[3:])
    assert report.near_copies == 3 and report.warning  # half the samples are copies
