"""ldm: text-to-image latent diffusion you can train, fine-tune, sample and diagnose.

    from ldm import Pipeline
    pipe = Pipeline.from_pretrained("models/demo")
    image = pipe("a red circle on the left", guidance_scale=7.5).images[0]
"""
__version__ = "0.1.0"

_LAZY = {
    "Pipeline": "ldm.pipelines",
    "PipelineOutput": "ldm.pipelines",
    "StepRecord": "ldm.pipelines",
    "MODEL_PRESETS": "ldm.models.presets",
    "build_components": "ldm.models.presets",
    "build_clip_tokenizer": "ldm.models.tokenizer",
    "make_scheduler": "ldm.pipelines.schedulers",
    "SCHEDULERS": "ldm.pipelines.schedulers",
}


def __getattr__(name):
    # Lazy exports keep `import ldm` (and `ldm --help`) fast: torch and diffusers load on first use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")


__all__ = list(_LAZY)
