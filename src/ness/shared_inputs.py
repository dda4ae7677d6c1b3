"""A statistics pass's per-layer sums Σxxᵀ and row samples, one per distinct input: layers that read the very same
input tensor in every batch share them instead of keeping identical copies.

q_proj, k_proj and v_proj of an attention block, and gate_proj and up_proj of a LLaMA MLP, are called one after the
other with one tensor, so their rows, their Σxxᵀ and their sample of rows are the same. Sharing is decided from what
the forward hooks see, never from names: consecutive calls of layers with the same tensor object (unchanged in place
in between) and the same way of making rows (`ness.subspace.row_signature`, and the bias input) form a *run*, whose
rows are made and sampled once; layers share an accumulator while they have been in the very same runs, batch after
batch. A layer that once leaves its group's run (another input, a batch without it, a second call) splits off with a
copy of what the group had summed, so every layer's statistics are exactly those of its own inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ness.modules import tensor_version
from ness.subspace import CovarianceSum, largest_keys, sample_positions


@dataclass
class LayerStatistics:
    """One layer's inputs over a task: Σxxᵀ (NESSConfig.statistics_dtype) and a uniform sample of rows."""

    covariance: Tensor
    probe: Tensor
    probe_keys: Tensor


@dataclass
class _Accumulator:
    """What a group of layers with the same inputs has summed so far: Σxxᵀ, and the sampled rows with their keys (the
    merged sample, and the runs' samples still to merge into it)."""

    total: CovarianceSum
    probe: Tensor
    probe_keys: Tensor
    layers: set[str]
    pending: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    pending_rows: int = 0

    def split(self, layers: set[str]) -> _Accumulator:
        """A copy of what the group holds for `layers`, which leave it (the sampled rows are shared: never changed)."""
        self.layers -= layers
        return _Accumulator(
            self.total.copy(), self.probe, self.probe_keys, layers, list(self.pending), self.pending_rows
        )

    def add(self, rows: Tensor, weight: float, sample: Tensor, sample_keys: Tensor, k: int) -> None:
        """Add `rows` (times `weight`) to the sum, and the run's sampled rows (its top-k keys) to the sample."""
        self.total.add(rows, weight)
        self.pending.append((sample, sample_keys))
        self.pending_rows += sample_keys.numel()
        if self.pending_rows >= 4 * k:  # merged a few batches at a time, not each batch: one copy of the sample
            self.merge(k)

    def merge(self, k: int) -> None:
        """Keep the k rows with the largest keys of the sample and the pending ones: a uniform sample without
        replacement of every row so far (the overall top k lies within each run's own top k, so only those rows
        were copied off the device)."""
        if not self.pending:
            return
        pool_keys = torch.cat([self.probe_keys, *(keys for _, keys in self.pending)])
        pool_rows = torch.cat([self.probe, *(rows for rows, _ in self.pending)])
        self.probe_keys, self.probe = largest_keys(pool_keys, k, pool_rows)
        self.pending, self.pending_rows = [], 0


@dataclass
class _Run:
    """Consecutive calls of layers with one input: the tensor (and its version, bumped by in-place changes), how
    the layers make rows of it, the layers, the rows to sum (with their weight) and the run's own top-k sample."""

    x: Tensor
    version: int | None
    signature: Hashable
    layers: list[str]
    rows: Tensor
    weight: float
    sample: Tensor
    sample_keys: Tensor

    def reads(self, x: Tensor, signature: Hashable) -> bool:
        """Whether a layer making rows as `signature` says from `x` gets this run's rows: the very tensor, unchanged
        in place since (an in-place operation bumps its version), made into rows alike."""
        return x is self.x and tensor_version(x) == self.version and signature == self.signature


RowsAndKeys = Callable[[], tuple[Tensor, Tensor, int | None]]
"""Makes a layer's rows of its input, one random key per row for the sample, and the rows per sample where only
some of them need be summed (a convolution's output positions; None: every row is summed)."""


