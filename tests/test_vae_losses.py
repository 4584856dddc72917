"""VAE losses: the adaptive discriminator weight, the discriminator's own step, and LPIPS loading."""
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from ldm.models.presets import build_vae, get_spec
from ldm.training.lpips import LPIPS, TAPS, load_lpips, vgg16_features
from ldm.training.train_vae import Autoencode, TrainVAEConfig, discriminator_loss, vae_loss
from ldm.training.vae_losses import PatchDiscriminator, hinge_g_loss, kl_loss, reconstruction_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def parts():
    torch.manual_seed(0)
    vae = Autoencode(build_vae(get_spec("tiny")))
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    return vae, PatchDiscriminator(width=16).requires_grad_(False), pixels


def test_adaptive_weight_equals_the_closed_form_at_the_last_layer(parts):
    vae, disc, pixels = parts
    cfg = TrainVAEConfig(disc_weight=0.5)
    last = vae.vae.decoder.conv_out.weight
    _, logs, _ = vae_loss(cfg, vae, pixels, torch.Generator().manual_seed(1), disc=disc, last_layer=last)
    # the same forward, and Eq. 7 of Esser et al. 2021 written out with torch.autograd.grad
    x_rec, _, _ = vae(pixels, torch.Generator().manual_seed(1))
    rec_grad, = torch.autograd.grad(reconstruction_loss(x_rec, pixels, "l1"), last, retain_graph=True)
    gan_grad, = torch.autograd.grad(hinge_g_loss(disc(x_rec)), last)
    expected = 0.5 * min(max(float(rec_grad.norm() / (gan_grad.norm() + 1e-4)), 0.0), 1e4)
    assert logs["disc_weight"] == pytest.approx(expected, rel=1e-5)
    assert expected > 0


