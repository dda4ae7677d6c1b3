"""Checkpoints of a run at the end of every epoch and task, written atomically and checked by SHA-256 on reading.

A checkpoint file is one line of JSON (the header: format, payload size and SHA-256, and `meta`, what the run was:
its settings and where it stood), then the payload: `torch.save` of the whole `RunState` (the method with its model,
bases, statistics and memories; the open task's optimiser and lr schedule; the accuracy matrix so far) and every RNG
state. Pickling the state whole keeps everything a method changes mid-task (OWM's projectors, FS-DGPM's buffer, a
NESS adapter's V) without each method listing it, so a resumed run continues bit for bit on the same machine. Like
any `torch.load(weights_only=False)`, loading runs code from the file: resume only checkpoints you wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ness import distributed
from ness.results import atomic_file
from ness.trainer import RunObserver, RunState

log = logging.getLogger(__name__)

FORMAT = "ness-checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
EVERY: tuple[str, ...] = ("epoch", "task")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, truncated, of another format, or of another run's settings."""


def rng_states() -> dict[str, Any]:
    """Python's, NumPy's and torch's global RNG states (CPU, and every CUDA device when there is one)."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back what `rng_states` took; CUDA states only where this machine has CUDA."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: str | Path, state: RunState, meta: dict[str, Any]) -> Path:
    """Write `state` and the RNG states to `path` atomically: a temporary file, fsynced, then renamed over it."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({"state": state, "rng": rng_states()}, buffer)
    payload = buffer.getvalue()
    header = {
        "format": FORMAT,
        "version": VERSION,
        "payload_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "meta": meta,
    }
    with atomic_file(path, "wb") as f:
        f.write(json.dumps(header).encode() + b"\n")
        f.write(payload)
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    """A checkpoint's header (format, size, SHA-256, meta) without reading the payload; errors say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}'")
    with path.open("rb") as f:
        line = f.readline(1 << 20)
    try:
        header = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(
            f"'{path}' is not a ness checkpoint (its first line is not a {FORMAT} header), so it was not loaded; "
            "move it away or delete it to start the run again"
        )
    if header.get("version") != VERSION:
        raise CheckpointError(
            f"'{path}' is a version {header.get('version')} checkpoint; this ness-cl reads version {VERSION}, so it "
            "was not loaded; resume it with the ness-cl that wrote it, or delete it to start the run again"
        )
    if not isinstance(header.get("payload_bytes"), int) or not isinstance(header.get("sha256"), str):
        raise CheckpointError(f"'{path}' has a damaged header (no payload size or SHA-256), so it was not loaded")
    return header


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = None) -> tuple[dict[str, Any], Any]:
    """(meta, payload) of a checkpoint, after checking the payload's size and SHA-256 against the header; a
    corrupt or truncated file raises CheckpointError and is not unpickled."""
    path = Path(path)
    header = read_header(path)
    data = path.read_bytes()
    payload = data[data.index(b"\n") + 1 :]
    if len(payload) != header["payload_bytes"] or hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or truncated: its payload ({len(payload)} bytes) does not match the size "
            f"({header['payload_bytes']}) and SHA-256 its header records, so it was not loaded; delete it to start "
            "the run again, or restore the file from a copy"
        )
    return header["meta"], torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)


def resume_state(path: str | Path, map_location: str | torch.device | None = None) -> tuple[dict[str, Any], RunState]:
    """(meta, state) of a checkpoint, with the global RNG states put back as they were when it was written."""
    meta, payload = load_checkpoint(path, map_location)
    restore_rng_states(payload["rng"])
    return meta, payload["state"]


def remove_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files a killed write of `path` left beside it (never the checkpoint itself)."""
    path = Path(path)
    stale = list(path.parent.glob(f".{path.name}.*.tmp"))
    for temporary in stale:
        temporary.unlink(missing_ok=True)
    return stale


class Checkpointer(RunObserver):
    """Saves the run to `path` after every epoch (every="epoch") or only after every task (every="task").

    With `min_seconds` > 0, an epoch's checkpoint is skipped while the last one is younger than that (a large model
    on a fast GPU: a kill then loses at most `min_seconds` plus an epoch); a task's end is always saved."""

    def __init__(self, path: str | Path, meta: dict[str, Any], every: str = "epoch", min_seconds: float = 0.0) -> None:
        if every not in EVERY:
            raise ValueError(f"checkpoint every {every!r}: choose one of {EVERY}")
        if not (isinstance(min_seconds, (int, float)) and min_seconds >= 0):
            raise ValueError(f"checkpoint interval {min_seconds!r}: a number of seconds ≥ 0 (0: every epoch)")
        self.path, self.meta, self.every, self.min_seconds = Path(path), meta, every, float(min_seconds)
        self._last = -float("inf")

    def save(self, state: RunState, position: dict[str, Any]) -> None:
        if not distributed.is_main():  # several processes hold the same state: rank 0 writes it, every rank reads it
            return
        save_checkpoint(self.path, state, {**self.meta, "position": position})
        self._last = time.monotonic()
        log.debug("checkpoint %s: %s", self.path, position)

    def epoch_end(self, state: RunState, record: dict[str, Any]) -> None:
        if self.every == "epoch" and time.monotonic() - self._last >= self.min_seconds:
            self.save(state, {"task": record["task"], "epochs_done": record["epoch"] + 1})

    def task_end(self, state: RunState, record: dict[str, Any]) -> None:
        self.save(state, {"tasks_done": state.tasks_done})
