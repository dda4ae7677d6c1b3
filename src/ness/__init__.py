"""ness-cl: continual learning in the null space (NESS, CPAL 2026) for any PyTorch model."""

from ness.adapters import NullSpaceAdapter
from ness.methods import METHODS, NESS, ContinualMethod, FineTune, NESSConfig, build_method
from ness.methods.ness import TrainingLoopError
from ness.metrics import average_accuracy, backward_transfer

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "NESS",
    "ContinualMethod",
    "FineTune",
    "NESSConfig",
    "NullSpaceAdapter",
    "TrainingLoopError",
    "average_accuracy",
    "backward_transfer",
    "build_method",
]
