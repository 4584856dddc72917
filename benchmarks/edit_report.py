"""What img2img and inpainting do on the shapes demo model, graded by ldm.evaluation.adherence (no learned judge).

    python benchmarks/edit_report.py --model runs/demo/pipeline --out benchmarks/results/edit

1. Sources: each of --num-scenes scenes (ldm.evaluation.shape_prompts.eval_scenes) is sampled from its canonical
   prompt ("a red circle on the left"; DDIM, --steps steps, guidance --guidance-scale, seed --seed + scene index);
   only the sources the grader reads as their prompt are edited (the report says how many).
2. img2img: the target is the same scene in another colour, written in a wording the demo never trained on
   (data/shapes.py HELD_OUT_WORDINGS). For each strength: the fraction of edits graded with the target colour, the
   fraction keeping the source's shape and position, and the mean absolute pixel difference to the source (on
   [0, 1]; at strength 0 it is the VAE round trip's).
3. Inpainting with the same 4-channel model (latent blending): the mask is the source blob's bounding box grown by
   the VAE factor minus one pixel (so every latent cell the shape touches is repainted), the prompt the target.
   Each variant (strength, masked content, mask blur, paste-back) reports the target-colour rate and how much the
   pixels outside the mask changed: exactly nothing where the blurred mask is 0 with paste-back on.

Writes report.json into --out, and strength.png and examples.png (source | img2img at strengths 0.05, 0.1, 0.4
and 0.8 | mask | inpainted with the defaults, six scenes) into --figures.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
STRENGTHS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)  # int(steps * strength) steps run: 0.05 of 30 is one
EXAMPLE_STRENGTHS = (0.05, 0.1, 0.4, 0.8)
# (name, strength, masked_content, mask_blur, paste_back). At strength 1 the masked area starts from pure noise
# whatever masked_content says (editing.initial_latents), so "original" against "noise" is compared at 0.8.
INPAINT_VARIANTS = (
    ("default", 1.0, "original", 4, True),
    ("no paste-back", 1.0, "original", 4, False),
    ("blur 0", 1.0, "original", 0, True),
    ("blur 1", 1.0, "original", 1, True),
    ("strength 0.8", 0.8, "original", 4, True),
    ("strength 0.8, noise", 0.8, "noise", 4, True),
    ("strength 0.8, blur 0", 0.8, "original", 0, True),
)


def parse_args(argv=None):
    from ldm.flags import FlagParser
    from ldm.pipelines.checks import CALL_RANGES
    from ldm.ranges import float_in, int_in

    p = FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a pipeline folder (the shapes demo: runs/demo/pipeline)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "edit"), help="folder of report.json")
    p.add_argument("--figures", default=os.path.join(HERE, "figures", "edit"), help="folder of the PNGs")
    p.add_argument("--num-scenes", type=int_in("[1, 90]"), default=24, help="scenes sampled as sources (eval_scenes)")
    p.add_argument("--steps", type=int_in(CALL_RANGES["num_inference_steps"]), default=30,
                   help="DDIM steps of every sample and edit")
    p.add_argument("--guidance-scale", type=float_in(CALL_RANGES["guidance_scale"]), default=4.0)
    p.add_argument("--seed", type=int_in("[0, 1e9]"), default=0, help="scene i is sampled and edited with seed + i")
    return p.parse_args(argv)


def target_scene(index: int, scene: tuple[str, str, str]) -> tuple[str, str]:
    """Returns (target colour, target prompt) of a scene: the colour three places on in ldm.data.shapes.COLOURS
    (red -> green, orange -> blue, yellow -> purple and back), in held-out wording index % 4."""
    from ldm.data.shapes import COLOURS, SceneObject, single_wordings

    colour, shape, position = scene
    names = list(COLOURS)
    target = names[(names.index(colour) + 3) % len(names)]
    return target, single_wordings(SceneObject(shape, target, position), held_out=True)[index % 4]


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def make_sources(pipe, scenes, steps: int, guidance: float, seed: int) -> tuple[list, list[bool]]:
    """Returns (source images, whether the grader reads each as its canonical prompt)."""
    from ldm.evaluation.adherence import grade_image
    from ldm.evaluation.shape_prompts import canonical_prompt

    prompts = [canonical_prompt(*scene) for scene in scenes]
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                  generator=generators([seed + i for i in range(len(scenes))])).images
    return images, [grade_image(image, prompt)["all"] for image, prompt in zip(images, prompts)]


def pixels(image) -> np.ndarray:
    """Returns an image as (H, W, 3) float64 in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def box_mask(source, margin: int) -> Image.Image:
    """Returns the repaint mask (L, white = repaint) of the source's dominant blob's bounding box grown by `margin`
    pixels; all white when the grader finds no blob."""
    from ldm.evaluation.adherence import dominant_blob

    rgb = np.asarray(source.convert("RGB"), dtype=np.float64)
    blob = dominant_blob(rgb)
    mask = np.zeros(rgb.shape[:2], dtype=np.uint8)
    if blob is None:
        mask[:] = 255
    else:
        ys, xs = np.nonzero(blob)
        mask[max(ys.min() - margin, 0): ys.max() + margin + 1, max(xs.min() - margin, 0): xs.max() + margin + 1] = 255
    return Image.fromarray(mask, mode="L")


