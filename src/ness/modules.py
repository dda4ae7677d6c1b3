"""Small helpers on module trees and tensors that the methods and the adapter files share: put a module in place of
another, a tensor's exact digest, a short list of names for messages, objects that several entries share, and an
attribute put on one object for the length of a block."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")


def short_list(names: Sequence[str], most: int = 6) -> str:
    """'a, b, c' for a few names; the first `most` and the count for more, so a message stays readable."""
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown}, … ({len(names)} in all)"


def tensor_version(tensor: Tensor) -> int | None:
    """The tensor's version counter (bumped by every in-place change); None for an inference tensor, which has none
    and which no code outside inference mode may change in place."""
    return None if tensor.is_inference() else tensor._version


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry is finite: one reduction, min and max (which a NaN anywhere turns NaN), instead of
    isfinite's elementwise mask and its `all` (some 10× slower on a CPU batch)."""
    if tensor.numel() == 0 or not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def tensor_digest(tensor: Tensor) -> bytes:
    """A digest of the tensor's bytes: two digests are equal only if the values are (bar a 2⁻¹²⁸ collision)."""
    data = tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8)
    return hashlib.blake2b(data.numpy().tobytes(), digest_size=16).digest()


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def distinct(items: Iterable[T]) -> list[T]:
    """`items` without repeats of the same object (by identity, not value), in order: a statistic that several
    layers share (they read one input) is counted, reduced or saved once."""
    return list({id(item): item for item in items}.values())


def shared_apply(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """`fn`, applied once per distinct tensor object: tensors that several entries share (the statistics of layers
    reading one input) stay shared in what it returns, where applying it to each entry would make copies."""
    done: dict[int, tuple[Tensor, Tensor]] = {}  # id → (the tensor, kept so that its id stays its own; fn of it)

    def apply(tensor: Tensor) -> Tensor:
        if id(tensor) not in done:
            done[id(tensor)] = (tensor, fn(tensor))
        return done[id(tensor)][1]

    return apply


@contextmanager
def instance_attribute(obj: object, name: str, value: Any) -> Iterator[None]:
    """`obj.name = value` inside the block (over the class's attribute); on exit, even after an error, the instance's
    own attribute of that name is put back, or removed when it had none."""
    own = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if own is None:
            delattr(obj, name)
        else:
            setattr(obj, name, own)
