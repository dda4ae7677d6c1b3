"""Networks and the multi-head convention the trainer and methods rely on."""

from ness.models.alexnet import alexnet
from ness.models.heads import MultiHeadNet, call_model, head_parameters, logits_by_task, task_heads
from ness.models.mlp import mlp_backbone, multi_head_mlp, shared_head_mlp
from ness.models.resnet import reduced_resnet18
from ness.models.vit import VisionTransformer, vision_transformer

__all__ = [
    "MultiHeadNet",
    "VisionTransformer",
    "alexnet",
    "call_model",
    "head_parameters",
    "logits_by_task",
    "mlp_backbone",
    "multi_head_mlp",
    "reduced_resnet18",
    "shared_head_mlp",
    "task_heads",
    "vision_transformer",
]