def edit(pipe, sources, prompts, seeds, steps: int, guidance: float, **kwargs) -> list:
    """Returns the edited images, one call for all sources (image i with generator seeds[i])."""
    height, width = sources[0].height, sources[0].width
    batch = torch.stack([torch.from_numpy(pixels(s)).permute(2, 0, 1) for s in sources]).float()  # (N, 3, H, W)
    if "mask_image" in kwargs:
        kwargs["mask_image"] = torch.stack([torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None]
                                            for m in kwargs["mask_image"]])  # (N, 1, H, W)
    return pipe(prompts, image=batch, num_inference_steps=steps, guidance_scale=guidance, generator=generators(seeds),
                height=height, width=width, **kwargs).images


def img2img_rows(pipe, sources, targets, seeds, masks, steps: int, guidance: float, strengths) -> tuple[list, dict]:
    """Returns (one row per strength, {strength: edited images}); the background is what lies outside the
    inpainting masks, which the recolouring need not touch."""
    from ldm.evaluation.adherence import grade_image

    rows, images = [], {}
    for strength in tqdm(strengths, desc="img2img strengths"):
        edited = edit(pipe, sources, [p for _, p in targets], seeds, steps, guidance, strength=strength)
        grades = [grade_image(image, prompt) for image, (_, prompt) in zip(edited, targets)]
        diffs = [float(np.abs(pixels(e) - pixels(s)).mean()) for e, s in zip(edited, sources)]
        background = [np.abs(pixels(e) - pixels(s))[np.asarray(m) < 128].mean() for e, s, m in
                      zip(edited, sources, masks)]
        overlaps = [blob_iou(e, s) for e, s in zip(edited, sources)]
        rows.append({"strength": strength, "target_colour": mean([g["colour"] for g in grades]),
                     "keeps_shape_and_position": mean([g["shape"] and g["position"] for g in grades]),
                     "all": mean([g["all"] for g in grades]), "blob_iou": mean(overlaps),
                     "mean_abs_pixel_diff": mean(diffs), "mean_abs_diff_background": mean(background)})
        images[strength] = edited
    return rows, images


def blob_iou(image, source) -> float:
    """Returns the IoU of the image's dominant blob with the source's (0 when either has none): whether the shape
    stays where it was, pixel for pixel, which the graded shape and position (same in source and target prompt)
    cannot tell from a new shape drawn anywhere in the same third."""
    from ldm.evaluation.adherence import dominant_blob

    a, b = (dominant_blob(np.asarray(x.convert("RGB"), dtype=np.float64)) for x in (image, source))
    if a is None or b is None:
        return 0.0
    return float((a & b).sum() / (a | b).sum())


def mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def outside_change(edited, sources, masks, mask_blur: int) -> dict:
    """Returns the largest and mean absolute pixel change (on [0, 1]) outside the binary mask, and the largest
    where the blurred mask (paste-back's alpha) is exactly 0."""
    from ldm.pipelines.editing import preprocess_mask

    outside, untouched = [], []
    for e, s, m in zip(edited, sources, masks):
        diff = np.abs(pixels(e) - pixels(s)).max(axis=-1)  # (H, W)
        binary = np.asarray(m) < 128
        alpha = preprocess_mask(m, m.height, m.width, mask_blur)[0, 0].numpy()  # (H, W)
        outside.append(diff[binary])
        untouched.append(diff[alpha == 0])
    flat, zero = np.concatenate(outside), np.concatenate(untouched)
    return {"max_abs_diff_outside": float(flat.max()) if flat.size else 0.0, "mean_abs_diff_outside": mean(flat),
            "max_abs_diff_where_alpha_0": float(zero.max()) if zero.size else 0.0,
            "pixels_where_alpha_0": int(zero.size)}


def inpaint_rows(pipe, sources, targets, seeds, masks, steps: int, guidance: float) -> tuple[list, dict]:
    """Returns (one row per INPAINT_VARIANTS entry, {variant name: inpainted images})."""
    from ldm.evaluation.adherence import grade_image

    rows, images = [], {}
    for name, strength, content, blur, paste_back in tqdm(INPAINT_VARIANTS, desc="inpainting variants"):
        edited = edit(pipe, sources, [p for _, p in targets], seeds, steps, guidance, mask_image=masks,
                      strength=strength, masked_content=content, mask_blur=blur, paste_back=paste_back)
        grades = [grade_image(image, prompt) for image, (_, prompt) in zip(edited, targets)]
        rows.append({"variant": name, "strength": strength, "masked_content": content, "mask_blur": blur,
                     "paste_back": paste_back, "target_colour": mean([g["colour"] for g in grades]),
                     "all": mean([g["all"] for g in grades]), **outside_change(edited, sources, masks, blur)})
        images[name] = edited
    return rows, images


