"""Inpainting (pipelines/editing.py): parity with diffusers' StableDiffusionInpaintPipeline on tiny random
weights (a 9-channel inpainting UNet, and a 4-channel UNet's latent blend), mask blur, masked content, paste-back,
and the sd15-inpaint preset's size."""
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import seeded
from diffusers import DiffusionPipeline, StableDiffusionInpaintPipeline
from test_img2img import CALL, diffusers_edit_pipeline, init_image

from ldm import Pipeline
from ldm.models.presets import build_components, build_unet, count_parameters, get_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def left_half_mask(size=32) -> PIL.Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, : size // 2] = 255  # white = repaint
    return PIL.Image.fromarray(mask)


def build(preset):
    components = build_components(preset, seed=0)
    pipe = Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return components, pipe


@pytest.fixture(scope="module")
def tiny():
    return build("tiny")


@pytest.fixture(scope="module")
def tiny_inpaint():
    return build("tiny-inpaint")


def both(components, pipe, scheduler_name, **call):
    """Returns (ours, diffusers') np images for the same call and generator, with diffusers' behaviour: no mask blur
    and no paste-back."""
    pipe.set_scheduler(scheduler_name)
    call = dict(**CALL, image=init_image(), mask_image=left_half_mask(), num_inference_steps=4, output_type="np",
                **call)
    ours = pipe(**call, mask_blur=0, paste_back=False, generator=seeded(3)).images
    theirs = diffusers_edit_pipeline(components, scheduler_name, StableDiffusionInpaintPipeline)
    theirs = theirs(**call, generator=seeded(3)).images
    return ours, theirs


@pytest.mark.parametrize("scheduler_name,strength", [("ddim", 1.0), ("euler", 0.75), ("lms", 1.0)])
def test_inpainting_unet_matches_diffusers(tiny_inpaint, scheduler_name, strength):
    components, pipe = tiny_inpaint
    assert pipe.unet.config.in_channels == 9
    ours, theirs = both(components, pipe, scheduler_name, strength=strength)
    assert ours.shape == theirs.shape == (1, 32, 32, 3)
    assert np.abs(ours - theirs).max() <= 1e-4
    assert ours.std() > 0.01


@pytest.mark.parametrize("scheduler_name,strength", [("ddim", 1.0), ("euler", 0.75), ("dpm++", 0.5)])
def test_latent_blend_with_any_model_matches_diffusers(tiny, scheduler_name, strength):
    components, pipe = tiny
    assert pipe.unet.config.in_channels == 4
    ours, theirs = both(components, pipe, scheduler_name, strength=strength)
    assert np.abs(ours - theirs).max() <= 1e-4
    assert ours.std() > 0.01


@pytest.mark.parametrize("preset", ["tiny", "tiny-inpaint"])
def test_paste_back_keeps_the_unmasked_pixels_exactly(tiny, tiny_inpaint, preset):
    _, pipe = tiny if preset == "tiny" else tiny_inpaint
    pipe.set_scheduler("ddim")
    image = init_image()
    call = dict(**CALL, image=image, mask_image=left_half_mask(), num_inference_steps=3, generator=seeded(1))
    pasted = np.asarray(pipe(**call, mask_blur=0).images[0])
    raw = np.asarray(pipe(**{**call, "generator": seeded(1)}, mask_blur=0, paste_back=False).images[0])
    original = np.asarray(image)
    assert np.array_equal(pasted[:, 16:], original[:, 16:])  # outside the mask: the input's pixels
    assert np.array_equal(pasted[:, :16], raw[:, :16])  # inside: the result's
    assert not np.array_equal(raw[:, 16:], original[:, 16:])  # without paste-back the VAE changes them


def test_mask_blur_feathers_the_paste_back(tiny):
    _, pipe = tiny
    pipe.set_scheduler("ddim")
    image = init_image(64)
    call = dict(**{**CALL, "height": 64, "width": 64}, image=image, mask_image=left_half_mask(64),
                num_inference_steps=3, output_type="pt")
    sharp = pipe(**call, mask_blur=0, generator=seeded(2)).images
    soft = pipe(**call, mask_blur=4, generator=seeded(2)).images
    original = pipe.image_processor.pil_to_numpy(image)  # (1, 64, 64, 3) in [0, 1]
    original = torch.from_numpy(original).permute(0, 3, 1, 2)
    # the blur reaches 2.5 sigma = 10 px past the edge at column 32: beyond it, both are the original
    torch.testing.assert_close(soft[..., 43:], original[..., 43:], atol=1e-6, rtol=0)
    # near the edge, outside the mask, the blurred alpha mixes in the result; the sharp one does not
    assert (soft[..., 32:36] - original[..., 32:36]).abs().max() > 1e-3
    torch.testing.assert_close(sharp[..., 32:], original[..., 32:], atol=1e-6, rtol=0)
    # inside, near the edge, the blurred alpha mixes in the original
    assert (soft[..., 28:32] - sharp[..., 28:32]).abs().max() > 1e-3


