"""Bad input raises ValueError / FileNotFoundError naming the problem and the fix."""
import json
import os
import re
import shutil

import pytest
import torch

from ldm import Pipeline


@pytest.mark.parametrize("kw, match", [
    (dict(height=60), r"height=60 is not a positive multiple of 8.*use height=56 or 64"),
    (dict(width=100), r"width=100 is not a positive multiple of 8.*use width=96 or 104"),
    (dict(height=4), r"height=4 is not a positive multiple of 8.*use height=8 or larger"),
    (dict(num_inference_steps=0), r"num_inference_steps=0 must be an integer in \[1, 1000\]"),
    (dict(num_inference_steps=2.5), r"num_inference_steps=2.5 must be an integer"),
    (dict(prompt=42), r"prompt must be a str or a list of str, not int"),
    (dict(prompt=["ok", 3]), r"prompt must be a str or a list of str, but the list holds int"),
    (dict(prompt=[]), r"prompt is an empty list"),
    (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), r"negative_prompt has 3 entries but there are 2 prompts"),
    (dict(output_type="jpeg"), r"output_type='jpeg' is not one of pil, np, pt, latent"),
    (dict(eta=2.0), r"eta=2.0 must be a number in \[0, 1\]"),
    (dict(latents=torch.zeros(1, 4, 3, 3)), r"latents must be a tensor of shape \(1, 4, 8, 8\)"),
    (dict(generator=[torch.Generator()] * 3), r"got 3 generators for 1 images"),
])
def test_bad_call_arguments(tiny_pipe, kw, match):
    call = {"prompt": "a red circle", "num_inference_steps": 2, **kw}
    with pytest.raises(ValueError, match=match):
        tiny_pipe(**call)


def _generate_parser():
    import argparse

    from ldm.cli import generate

    parser = argparse.ArgumentParser(exit_on_error=False)
    generate.add_arguments(parser)
    return parser


@pytest.mark.parametrize("kw, flag, value", [
    (dict(guidance_scale=-1), "--guidance-scale", "-1"),
    (dict(guidance_scale=101.0), "--guidance-scale", "101"),
    (dict(guidance_rescale=1.5), "--guidance-rescale", "1.5"),
    (dict(eta=-0.1), "--eta", "-0.1"),
    (dict(num_inference_steps=1001), "--steps", "1001"),
    (dict(num_images_per_prompt=0), "--batch-size", "0"),
    (dict(num_images_per_prompt=1025), "--batch-size", "1025"),
    (dict(height=8200), "--height", "8200"),
    (dict(width=8208), "--width", "8208"),
    (dict(clip_skip=33), "--clip-skip", "33"),
    (dict(clip_skip=-1), "--clip-skip", "-1"),
    (dict(guidance_interval=(0, float("inf"))), "--guidance-interval", "inf"),
    (dict(apg=dict(momentum=-1.0)), "--apg-momentum", "-1"),
])
def test_python_call_refuses_what_the_cli_refuses(tiny_pipe, kw, flag, value):
    values = ["0", value] if flag == "--guidance-interval" else [value]
    argv = ["x", "--model", "m", flag, *values] + (["--apg"] if flag.startswith("--apg-") else [])
    with pytest.raises((SystemExit, Exception), match="outside the allowed range|invalid"):
        _generate_parser().parse_args(argv)
    with pytest.raises(ValueError, match=r"must be (an integer |a number )?in|has a negative, NaN or infinite end"):
        tiny_pipe("a red circle", **{"num_inference_steps": 2, "output_type": "latent", **kw})


