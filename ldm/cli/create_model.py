"""`ldm create-model --model tiny --out DIR`: a randomly initialised model folder, built offline from a preset."""
from __future__ import annotations

from ldm.ranges import int_in


def add_arguments(p):
    p.add_argument("--model", default="tiny", deprecated=["--preset"],
                   help="a preset: tiny, small, sd15, sd21, sdxl, sdxl-tiny, dit-small, dit-xl-2, pixart-alpha, ... "
                        "(ldm.models.presets.MODEL_PRESETS)")
    p.add_argument("--out", required=True, help="folder to write (diffusers layout)")
    p.add_argument("--seed", type=int_in("[0, 4294967295]"), default=0, help="initialisation seed")


def run(args) -> int:
    from ldm import Pipeline
    from ldm.models.presets import build_components, count_parameters, get_spec

    spec = get_spec(args.model)
    pipe = Pipeline(**build_components(spec, seed=args.seed))
    pipe.save_pretrained(args.out)
    names = (spec.backbone, "vae", "text_encoder") + (("text_encoder_2",) if spec.is_sdxl else ())
    sizes = ", ".join(f"{n} {count_parameters(getattr(pipe, n)):,}" for n in names)
    print(f"wrote {args.model} model to {args.out} ({sizes} parameters; {spec.resolution} px native)")
    return 0
