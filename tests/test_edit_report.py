"""benchmarks/edit_report.py's core on the tiny random model: one true shapes render as the source, 2 steps."""
import os
import sys

import numpy as np
import pytest
import torch

from ldm import Pipeline
from ldm.data.shapes import SceneObject, render_scene
from ldm.models.presets import build_components

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")
SCENE = ("red", "square", "left")


@pytest.fixture(scope="module")
def edit_report():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import edit_report
    finally:
        sys.path.pop(0)
    return edit_report


@pytest.fixture(scope="module")
def measured(edit_report):
    pipe = Pipeline(**build_components("tiny", seed=0))
    pipe.set_progress_bar_config(disable=True)
    source = render_scene([SceneObject(SCENE[1], SCENE[0], SCENE[2])], resolution=32)
    report, images = edit_report.measure(pipe, [source], [SCENE], [7], steps=2, guidance=4.0)
    return pipe, source, report, images


def test_edit_report_has_a_row_per_strength_and_variant_with_a_held_out_target(edit_report, measured):
    _, _, report, images = measured
    assert [r["strength"] for r in report["img2img"]] == list(edit_report.STRENGTHS)
    assert [r["variant"] for r in report["inpainting"]] == [v[0] for v in edit_report.INPAINT_VARIANTS]
    assert set(report["img2img"][0]) == {"strength", "target_colour", "keeps_shape_and_position", "all", "blob_iou",
                                         "mean_abs_pixel_diff", "mean_abs_diff_background"}
    assert report["targets"] == ["a green square at the left"]  # red -> green, held-out wording 0: (template 0, phrase 2)
    assert len(images["img2img"][0.6]) == len(images["inpainted"]) == 1


def test_edit_report_strength_0_is_the_vae_round_trip_of_the_source(measured):
    pipe, source, report, images = measured
    x = torch.from_numpy(np.asarray(source, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]  # (1, 3, H, W)
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(7))  # the edit's first draw
        round_trip = pipe.image_processor.postprocess(pipe.vae.decode(z).sample, output_type="pil")[0]
    edited = np.asarray(images["img2img"][0.0][0], dtype=np.int16)
    assert np.abs(edited - np.asarray(round_trip, dtype=np.int16)).max() <= 1  # float rounding at the uint8 step
    expected = np.abs(np.asarray(round_trip, dtype=np.float64) - np.asarray(source, dtype=np.float64)).mean() / 255
    assert report["img2img"][0]["mean_abs_pixel_diff"] == pytest.approx(expected, abs=1 / 255)
    assert report["img2img"][0]["mean_abs_pixel_diff"] < report["img2img"][-1]["mean_abs_pixel_diff"]


def test_edit_report_paste_back_keeps_pixels_outside_the_mask_exactly(measured):
    _, _, report, _ = measured
    rows = {r["variant"]: r for r in report["inpainting"]}
    for name in ("blur 0", "strength 0.8, blur 0"):
        assert rows[name]["max_abs_diff_outside"] == 0.0 and rows[name]["pixels_where_alpha_0"] > 0
    assert rows["default"]["max_abs_diff_where_alpha_0"] == 0.0
    assert rows["no paste-back"]["max_abs_diff_outside"] > 0.05  # the random model repaints everything it decodes


def test_edit_report_mask_covers_the_source_blob_grown_by_the_margin(edit_report, measured):
    pipe, source, _, images = measured
    from ldm.evaluation.adherence import dominant_blob

    mask = np.asarray(images["masks"][0]) > 127
    blob = dominant_blob(np.asarray(source, dtype=np.float64))
    ys, xs = np.nonzero(mask)
    bys, bxs = np.nonzero(blob)
    margin = pipe.vae_scale_factor - 1
    assert mask[blob].all()
    assert (ys.min(), xs.min()) == (max(bys.min() - margin, 0), max(bxs.min() - margin, 0))
    assert (ys.max(), xs.max()) == (min(bys.max() + margin, 31), min(bxs.max() + margin, 31))
    assert mask.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # one filled box


def test_edit_report_writes_the_plot_grid_and_tables(edit_report, measured, tmp_path):
    from PIL import Image

    _, source, report, images = measured
    edit_report.plot_strength(report["img2img"], str(tmp_path / "strength.png"))
    edit_report.example_grid(images, edit_report.EXAMPLE_STRENGTHS, 6, str(tmp_path / "examples.png"), scale=1)
    with Image.open(tmp_path / "examples.png") as grid:  # one scene: one row of source, strengths, mask, inpainted
        assert grid.size == ((len(edit_report.EXAMPLE_STRENGTHS) + 3) * (source.width + 2), source.height + 2)
    assert (tmp_path / "strength.png").stat().st_size > 0
    text = edit_report.tables({"scenes": 1, "sources_graded_right": 1, **report})
    assert text.count("\n| ") == len(report["img2img"]) + len(report["inpainting"]) + 2  # rows and two headers