class SharedInputs:
    """Collects a pass's statistics: `add` from each layer's forward pre-hook, `end_batch` after each batch's
    forward pass, then `statistics()`. `new_sum` makes an empty Σxxᵀ (its dtype and device); `k` rows are sampled
    from all rows. With `positions` = m, a layer whose rows come in samples of P > m (a convolution's) sums only a
    random m per sample into Σxxᵀ, weighted P/m (`sample_positions`): an unbiased estimate, not the exact sum."""

    def __init__(self, k: int, new_sum: Callable[[], CovarianceSum], positions: int | None = None) -> None:
        self.k, self.new_sum, self.positions = k, new_sum, positions
        self.groups: dict[str, _Accumulator] = {}  # layer → its accumulator, one object per group
        self._run: _Run | None = None

    def add(self, name: str, x: Tensor, signature: Hashable, rows_and_keys: RowsAndKeys) -> None:
        """Layer `name` is called with `x`; `signature` says how it makes rows of it, `rows_and_keys()` makes them
        (with one random key per row), called only when the layer does not join the run under way."""
        run = self._run
        if run is not None and name not in run.layers and run.reads(x, signature):  # a second call: a run of its own
            run.layers.append(name)
            return
        self.end_batch()
        rows, keys, per_sample = rows_and_keys()
        if rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            # rows that view x (a Linear layer's) wait to be summed: a copy, since the model may change x in place
            # once the layer has read it (ReLU(inplace=True), +=), and the sum needs what the layer read
            rows = rows.clone()
        sample_keys, sample = largest_keys(keys, self.k, rows)
        sample = sample.detach().float().cpu()
        weight = 1.0
        if self.positions is not None and per_sample is not None:  # the probes above come from every row
            rows, weight = sample_positions(rows, keys, per_sample, self.positions)
        self._run = _Run(x, tensor_version(x), signature, [name], rows, weight, sample, sample_keys)

    def end_batch(self) -> None:
        """Close the run under way (a batch's forward pass has ended, or a layer read another input): its rows go
        into the accumulator of its layers, which splits when only some of the layers sharing it were in the run."""
        run, self._run = self._run, None
        if run is None:
            return
        members: dict[int | None, list[str]] = {}  # accumulator (by id; None: none yet) → the run's layers it holds
        for name in run.layers:
            members.setdefault(id(self.groups[name]) if name in self.groups else None, []).append(name)
        for key, names in members.items():
            if key is None:  # first calls: a new group, from nothing
                empty = run.sample[:0]
                target = _Accumulator(self.new_sum(), empty, torch.empty(0, dtype=run.sample_keys.dtype), set(names))
            else:
                group = self.groups[names[0]]
                target = group if group.layers == set(names) else group.split(set(names))
            target.add(run.rows, run.weight, run.sample, run.sample_keys, self.k)
            self.groups.update(dict.fromkeys(names, target))

    def first_of_group(self, names: list[str]) -> list[int]:
        """For each of `names` (layers called in the pass), the position in `names` of the first one in its group."""
        first: dict[int, int] = {}
        for i, name in enumerate(names):
            first.setdefault(id(self.groups[name]), i)
        return [first[id(self.groups[name])] for name in names]

    def refine(self, keys: dict[str, Hashable]) -> None:
        """Split the groups so that layers share only where their `keys` are equal too (every rank's grouping, so
        that all ranks sum the same groups)."""
        self.end_batch()
        for group in list({id(g): g for g in self.groups.values()}.values()):
            parts: dict[Hashable, set[str]] = {}
            for name in sorted(group.layers):
                parts.setdefault(keys[name], set()).add(name)
            for names in list(parts.values())[1:]:
                self.groups.update(dict.fromkeys(names, group.split(names)))

    def statistics(self) -> dict[str, LayerStatistics]:
        """Each called layer's statistics; the layers of a group map to one LayerStatistics object."""
        self.end_batch()
        made: dict[int, LayerStatistics] = {}
        for group in self.groups.values():
            if id(group) not in made:
                group.merge(self.k)
                made[id(group)] = LayerStatistics(group.total.result(), group.probe, group.probe_keys)
        return {name: made[id(group)] for name, group in self.groups.items()}
