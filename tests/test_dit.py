"""The diffusion-transformer backbone (ldm.models.dit, diffusers' PixArt): presets with exact sizes, the four
conditioning mechanisms, training (epsilon and flow), the transformer/ folder in ldm and in diffusers, LoRA,
the demo and the diagnostics, exactly as for the UNet."""
import json
import os

import numpy as np
import pytest
import torch

from ldm.models.dit import CONDITIONINGS, LatentDiT
from ldm.models.presets import MODEL_PRESETS, build_denoiser, count_parameters, get_spec
from ldm.training import train_ldm
from ldm.training.ldm_config import TrainLDMConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# Counted once from the built models; a change to the architecture must change these on purpose.
PARAMETERS = {"dit-tiny": 54_672, "dit-small": 1_185_124, "dit-small-in-context": 774_124,
              "dit-small-cross-attention": 1_007_404, "dit-small-adaln": 1_068_964, "pixart-small": 1_094_524,
              "dit-s-2": 34_544_656, "dit-b-2": 131_900_944, "dit-l-2": 459_362_832, "dit-xl-2": 676_325_392,
              "pixart-alpha": 607_003_792}
LARGE = {"dit-s-2", "dit-b-2", "dit-l-2", "dit-xl-2", "pixart-alpha"}


def build(name: str):
    spec = get_spec(name)
    if name in LARGE:  # shapes only: no memory, no time
        with torch.device("meta"):
            return build_denoiser(spec)
    return build_denoiser(spec)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_each_transformer_preset_has_its_exact_parameter_count(name):
    assert get_spec(name).backbone == "transformer"
    assert count_parameters(build(name)) == PARAMETERS[name]


def test_every_transformer_preset_is_counted():
    assert {n for n in MODEL_PRESETS if get_spec(n).backbone == "transformer"} == set(PARAMETERS)


def test_dit_xl_2_is_the_papers_675m_model_with_a_prompt_in_place_of_the_class():
    """DiT-XL/2 at 256 px has 675,129,632 parameters (Peebles & Xie; their code counts the fixed sin-cos positions
    and learns the variance too). Ours differs exactly by: the prompt's attention pooling instead of the
    1001 x 1152 class table, positions as a buffer (256 x 1152), and 4 output channels instead of 8."""
    model = build("dit-xl-2")
    text_pool = count_parameters(model.text_pool)
    class_table, positions, sigma_head = 1001 * 1152, 256 * 1152, 1152 * 16 + 16
    assert count_parameters(model) - text_pool + class_table + positions + sigma_head == 675_129_632
    assert model.config.num_layers == 28 and model.config.patch_size == 2 and model.config.sample_size == 32


def test_pixart_alpha_is_pixart_xl_2_but_for_the_caption_width():
    """PixArt-alpha-XL/2 (610,856,096 parameters with T5's 4096-wide captions and a learned variance) built with
    diffusers' own class; ours reads CLIP ViT-L/14's 768-wide tokens and predicts epsilon only."""
    from diffusers import PixArtTransformer2DModel

    spec = get_spec("pixart-alpha")
    with torch.device("meta"):
        original = PixArtTransformer2DModel(**{**spec.transformer, "caption_channels": 4096, "out_channels": 8})
    assert count_parameters(original) == 610_856_096
    assert count_parameters(original) - PARAMETERS["pixart-alpha"] == (4096 - 768) * 1152 + 1152 * 16 + 16


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Returns the model with every weight nudged: adaLN-Zero starts as the identity, so its output and its
    dependence on the prompt are exactly zero until trained."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("preset", ["dit-small", "dit-small-adaln", "dit-small-cross-attention",
                                    "dit-small-in-context", "pixart-small"])
def test_each_conditioning_mechanism_hears_the_prompt_and_the_time(preset):
    from ldm.models.denoiser import denoise

    torch.manual_seed(0)
    model = _perturbed(build(preset)).eval()
    x, text, other = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 128), torch.randn(2, 16, 128)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        base = denoise(model, x, t, text)
        assert base.shape == x.shape and torch.isfinite(base).all()
        assert (denoise(model, x, t, other) - base).abs().max() > 1e-3  # the prompt changes the prediction
        assert (denoise(model, x, t.flip(0), text) - base).abs().max() > 1e-3  # so does the time
        # each sample's prediction depends on its own prompt only
        torch.testing.assert_close(denoise(model, x[:1], t[:1], text[:1]), base[:1], atol=1e-5, rtol=1e-5)


