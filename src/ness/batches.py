"""Model inputs as a batch carries them: a tensor, or a mapping of tensors (a Hugging Face batch: `input_ids`,
`attention_mask`, `pixel_values`, ...). The few operations the methods need on either kind live here.

A mapping's `attention_mask` (1 for a real token, 0 for padding) decides which rows of a token layer's input count
in a statistics pass: padding positions never enter a covariance, a probe or a row count (`token_rows`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

ModelInputs = Tensor | Mapping[str, Any]
"""What a model is called with: `model(x)` for a tensor, `model(**inputs)` for a mapping."""

LABEL_KEYS: tuple[str, ...] = ("labels", "label")
"""Keys of a mapping batch that hold targets, not model inputs (left out of a statistics pass)."""

MASK_KEY = "attention_mask"


def model_inputs(batch: Any, where: str) -> ModelInputs:
    """The model inputs of a batch: `x`, the `x` of `(x, y, ...)`, or a mapping without its label keys.

    Token batches whose padding mask would be lost are refused (`check_tuple_batch`, `check_mapping_mask`): the
    model would be called without it, or its statistics would count the padding."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(inputs, Mapping):
        inputs = {key: value for key, value in inputs.items() if key not in LABEL_KEYS}
        if not any(isinstance(value, Tensor) for value in inputs.values()):
            raise TypeError(f"{where}: a mapping batch holds no tensor besides its labels (keys: {sorted(inputs)})")
        check_mapping_mask(inputs, where)
        return inputs
    if not isinstance(inputs, Tensor):
        raise TypeError(
            f"{where}: a batch must be a tensor, an (inputs, labels) pair or a mapping of tensors (a Hugging Face "
            f"batch), got {type(inputs).__name__}"
        )
    if isinstance(batch, (tuple, list)):
        check_tuple_batch(batch, where)
    return inputs


def _token_ids(tensors: Mapping[str, Any]) -> list[Tensor]:
    """The tensors that look like token ids: integer (not boolean), (B, T), not named a mask."""
    return [
        v
        for k, v in tensors.items()
        if isinstance(v, Tensor)
        and v.dim() == 2
        and not (v.is_floating_point() or v.dtype == torch.bool)
        and "mask" not in k.lower()
    ]


def _binary(values: Tensor) -> bool:
    """Whether every value is 0 or 1 (a mask; per-token labels padded with -100 are not)."""
    return bool(((values == 0) | (values == 1)).all())


def check_tuple_batch(batch: tuple | list, where: str) -> None:
    """Refuse a tuple batch of integer token ids x whose padding mask would be dropped: only x reaches the model, so
    another 0/1 tensor of x's (B, T) shape (a padding mask) would be lost, and padding would enter the statistics."""
    x = batch[0]
    if not _token_ids({"x": x}):
        return
    for index, value in enumerate(batch[1:], start=1):
        if isinstance(value, Tensor) and value.shape == x.shape and _binary(value):
            raise ValueError(
                f"{where}: the batch's element {index} has the shape {tuple(x.shape)} of its token ids x, a per-token "
                "input such as a padding mask; a tuple batch gives the model x alone, so the model would run without "
                "it and padding would enter the statistics. Give mapping batches, e.g. {'input_ids': ids, "
                "'attention_mask': mask, 'labels': y}: the attention mask keeps padding out, and the model is called "
                "as model(**inputs), or as you say with NESS(model, config, forward=lambda model, batch, t: "
                "model(batch['input_ids'], batch['attention_mask']))"
            )


def check_mapping_mask(inputs: Mapping[str, Any], where: str) -> None:
    """Refuse a mapping batch whose padding mask has another name: only `attention_mask` is read as the padding
    mask, so another '*mask*' key of the token ids' shape would leave the padding in the statistics."""
    if MASK_KEY in inputs:
        return
    shapes = {ids.shape for ids in _token_ids(inputs)}
    other = [k for k, v in inputs.items() if "mask" in k.lower() and isinstance(v, Tensor) and v.shape in shapes]
    if other:
        raise ValueError(
            f"{where}: the batch's {other[0]!r} has the shape of its token ids but NESS reads only "
            f"'{MASK_KEY}' (1 for a real token, 0 for padding) as the padding mask, so padding would enter the "
            f"statistics; name it '{MASK_KEY}' (and call the model your way with NESS(..., forward=lambda model, "
            "batch, t: ...) if its forward takes another name)"
        )


def tensors_of(inputs: ModelInputs) -> list[Tensor]:
    """The tensors the inputs hold."""
    if isinstance(inputs, Tensor):
        return [inputs]
    return [value for value in inputs.values() if isinstance(value, Tensor)]


def batch_rows(inputs: ModelInputs) -> int:
    """The number of samples in the batch: the first dimension of its tensors, which must agree."""
    sizes = {tensor.shape[0] for tensor in tensors_of(inputs) if tensor.dim()}
    if len(sizes) != 1:
        raise ValueError(f"the batch's tensors disagree on the number of samples (first dimensions {sorted(sizes)})")
    return sizes.pop()


def select_rows(inputs: ModelInputs, index: slice | Tensor) -> ModelInputs:
    """The samples `index` of the batch: of the tensor, or of each tensor of a mapping (other values as they are)."""
    if isinstance(inputs, Tensor):
        return inputs[index]
    return {k: v[index] if isinstance(v, Tensor) and v.dim() else v for k, v in inputs.items()}


def to_device(inputs: ModelInputs, device: torch.device | str) -> ModelInputs:
    """The batch on `device`."""
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}


def attention_mask(inputs: ModelInputs) -> Tensor | None:
    """The batch's (B, T) attention mask, or None (a tensor batch, or a mapping without one)."""
    mask = None if isinstance(inputs, Tensor) else inputs.get(MASK_KEY)
    return mask if isinstance(mask, Tensor) else None


def token_rows(x: Tensor, mask: Tensor, layer: str) -> Tensor | None:
    """Which rows of a token layer's input x (B, T, ..., d) are real tokens, flattened as the layer's rows are:
    the (B, T) attention mask as booleans. None when each row is a whole sample (pooled features, (B, d)).
    An input the mask cannot index is refused rather than counted with its padding."""
    leading = x.shape[:-1]
    if leading == mask.shape:
        return mask.reshape(-1) != 0
    if x.dim() == 2 and leading[0] == mask.numel():  # (B·T, d): the model flattened batch and positions
        return mask.reshape(-1) != 0
    if x.dim() == 2 and leading[0] == mask.shape[0]:
        return None
    raise ValueError(
        f"layer '{layer}': its input of shape {tuple(x.shape)} cannot be matched with the batch's attention mask of "
        f"shape {tuple(mask.shape)}, so its padding rows cannot be left out of the statistics; exclude the layer "
        "(exclude=[...]) or pass batches without an attention_mask if they hold no padding"
    )
