"""Run logs a user already reads: TensorBoard scalars, and the same figures as CSV and JSON lines.

`RunLog` is a `RunObserver`: after every epoch it logs the task's training loss, validation loss and lr; after
every task, its row of the accuracy matrix, ACC so far, and every number of the method's per-layer records for that
task (ranks, thresholds, the Eq. 8 bounds and certified shifts of NESS, GPM's energies, ...). Every scalar goes to
`scalars.csv` (tag, step, value) and to TensorBoard when the `tensorboard` package is installed; `events.jsonl`
holds one JSON object per epoch and task with the same figures. Files are appended to, so a resumed run goes on
in the same logs (epochs after the last checkpoint are logged again, with a `resumed` event before them).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from ness.metrics import average_accuracy
from ness.trainer import RunObserver, RunState

log = logging.getLogger(__name__)

CSV_FIELDS: tuple[str, ...] = ("time", "tag", "step", "value")


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    """TensorBoard tags of an epoch's figures; the step is the epoch."""
    t = record["task"]
    names = {"loss": "train_loss", "val_loss": "val_loss", "lr": "lr"}
    return {f"task_{t}/{name}": float(record[key]) for key, name in names.items() if key in record}


def task_scalars(record: dict[str, Any], acc_matrix: list[list[float]], layers: list[dict[str, Any]]) -> dict:
    """TensorBoard tags of a task's end; the step is the task: its accuracy row, ACC so far, the layer records'
    numbers (bools and text left out), the epochs it ran and its seconds."""
    t = record["task"]
    scalars = {f"accuracy/task_{j}": float(a) for j, a in enumerate(record["acc"])}
    finished = [row[: t + 1] for row in acc_matrix[: t + 1]]
    scalars["accuracy/mean_so_far"] = average_accuracy(finished)
    for key in ("epochs", "train_seconds", "boundary_seconds", "eval_seconds"):
        scalars[f"tasks/{key}"] = float(record[key])
    for layer in layers:
        name = layer.get("layer", "model")
        for key, value in layer.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "task":
                scalars[f"layers/{name}/{key}"] = float(value)
    return scalars


def tensorboard_writer(folder: Path) -> Any:
    """A SummaryWriter on `folder`, or None (with a warning once) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning(
            "--log-dir: TensorBoard files need the tensorboard package (pip install tensorboard); "
            "writing the CSV and JSON-lines logs only"
        )
        return None
    return SummaryWriter(log_dir=str(folder))


class RunLog(RunObserver):
    """Logs one run into `folder`: scalars.csv, events.jsonl, and TensorBoard event files."""

    def __init__(self, folder: str | Path, tensorboard: bool = True) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = tensorboard_writer(self.folder) if tensorboard else None
        new_csv = not (self.folder / "scalars.csv").exists()
        self._csv_file = (self.folder / "scalars.csv").open("a", newline="")
        self._csv = csv.writer(self._csv_file)
        if new_csv:
            self._csv.writerow(CSV_FIELDS)
        self._events = (self.folder / "events.jsonl").open("a")
        self._started = False

    def _first(self, state: RunState) -> None:
        """Before the first figure of this process: mark a resume, if the run continues from a checkpoint."""
        if not self._started and state.extras.get("resumed"):
            self.event("resumed", {"position": state.extras["resumed"][-1]})
        self._started = True

    def event(self, kind: str, figures: dict[str, Any]) -> None:
        """One line of events.jsonl."""
        self._events.write(json.dumps({"kind": kind, "time": time.time(), **figures}, allow_nan=True) + "\n")
        self._events.flush()

    def scalars(self, scalars: dict[str, float], step: int) -> None:
        now = time.time()
        for tag, value in scalars.items():
            self._csv.writerow((f"{now:.3f}", tag, step, value if math.isfinite(value) else repr(value)))
            if self.writer is not None:
                self.writer.add_scalar(tag, value, step, walltime=now)
        self._csv_file.flush()
        if self.writer is not None:
            self.writer.flush()

    def epoch_end(self, state: RunState, record: dict[str, Any]) -> None:
        self._first(state)
        self.event("epoch", record)
        self.scalars(epoch_scalars(record), record["epoch"])

    def task_end(self, state: RunState, record: dict[str, Any]) -> None:
        self._first(state)
        t = record["task"]
        layers = [r for r in state.method.diagnostics() if r.get("task") == t]
        scalars = task_scalars(record, state.acc_matrix, layers)
        self.event(
            "task", {**record, "layers": [{k: v for k, v in r.items() if k != "singular_values"} for r in layers]}
        )
        self.scalars(scalars, t)

    def close(self) -> None:
        self._csv_file.close()
        self._events.close()
        if self.writer is not None:
            self.writer.close()