def test_generator_loss_has_the_gradient_of_rec_kl_and_weighted_gan(parts):
    vae, disc, pixels = parts
    cfg = TrainVAEConfig(kl_weight=1e-3, disc_weight=0.5)
    last = vae.vae.decoder.conv_out.weight
    loss, logs, _ = vae_loss(cfg, vae, pixels, torch.Generator().manual_seed(1), disc=disc, last_layer=last)
    ours = torch.autograd.grad(loss, list(vae.parameters()))
    x_rec, mean, logvar = vae(pixels, torch.Generator().manual_seed(1))
    full = (reconstruction_loss(x_rec, pixels, "l1") + 1e-3 * kl_loss(mean, logvar) / pixels[0].numel()
            + logs["disc_weight"] * hinge_g_loss(disc(x_rec)))
    for a, b in zip(ours, torch.autograd.grad(full, list(vae.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_kl_weight_is_the_ldm_papers_per_pixel_value_at_any_resolution(parts):
    # CompVis' loss: sum of |x - x_rec| over pixel values + kl_weight * KL summed over latents (per image). Ours is
    # that divided by the number of pixel values, so the paper's kl_weight means the same at 32 px and 64 px.
    vae = parts[0]
    for size in (32, 64):
        pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1
        loss, logs, _ = vae_loss(TrainVAEConfig(kl_weight=0.5), vae, pixels, torch.Generator().manual_seed(1))
        x_rec, mean, logvar = vae(pixels, torch.Generator().manual_seed(1))
        paper = (x_rec - pixels).abs().flatten(1).sum(1).mean() + 0.5 * kl_loss(mean, logvar)
        torch.testing.assert_close(loss, paper / (3 * size * size), rtol=1e-5, atol=0)
        assert logs["kl"] == pytest.approx(float(kl_loss(mean, logvar).detach()), rel=1e-5)  # logged unscaled


def test_generator_loss_leaves_no_gradient_on_the_discriminator(parts):
    vae, _, pixels = parts
    disc = PatchDiscriminator(width=16)  # trainable, as during the discriminator's own step
    loss, _, _ = vae_loss(TrainVAEConfig(), vae, pixels, torch.Generator().manual_seed(1), disc=disc,
                          last_layer=vae.vae.decoder.conv_out.weight)
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.grad is not None for p in vae.parameters())


def test_discriminator_loss_steps_lower_its_own_loss():
    torch.manual_seed(0)
    accelerator = Accelerator()  # cpu=True would clash with a GPU state that earlier tests set up
    disc = PatchDiscriminator(width=16)
    d_optimizer = torch.optim.AdamW(disc.parameters(), lr=1e-3, betas=(0.5, 0.9))
    disc, d_optimizer = accelerator.prepare(disc, d_optimizer)
    device = accelerator.device
    real = torch.rand(4, 3, 32, 32, device=device) * 2 - 1
    fake = torch.rand(4, 3, 32, 32, device=device).requires_grad_()  # other statistics than `real`
    def step() -> float:  # as VAETrainer does it: backward per micro-batch, the optimiser after the update
        loss = discriminator_loss(disc, real, fake)
        accelerator.backward(loss)
        d_optimizer.step()
        d_optimizer.zero_grad(set_to_none=True)
        return loss.item()

    losses = [step() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert fake.grad is None  # the reconstruction is detached


# LPIPS ---------------------------------------------------------------------------------------------------------

def save_lpips_files(folder, seed=0):
    """Returns (heads file, trunk file) of a random LPIPS, in the official files' key layouts, and the net."""
    torch.manual_seed(seed)
    net = LPIPS().eval()
    for lin in net.lin:
        lin.weight.data.abs_()  # the official heads are non-negative
    trunk = {f"features.{k}": v for k, v in net.features.state_dict().items()}
    trunk["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision's file also holds the classifier: ignored
    save_file(trunk, str(folder / "vgg16.safetensors"))
    save_file({f"lin{i}.model.1.weight": lin.weight.contiguous() for i, lin in enumerate(net.lin)},
              str(folder / "heads.safetensors"))
    return str(folder / "heads.safetensors"), str(folder / "vgg16.safetensors"), net


def test_lpips_loads_the_trunk_and_the_heads(tmp_path):
    heads, trunk, net = save_lpips_files(tmp_path)
    loaded = load_lpips(heads, trunk)
    x0, x1 = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(x0, x1), net(x0, x1), rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    other = LPIPS()  # a random net gives other distances: the files were used
    assert not torch.allclose(other(x0, x1), net(x0, x1))


def test_lpips_is_the_papers_formula_on_torchvisions_vgg16(tmp_path):
    """Eq. 1 of Zhang et al. 2018 computed by hand on torchvision's VGG16 layers, loaded from the same file."""
    from torchvision.models.vgg import cfgs, make_layers

    heads, trunk, _ = save_lpips_files(tmp_path)
    ours = load_lpips(heads, trunk)
    vgg = make_layers(cfgs["D"])  # torchvision's VGG16 `features`
    vgg.load_state_dict({k[len("features."):]: v for k, v in load_file(trunk).items() if k.startswith("features.")})
    weights = load_file(heads)
    x0, x1 = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)  # the LPIPS package's ScalingLayer
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    h0, h1, start, expected = (x0 - shift) / scale, (x1 - shift) / scale, 0, 0.0
    for layer, end in enumerate(TAPS):  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        h0, h1, start = vgg[start:end](h0), vgg[start:end](h1), end
        n0, n1 = h0 / (h0.norm(dim=1, keepdim=True) + 1e-10), h1 / (h1.norm(dim=1, keepdim=True) + 1e-10)
        w = weights[f"lin{layer}.model.1.weight"].view(1, -1, 1, 1)
        expected = expected + (w * (n0 - n1) ** 2).sum(1).mean(dim=(1, 2))
    torch.testing.assert_close(ours(x0, x1), expected, rtol=1e-5, atol=1e-7)
    assert len(vgg16_features()) == TAPS[-1]


def test_lpips_refuses_files_that_do_not_fit(tmp_path):
    heads, trunk, _ = save_lpips_files(tmp_path)
    with pytest.raises(ValueError, match=r"missing keys: features\.0\.bias.*unexpected keys: lin0.*vgg16-397923af"):
        load_lpips(heads, heads)  # the heads file given as the trunk
    with pytest.raises(ValueError, match=r"missing keys: lin0.*unexpected keys: .*features.*vgg\.pth"):
        load_lpips(trunk, trunk)  # the trunk file given as the heads
    save_file({f"lin{i}.model.1.weight": torch.ones(1, 7, 1, 1) for i in range(5)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"wrong shapes: lin0\.model\.1\.weight \(1, 7, 1, 1\) \(expected \(1, 64,"):
        load_lpips(str(tmp_path / "bad.safetensors"), trunk)


def test_lpips_heads_without_a_trunk_file_are_refused(tmp_path):
    heads, _, _ = save_lpips_files(tmp_path)
    with pytest.raises(ValueError, match="lpips_vgg_weights.*random VGG features"):
        load_lpips(heads, "")
    with pytest.raises(ValueError, match="lpips_weights.*lpips_vgg_weights"):
        TrainVAEConfig(lpips_weights=heads).validate()


def test_pickled_lpips_files_need_allow_pickle(tmp_path):
    heads, trunk, net = save_lpips_files(tmp_path)
    torch.save({f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(net.lin)}, tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="pickled.*allow_pickle"):
        load_lpips(str(tmp_path / "vgg.pth"), trunk)
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(load_lpips(str(tmp_path / "vgg.pth"), trunk, allow_pickle=True)(x, -x), net(x, -x))


def test_training_uses_both_lpips_files(tmp_path, monkeypatch):
    from ldm.training import train_vae

    heads, trunk, _ = save_lpips_files(tmp_path)
    seen, loss_fn = [], train_vae.vae_loss

    def recording_loss(*args, **kwargs):
        loss, logs, x_rec = loss_fn(*args, **kwargs)
        seen.append(logs)
        return loss, logs, x_rec

    monkeypatch.setattr(train_vae, "vae_loss", recording_loss)
    cfg = TrainVAEConfig(model="tiny", data="shapes:8@32", resolution=32, batch_size=2, max_steps=2, disc_start=1,
                         lpips_weights=heads, lpips_vgg_weights=trunk, output_dir=str(tmp_path / "vae"),
                         checkpoint_every=0, val_samples=2)
    cfg.validate()
    assert train_vae.main(cfg)["step"] == 2
    assert all(logs["lpips"] > 0 for logs in seen) and "disc_weight" in seen[1]
