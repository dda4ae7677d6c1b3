"""Networks and the multi-head convention the trainer and methods rely on."""

from ness.models.heads import MultiHeadNet, call_model, head_parameters, task_heads
from ness.models.mlp import mlp_backbone, multi_head_mlp, shared_head_mlp

__all__ = [
    "MultiHeadNet",
    "call_model",
    "head_parameters",
    "mlp_backbone",
    "multi_head_mlp",
    "shared_head_mlp",
    "task_heads",
]