def test_adaln_zero_starts_as_the_identity_and_other_sizes_are_interpolated():
    model = build("dit-small")
    assert model.config.conditioning == "adaln_zero" and set(CONDITIONINGS) >= {"in_context", "adaln"}
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([3, 400]), torch.randn(2, 16, 128))
    assert out.abs().max() == 0  # zero-initialised output layer and gates (DiT's init)
    assert _perturbed(model)(torch.randn(1, 4, 12, 16), 5, torch.randn(1, 16, 128)).shape == (1, 4, 12, 16)
    with pytest.raises(ValueError, match="conditioning must be one of in_context, cross_attention, adaln"):
        LatentDiT(conditioning="film")


def dit_config(tmp_path, **overrides) -> TrainLDMConfig:
    base = dict(model="dit-tiny", data="shapes:48@32", resolution=32, batch_size=8, max_steps=30, learning_rate=2e-3,
                lr_warmup_steps=0, output_dir=str(tmp_path / "dit"), checkpoint_every=1000, validation_every=10,
                num_validation_prompts=0, val_loss_samples=4, report_to="none", log_every=0, ema_decay=0.9)
    return TrainLDMConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    cfg = dit_config(tmp_path_factory.mktemp("dit"))
    cfg.validate()
    return train_ldm.main(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [dict(prediction_type="flow", timestep_sampling="logit_normal"),
                                       dict(model="pixart-small", max_token_length=16, max_steps=20)],
                         ids=["dit-flow", "pixart-epsilon"])
def test_short_transformer_runs_lower_validation_loss(tmp_path, overrides):
    cfg = dit_config(tmp_path, **overrides)
    cfg.validate()
    val = [v["val_loss"] for v in train_ldm.main(cfg)["val"]]
    assert val[-1] < 0.8 * val[0], val


@pytest.mark.slow
def test_short_dit_run_lowers_validation_loss(dit_run):
    val = [v["val_loss"] for v in dit_run["val"]]
    assert len(val) == 3 and val[-1] < 0.8 * val[0], val