def test_python_and_cli_ranges_are_one_definition():
    from ldm.pipelines.checks import CALL_RANGES

    flags = {"--steps": "num_inference_steps", "--guidance-scale": "guidance_scale", "--eta": "eta",
             "--guidance-rescale": "guidance_rescale", "--batch-size": "num_images_per_prompt", "--height": "height",
             "--width": "width", "--clip-skip": "clip_skip", "--lora-scale": "lora_scale",
             "--cfg-zero-init-steps": "cfg_zero_init_steps", "--apg-momentum": "apg_momentum"}
    for action in _generate_parser()._actions:
        name = next((flags.pop(o) for o in action.option_strings if o in flags), None)
        if name is None:
            continue
        lo, hi = (float(v) for v in CALL_RANGES[name].strip("[]()").split(", "))
        for outside in (lo - 1, hi + 1):
            text = str(int(outside)) if action.type.__name__ == "int" else str(outside)
            with pytest.raises(Exception, match="outside the allowed range " + re.escape(CALL_RANGES[name])):
                action.type(text)
    assert not flags, f"ldm generate has no flags {sorted(flags)}"


def test_lora_scale_outside_the_cli_range_is_refused(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match=r"lora_scale=11 must be a number in \[-10, 10\]"):
        tiny_pipe.load_lora_weights(str(tmp_path / "none.safetensors"), scale=11)


def test_unknown_scheduler_lists_valid_names(tiny_folder, tiny_pipe):
    with pytest.raises(ValueError, match=r"unknown scheduler 'dpm3'; valid names are ddpm, ddim, lms"):
        tiny_pipe.set_scheduler("dpm3")
    with pytest.raises(ValueError, match="valid names are"):
        Pipeline.from_pretrained(tiny_folder, scheduler="nope")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model folder .*nowhere does not exist"):
        Pipeline.from_pretrained(tmp_path / "nowhere")


def test_single_file_is_explained(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is a single file.*from_single_file"):
        Pipeline.from_pretrained(tmp_path / "model.safetensors")


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_is_named(tiny_folder, tmp_path, component):
    copy = tmp_path / "m"
    shutil.copytree(tiny_folder, copy)
    shutil.rmtree(copy / component)
    with pytest.raises(FileNotFoundError, match=rf"has no {component}/ (\(or transformer/\) )?component"):
        Pipeline.from_pretrained(copy)


def _pickle_unet(folder):
    from safetensors.torch import load_file

    unet = os.path.join(folder, "unet")
    torch.save(load_file(os.path.join(unet, "diffusion_pytorch_model.safetensors")),
               os.path.join(unet, "diffusion_pytorch_model.bin"))
    os.remove(os.path.join(unet, "diffusion_pytorch_model.safetensors"))


def test_pickled_weights_refused_unless_allowed(tiny_folder, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny_folder, copy)
    _pickle_unet(str(copy))
    with pytest.raises(ValueError, match=r"unet/ .* pickled weights \(diffusion_pytorch_model.bin\).*allow_pickle=True"):
        Pipeline.from_pretrained(copy)
    pipe = Pipeline.from_pretrained(copy, allow_pickle=True)
    ref = Pipeline.from_pretrained(tiny_folder)
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in ref.unet.state_dict().items())


def test_component_without_weights(tiny_folder, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny_folder, copy)
    os.remove(copy / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"vae/ .* has no weights"):
        Pipeline.from_pretrained(copy)


def test_foreign_scheduler_class_is_refused(tiny_folder, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny_folder, copy)
    path = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["_class_name"] = "os.system"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a diffusers scheduler"):
        Pipeline.from_pretrained(copy)


def test_leading_spacing_at_all_train_steps_is_a_clear_error(tiny_pipe):
    from diffusers import DDPMScheduler

    tiny_pipe.scheduler = DDPMScheduler.from_config(tiny_pipe.scheduler.config, timestep_spacing="leading",
                                                    steps_offset=1)
    with pytest.raises(ValueError, match=r"ask for t=1000 of a 1000-step model; use fewer steps"):
        tiny_pipe("x", num_inference_steps=1000, output_type="latent")


@pytest.mark.slow
def test_our_models_sample_all_train_steps(tiny_pipe):
    tiny_pipe.set_scheduler("ddpm")
    out = tiny_pipe("x", num_inference_steps=1000, guidance_scale=1.0, output_type="latent", trace=True)
    assert out.trace[0].timestep == 999 and out.trace[-1].timestep == 0 and torch.isfinite(out.images).all()