def test_masked_content_noise_changes_the_start_only_inside_the_mask(tiny):
    _, pipe = tiny
    pipe.set_scheduler("euler")
    starts = {}
    for content in ("original", "noise"):
        def first_input(_module, args, content=content):
            starts.setdefault(content, args[0][:1].clone())  # the first model input's conditional half (1, 4, 4, 4)
        handle = pipe.unet.register_forward_pre_hook(first_input)
        try:
            pipe(**CALL, image=init_image(), mask_image=left_half_mask(), strength=0.5, masked_content=content,
                 num_inference_steps=2, generator=seeded(4), output_type="latent")
        finally:
            handle.remove()
    difference = starts["noise"] - starts["original"]  # latents 4x4: the mask covers columns 0 and 1
    assert difference[..., :2].abs().min() > 0
    assert difference[..., 2:].abs().max() == 0


def test_bad_masks_are_refused_with_the_fix(tiny, tiny_inpaint):
    with pytest.raises(ValueError, match=r"masked_content='blank' must be one of original, noise"):
        tiny[1]("a", image=init_image(), mask_image=left_half_mask(), masked_content="blank")
    with pytest.raises(ValueError, match=r"mask_blur=-1 must be an integer in \[0, 256\]"):
        tiny[1]("a", image=init_image(), mask_image=left_half_mask(), mask_blur=-1)
    with pytest.raises(ValueError, match=r"inpainting model \(9 input channels\): it samples only with image= and "
                                         r"mask_image="):
        tiny_inpaint[1]("a")
    with pytest.raises(ValueError, match=r"inpainting model \(9 input channels\): pass mask_image="):
        tiny_inpaint[1]("a", image=init_image())


def test_sd15_inpaint_has_the_parameter_count_of_runwayml_inpainting_unet():
    from accelerate import init_empty_weights

    with init_empty_weights():
        unet = build_unet(get_spec("sd15-inpaint"))
        sd15 = build_unet(get_spec("sd15"))
    assert unet.config.in_channels == 9
    # SD 1.5's UNet plus conv_in's 5 extra input channels (320 x 5 x 3 x 3)
    assert count_parameters(unet) == 859_535_364 == count_parameters(sd15) + 5 * 320 * 3 * 3


def test_an_inpainting_folder_opens_in_diffusers_as_its_inpainting_pipeline(tmp_path, tiny_inpaint):
    folder = tmp_path / "inpaint"
    tiny_inpaint[1].save_pretrained(folder)
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.unet.config.in_channels == 9
    pipe.set_progress_bar_config(disable=True)
    call = dict(**CALL, image=init_image(), mask_image=left_half_mask(), num_inference_steps=2, output_type="np")
    ours = pipe(**call, mask_blur=0, paste_back=False, generator=seeded(1)).images
    # diffusers opens the folder as its inpainting pipeline, which samples the same image
    theirs = DiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    assert type(theirs) is StableDiffusionInpaintPipeline
    theirs.set_progress_bar_config(disable=True)
    assert np.abs(ours - theirs(**call, generator=seeded(1)).images).max() <= 1e-4


def test_create_model_writes_a_tiny_inpaint_folder_that_training_refuses(tmp_path):
    from ldm.cli import main
    from ldm.training.ldm_config import TrainLDMConfig
    from ldm.training.train_ldm import build_models

    folder = tmp_path / "inpaint"
    assert main(["create-model", "--model", "tiny-inpaint", "--out", str(folder)]) == 0
    for model in ("tiny-inpaint", str(folder)):
        with pytest.raises(ValueError, match=r"`ldm train` trains text-to-image models, and this one is an "
                                             r"inpainting model \(9 input channels"):
            build_models(TrainLDMConfig(model=model))


