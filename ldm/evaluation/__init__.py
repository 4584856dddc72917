"""Evaluation of a model: prompt adherence, FID / KID, CLIP score and memorisation, all from local weights.

    from ldm.evaluation import frechet_distance, kernel_inception_distance, load_feature_extractor, clip_score
Nothing is downloaded: each metric that needs weights takes a local file and says where to get it when missing.
"""
from ldm.evaluation.fid import feature_statistics, frechet_distance, kernel_inception_distance
from ldm.evaluation.images import load_image_folder, to_unit_batch

_LAZY = {"load_feature_extractor": "ldm.evaluation.features", "TinyFeatureNet": "ldm.evaluation.features",
         "InceptionFeatures": "ldm.evaluation.features", "extract_features": "ldm.evaluation.features",
         "load_clip": "ldm.evaluation.clip_score", "clip_score": "ldm.evaluation.clip_score",
         "evaluate_model": "ldm.evaluation.run"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldm.evaluation' has no attribute {name!r}")


__all__ = ["feature_statistics", "frechet_distance", "kernel_inception_distance", "load_image_folder", "to_unit_batch",
           *_LAZY]