def measure(pipe, sources, scenes, seeds, steps: int, guidance: float, strengths=STRENGTHS) -> tuple[dict, dict]:
    """Returns (report, images): img2img rows per strength and inpainting rows per variant of the given sources
    (scene i edited with seeds[i]), and the images the example grid shows."""
    targets = [target_scene(i, scene) for i, scene in enumerate(scenes)]
    masks = [box_mask(s, pipe.vae_scale_factor - 1) for s in sources]
    img2img, by_strength = img2img_rows(pipe, sources, targets, seeds, masks, steps, guidance, strengths)
    inpaint, by_variant = inpaint_rows(pipe, sources, targets, seeds, masks, steps, guidance)
    report = {"targets": [p for _, p in targets], "img2img": img2img, "inpainting": inpaint}
    return report, {"sources": sources, "img2img": by_strength, "masks": masks, "inpainted": by_variant["default"]}


def plot_strength(rows: list[dict], path: str) -> None:
    """Plots the target-colour rate, shape-and-position kept and mean pixel change against strength."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    x = [r["strength"] for r in rows]
    ax.plot(x, [r["target_colour"] for r in rows], "o-", label="target colour (graded)")
    ax.plot(x, [r["keeps_shape_and_position"] for r in rows], "s-", label="source shape and position kept")
    ax.plot(x, [r["blob_iou"] for r in rows], "d-", label="blob IoU with the source's")
    ax.plot(x, [r["mean_abs_pixel_diff"] for r in rows], "^--", label="mean |edit - source|, pixels in [0, 1]")
    ax.plot(x, [r["mean_abs_diff_background"] for r in rows], "v--", label="the same, outside the shape's box")
    ax.set(xlabel="img2img strength", ylim=(0, 1.02), title="img2img on the shapes demo: recolouring")
    ax.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def example_grid(images: dict, strengths, rows: int, path: str, scale: int = 2) -> None:
    """Writes `rows` scenes spread over the list (eval_scenes cycles the shapes in blocks of six) as
    source | img2img at each of `strengths` | mask | inpainted."""
    picked = sorted({int(round(k)) for k in np.linspace(0, len(images["sources"]) - 1, rows)})
    columns = [images["sources"], *(images["img2img"][s] for s in strengths), images["masks"], images["inpainted"]]
    w, h = images["sources"][0].size
    grid = Image.new("RGB", (len(columns) * (w + 2), len(picked) * (h + 2)), "white")
    for r, index in enumerate(picked):
        for c, column in enumerate(columns):
            grid.paste(column[index].convert("RGB"), (c * (w + 2), r * (h + 2)))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path, optimize=True)


def main(argv=None) -> dict:
    from ldm.evaluation.shape_prompts import eval_scenes
    from ldm.pipelines import Pipeline

    args = parse_args(argv)
    pipe = Pipeline.from_pretrained(args.model, scheduler="ddim")
    scenes = eval_scenes(args.num_scenes)
    all_sources, graded = make_sources(pipe, scenes, args.steps, args.guidance_scale, args.seed)  # one progress bar
    pipe.set_progress_bar_config(disable=True)  # the edits' bars are the sweeps' own
    kept = [i for i, ok in enumerate(graded) if ok]
    if not kept:
        sys.exit(f"none of the {len(scenes)} sources is graded as its prompt: is {args.model} the shapes demo?")
    report, images = measure(pipe, [all_sources[i] for i in kept], [scenes[i] for i in kept],
                             [args.seed + i for i in kept], args.steps, args.guidance_scale)
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "figures")},
              "scenes": len(scenes), "sources_graded_right": len(kept), **report}
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.figures, exist_ok=True)
    with open(os.path.join(args.out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    plot_strength(report["img2img"], os.path.join(args.figures, "strength.png"))
    example_grid(images, EXAMPLE_STRENGTHS, 6, os.path.join(args.figures, "examples.png"))
    print(tables(report))
    return report


def tables(report: dict) -> str:
    """Returns the report's two tables as markdown."""
    lines = [f"sources graded as their prompt: {report['sources_graded_right']} of {report['scenes']}", "",
             "| strength | target colour | shape and position kept | all three (target) | blob IoU with source | "
             "mean abs pixel diff | outside the shape's box |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['strength']:g} | {r['target_colour']:.0%} | {r['keeps_shape_and_position']:.0%} | "
              f"{r['all']:.0%} | {r['blob_iou']:.2f} | {r['mean_abs_pixel_diff']:.3f} | "
              f"{r['mean_abs_diff_background']:.3f} |" for r in report["img2img"]]
    lines += ["", "| inpainting | strength | masked content | blur | paste-back | target colour | all three | "
              "max diff outside mask | mean diff outside | max diff where alpha = 0 |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['strength']:g} | {r['masked_content']} | {r['mask_blur']} | {r['paste_back']} | "
              f"{r['target_colour']:.0%} | {r['all']:.0%} | {r['max_abs_diff_outside']:.3f} | "
              f"{r['mean_abs_diff_outside']:.4f} | {r['max_abs_diff_where_alpha_0']:.3f} |" for r in report["inpainting"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