@pytest.mark.slow
def test_dit_folder_round_trips_through_ldm_and_diffusers_from_pretrained(dit_run):
    from ldm import Pipeline

    folder = os.path.join(dit_run["checkpoint"], "pipeline")
    assert os.path.isfile(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
    assert not os.path.exists(os.path.join(folder, "unet"))
    index = json.load(open(os.path.join(folder, "model_index.json")))
    assert index["transformer"] == ["ldm.models.dit", "LatentDiT"] and "unet" not in index
    ours = Pipeline.from_pretrained(folder)
    theirs = LatentDiT.from_pretrained(folder, subfolder="transformer", local_files_only=True)  # diffusers' loader
    assert type(ours.denoiser) is LatentDiT and ours.unet is None
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([50, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.transformer(x, t, text), theirs(x, t, text), atol=0, rtol=0)
    call = dict(prompt=["a red circle on the left", "a blue square"], negative_prompt=["", "a green circle"],
                guidance_scale=4.0, num_inference_steps=5, output_type="np")
    ours.set_progress_bar_config(disable=True)
    a = ours(**call, generator=torch.Generator().manual_seed(3)).images
    again = Pipeline(ours.vae, ours.text_encoder, ours.tokenizer, scheduler=ours.scheduler, transformer=theirs)
    again.set_progress_bar_config(disable=True)
    b = again(**call, generator=torch.Generator().manual_seed(3)).images
    assert a.shape == (2, 64, 64, 3) and a.std() > 0.01 and np.array_equal(a, b)


def test_dit_folder_opens_in_diffusers_from_pretrained_and_names_the_fix_without_trust(tmp_path):
    from diffusers import DiffusionPipeline

    from ldm import Pipeline
    from ldm.models.presets import build_components

    Pipeline(**build_components("dit-tiny", seed=1)).save_pretrained(tmp_path / "d")
    index = json.load(open(tmp_path / "d" / "model_index.json"))
    assert index["_class_name"] == ["ldm_pipeline", "Pipeline"] and "unet" not in index
    with pytest.raises(ValueError, match=r"(?s)custom code in ldm_pipeline\.py.*trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tmp_path / "d")  # diffusers runs no code unasked, and says so
    assert "ldm.pipelines.Pipeline.from_pretrained(folder)" in (tmp_path / "d" / "ldm_pipeline.py").read_text()
    theirs = DiffusionPipeline.from_pretrained(tmp_path / "d", trust_remote_code=True)
    ours = Pipeline.from_pretrained(tmp_path / "d")
    assert type(theirs).__name__ == "Pipeline" and type(theirs.transformer) is LatentDiT
    call = dict(prompt="a red circle", num_inference_steps=2, output_type="np")
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    assert np.array_equal(ours(**call, generator=torch.Generator().manual_seed(0)).images,
                          theirs(**call, generator=torch.Generator().manual_seed(0)).images)


def test_pixart_folder_opens_with_diffusers_pixart_class(tmp_path):
    from diffusers import PixArtTransformer2DModel

    from ldm import Pipeline
    from ldm.models.presets import build_components

    Pipeline(**build_components("pixart-small", seed=1)).save_pretrained(tmp_path / "p")
    ours = Pipeline.from_pretrained(tmp_path / "p")
    theirs = PixArtTransformer2DModel.from_pretrained(tmp_path / "p", subfolder="transformer", local_files_only=True)
    assert type(ours.denoiser) is PixArtTransformer2DModel
    for a, b in zip(ours.transformer.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)


def test_pipeline_needs_exactly_one_denoiser(tiny_pipe):
    from ldm import Pipeline

    with pytest.raises(ValueError, match="one denoiser: unet=.*or transformer="):
        Pipeline(tiny_pipe.vae, tiny_pipe.text_encoder, tiny_pipe.tokenizer, tiny_pipe.unet, tiny_pipe.scheduler,
                 transformer=build("dit-tiny"))


@pytest.mark.slow
def test_trace_of_a_dit_model(dit_run):
    from ldm import Pipeline

    pipe = Pipeline.from_pretrained(os.path.join(dit_run["checkpoint"], "pipeline"), scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=4, guidance_scale=3.0, trace=True, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    assert len(out.trace) == 4 and out.trace[0].noise_pred_uncond is not None
    assert torch.isfinite(out.trace[-1].x0_pred).all()


@pytest.mark.slow
def test_diagnostics_run_on_a_dit_model(dit_run, tmp_path):
    from ldm.cli import main

    folder = os.path.join(dit_run["checkpoint"], "pipeline")
    out = tmp_path / "t"
    assert main(["diagnose", "timesteps", "--model", folder, "--data", "shapes:4@32", "--out", str(out),
                 "--num-images", "2", "--bins", "4", "--per-bin", "2"]) == 0
    assert len(json.loads((out / "timesteps.json").read_text())["bins"]) == 4
    assert main(["diagnose", "sampling", "--model", folder, "--prompt", "a red circle", "--out", str(tmp_path / "s"),
                 "--schedulers", "ddim", "--steps", "3", "--guidance-scale", "4"]) == 0
    assert (tmp_path / "s" / "sampling_drift.png").exists()


@pytest.mark.slow
def test_lora_on_a_dit_changes_and_restores_outputs(dit_run, tmp_path):
    from ldm import Pipeline
    from ldm.data.shapes import SceneObject, render_scene
    from ldm.training import finetune
    from ldm.training.finetune_config import FinetuneConfig

    art = tmp_path / "art"
    art.mkdir()
    for i in range(5):
        render_scene([SceneObject("square", "blue", "right")], 32, (200, 40 * i, 30)).save(art / f"{i}.png")
    base_folder = os.path.join(dit_run["checkpoint"], "pipeline")
    cfg = FinetuneConfig(model=base_folder, data=str(art), out=str(tmp_path / "ft"), instance_prompt="sks art",
                         resolution=32, max_steps=3, batch_size=2, learning_rate=1e-2, validation_every=3,
                         num_validation_samples=1, validation_sample_steps=2, device="cpu", save_pipeline=True)
    cfg.validate()
    report = finetune.main(cfg)
    from safetensors.torch import load_file

    keys = list(load_file(report["outputs"]["lora"]))
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any(".ff.net.2.lora_A" in k for k in keys) and any(".attn.to_q.lora_B" in k for k in keys)
    pipe = Pipeline.from_pretrained(base_folder)
    pipe.set_progress_bar_config(disable=True)
    sample = lambda p, **k: p("sks art", num_inference_steps=3, output_type="np",  # noqa: E731
                              generator=torch.Generator().manual_seed(0), **k).images
    base = sample(pipe)
    pipe.load_lora_weights(report["outputs"]["lora"])
    adapted, off = sample(pipe), sample(pipe, cross_attention_kwargs={"scale": 0.0})
    assert np.isfinite(adapted).all() and np.abs(adapted - base).max() > 1e-3 and np.abs(off - base).max() <= 1e-5
    merged = Pipeline.from_pretrained(report["outputs"]["pipeline"])  # the LoRA fused into a plain DiT folder
    merged.set_progress_bar_config(disable=True)
    assert np.abs(sample(merged) - adapted).max() <= 1e-4
    # diffusers' own adapter loader reads the file too
    plain = LatentDiT.from_pretrained(base_folder, subfolder="transformer", local_files_only=True)
    plain.load_lora_adapter(report["outputs"]["lora"], prefix="transformer", adapter_name="a")
    assert "a" in plain.peft_config


def test_lora_refuses_what_a_transformer_cannot_do():
    from ldm.models.lora import LoraSettings, add_lora, to_kohya
    from ldm.models.presets import build_text_encoder

    text_encoder = build_text_encoder(get_spec("dit-tiny"))
    with pytest.raises(ValueError, match="LoRA covers the transformer only"):
        add_lora(build("dit-tiny"), text_encoder, LoraSettings(train_text_encoder=True))
    with pytest.raises(ValueError, match="LoRA on PixArtTransformer2DModel is not supported.*--method full"):
        add_lora(build("pixart-small"), text_encoder, LoraSettings())
    model = build("dit-tiny")
    add_lora(model, text_encoder, LoraSettings(rank=2))
    with pytest.raises(ValueError, match="drop --export_webui"):
        to_kohya(model)


@pytest.mark.slow
def test_demo_trains_and_grades_a_dit(tmp_path):
    from ldm.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--model", "dit-tiny", "--out", str(out), "--minutes", "30", "--num_samples", "32",
                 "--vae_steps", "3", "--vae_batch_size", "8", "--ldm_steps", "3", "--ldm_batch_size", "8",
                 "--num_prompts", "2", "--sample_steps", "2", "--threads", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["ldm_steps"] == 3 and set(report["adherence"]) == {"ddpm", "ddim", "lms"}
    assert os.path.isdir(os.path.join(report["pipeline"], "transformer"))


@pytest.mark.parametrize("name, paper_gflops", [("dit-s-2", 6.06), ("dit-b-2", 23.01), ("dit-l-2", 80.71),
                                                ("dit-xl-2", 118.64)])
def test_forward_flops_match_the_dit_papers_table(name, paper_gflops):
    """DiT's Table 4 counts a multiply-add as one FLOP (fvcore); PyTorch's FlopCounterMode counts it as two. The
    pooled prompt in place of the class label adds under 1.5% (most at S/2), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.models.denoiser import denoise

    model = build(name)
    with torch.device("meta"):
        x, t, text = torch.randn(1, 4, 32, 32), torch.tensor([500]), torch.randn(1, 77, 768)
    with FlopCounterMode(display=False) as counter:
        denoise(model, x, t, text)
    gflops = counter.get_total_flops() / 2 / 1e9
    assert paper_gflops <= gflops <= paper_gflops * 1.015, gflops


def test_gradient_checkpointing_recomputes_each_block_and_gives_the_same_gradients():
    model = _perturbed(build("dit-tiny"))
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([1, 600]), torch.randn(2, 77, 32)

    def gradients():
        model.zero_grad()
        model(x, t, text).pow(2).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = gradients()
    model.enable_gradient_checkpointing()
    calls, original = [], model._gradient_checkpointing_func
    model._gradient_checkpointing_func = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    for a, b in zip(plain, gradients()):
        torch.testing.assert_close(a, b)
    assert len(calls) == model.config.num_layers
