"""instcontrast: instance-aware pixel contrastive learning for instance segmentation.

The public API:

- :class:`InstanceAwarePixelContrast`, the loss module (:mod:`instcontrast.loss`);
- :class:`InstanceAwareSampler`, the exact score-proportional negative sampler;
- :class:`PixelMemoryBank`, a FIFO of extra negative candidates;
- the pure functions of :mod:`instcontrast.functional`;
- :func:`align_views` and :class:`ViewGeometry` for weak/strong view alignment.
"""

from ._backend import BACKENDS, resolve_backend
from .functional import (
    SCORES,
    STRATEGIES,
    debias_score,
    empirical_margin,
    false_negative_rate,
    fused_probability,
    pixel_hinge,
    pixel_info_nce,
)
from .loss import ContrastOutput, ContrastStats, InstanceAwarePixelContrast
from .memory_bank import PixelMemoryBank
from .sampler import CandidateBlocks, InstanceAwareSampler, NegativeSamples
from .views import ViewGeometry, align_views

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "SCORES",
    "STRATEGIES",
    "CandidateBlocks",
    "ContrastOutput",
    "ContrastStats",
    "InstanceAwarePixelContrast",
    "InstanceAwareSampler",
    "NegativeSamples",
    "PixelMemoryBank",
    "ViewGeometry",
    "__version__",
    "align_views",
    "debias_score",
    "empirical_margin",
    "false_negative_rate",
    "fused_probability",
    "pixel_hinge",
    "pixel_info_nce",
    "resolve_backend",
]
