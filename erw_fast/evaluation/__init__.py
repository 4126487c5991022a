"""Sample-quality and representation evaluation: FID/sFID/IS/precision/recall, CKNNA.

The Inception network (torchvision / pytorch-fid) is imported only when one is built.
"""

from erw_fast.evaluation.cknna import cknna, hsic_unbiased, pool_features
from erw_fast.evaluation.evaluator import (
    Activations,
    compute_activations,
    evaluate_batches,
    read_npz_images,
    reference_statistics,
)
from erw_fast.evaluation.fid import (
    GaussianStats,
    frechet_distance,
    inception_score,
    inception_score_from_probs,
    trace_sqrt_product,
)
from erw_fast.evaluation.inception import (
    InceptionFeatureExtractor,
    InceptionOutputs,
    build_fid_inception,
    tf_legacy_resize_bilinear,
)
from erw_fast.evaluation.layerwise import layerwise_cknna, sit_layer_features
from erw_fast.evaluation.precision_recall import manifold_precision_recall, manifold_radii, pairwise_sq_distances

__all__ = [
    "Activations",
    "GaussianStats",
    "InceptionFeatureExtractor",
    "InceptionOutputs",
    "build_fid_inception",
    "cknna",
    "compute_activations",
    "evaluate_batches",
    "frechet_distance",
    "hsic_unbiased",
    "inception_score",
    "inception_score_from_probs",
    "layerwise_cknna",
    "manifold_precision_recall",
    "manifold_radii",
    "pairwise_sq_distances",
    "pool_features",
    "read_npz_images",
    "reference_statistics",
    "sit_layer_features",
    "tf_legacy_resize_bilinear",
    "trace_sqrt_product",
]