def test_generate_cli_img2img_and_inpainting_record_their_parameters(tiny_folder, tmp_path, capsys):
    import os

    from ldm.cli import main
    from ldm.images import read_png_params

    init_image().save(tmp_path / "in.png")
    left_half_mask().save(tmp_path / "mask.png")
    base = ["generate", "a red circle", "--model", tiny_folder, "--steps", "4", "--seed", "5", "--scheduler", "ddim"]
    assert main(base + ["--init-image", str(tmp_path / "in.png"), "--strength", "0.5",
                        "--out", str(tmp_path / "img2img.png")]) == 0
    params = read_png_params(str(tmp_path / "img2img.png"))
    assert params["init_image"] == os.path.abspath(tmp_path / "in.png") and params["strength"] == 0.5
    assert (params["width"], params["height"]) == (32, 32) and "mask" not in params
    assert PIL.Image.open(tmp_path / "img2img.png").size == (32, 32)  # the init image's size, not the native 64

    assert main(base + ["--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                        "--mask-blur", "0", "--masked-content", "noise", "--strength", "1",
                        "--out", str(tmp_path / "inpaint.png")]) == 0
    params = read_png_params(str(tmp_path / "inpaint.png"))
    assert params["mask"] == os.path.abspath(tmp_path / "mask.png")
    assert (params["mask_blur"], params["masked_content"], params["paste_back"], params["strength"]) == \
        (0, "noise", True, 1.0)
    out = np.asarray(PIL.Image.open(tmp_path / "inpaint.png"))
    assert np.array_equal(out[:, 16:], np.asarray(init_image())[:, 16:])  # pasted back outside the mask
    assert "Strength: 1.0" in PIL.Image.open(tmp_path / "inpaint.png").text["parameters"]


@pytest.mark.parametrize("extra, message", [
    (["--init-image", "{tmp}/missing.png"], "init_image: no file at"),
    (["--init-image", "{tmp}/text.png"], "is not an image PIL can read"),
    (["--mask", "{tmp}/mask.png"], "mask (--mask) needs an init image to repaint: add --init-image PATH"),
    (["--init-image", "{tmp}/in.png", "--mask", "{tmp}/wide.png"], "mask is 64x32 pixels but the init image is 32x32"),
    (["--strength", "0.5"], "--strength acts on --init-image, which is not given"),  # not ignored without a word
    (["--init-image", "{tmp}/in.png", "--mask-blur", "2"], "--mask-blur acts on --mask, which is not given"),
    (["--init-image", "{tmp}/in.png", "--no-paste-back"], "--no-paste-back acts on --mask, which is not given"),
])
def test_generate_cli_refuses_bad_images_before_loading_the_model(tmp_path, capsys, extra, message):
    from ldm.cli import main

    init_image().save(tmp_path / "in.png")
    left_half_mask().save(tmp_path / "mask.png")
    PIL.Image.new("L", (64, 32)).save(tmp_path / "wide.png")
    (tmp_path / "text.png").write_text("not an image")
    argv = ["generate", "x", "--model", "/no/such/model"] + [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert main(argv) == 2  # the model folder does not exist: the image was checked first
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_service_records_pil_images_from_the_web_page_as_uploaded(tiny_folder, tmp_path):
    from ldm.images import read_png_params
    from ldm.pipelines.generate import GenerateRequest, generate

    request = GenerateRequest("a red circle", model=tiny_folder, steps=2, seed=1, init_image=init_image(),
                              mask=left_half_mask(), strength=0.5, mask_blur=0, paste_back=False,
                              out=str(tmp_path / "page.png"))
    result = generate(request)
    params = read_png_params(result.images[0].path)
    assert (params["init_image"], params["mask"], params["strength"], params["paste_back"]) == \
        ("uploaded", "uploaded", 0.5, False)
    assert (result.images[0].width, result.images[0].height) == (32, 32)


@pytest.mark.parametrize("preset", ["tiny", "tiny-inpaint"])
def test_with_a_generator_per_image_each_image_depends_on_its_own_alone(tiny, tiny_inpaint, preset):
    _, pipe = tiny if preset == "tiny" else tiny_inpaint
    pipe.set_scheduler("euler")
    call = dict(**CALL, image=init_image(), mask_image=left_half_mask(), strength=0.75, num_inference_steps=3,
                output_type="np")
    batch = pipe(**call, num_images_per_prompt=2, generator=[seeded(1), seeded(2)]).images
    alone = pipe(**call, generator=[seeded(2)]).images
    assert np.abs(batch[1] - alone[0]).max() <= 1e-5
    assert np.abs(batch[0] - batch[1]).max() > 1e-2
