"""Run `ness` in a subprocess that SIGKILLs itself at a chosen point: `python kill_harness.py POINT ARGS...`.

The points (each counted from the start of the process):
- `step:N`        before the N-th training step (mid-epoch when N is not a multiple of the steps per epoch);
- `task_end:T`    right after the checkpoint of task T's end is written (between tasks);
- `statistics:T`  after NESS's statistics pass of task T has read two batches;
- `rename:N`      in the N-th checkpoint write, after the temporary file is complete but before it is renamed.
SIGKILL is sent by the process to itself, so no `finally`, `atexit` or buffered write runs: as `kill -9` would.
"""

from __future__ import annotations

import os
import signal
import sys


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    kind, _, value = point.partition(":")
    at = int(value)
    if kind == "step":
        import ness.trainer as trainer

        original = trainer.epoch_batches
        count = [0]

        def counted(*args, **kwargs):  # each training batch the trainer draws: one step
            for batch in original(*args, **kwargs):
                count[0] += 1
                if count[0] == at:
                    die()
                yield batch

        trainer.epoch_batches = counted
    elif kind == "task_end":
        from ness.checkpoint import Checkpointer

        task_end = Checkpointer.task_end

        def then_die(self, state, record):
            task_end(self, state, record)
            if record["task"] == at:
                die()

        Checkpointer.task_end = then_die
    elif kind == "statistics":
        from ness.methods.ness import NESS

        on_end_task = NESS.on_end_task

        def killing(self, t, batches):
            def read():
                for i, batch in enumerate(batches):
                    if t == at and i == 2:
                        die()
                    yield batch

            return on_end_task(self, t, read())

        NESS.on_end_task = killing
    elif kind == "rename":
        import ness.results as results

        replace, count = os.replace, [0]

        class OS:
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def replace(src, dst):
                if str(dst).endswith("checkpoint.pt"):
                    count[0] += 1
                    if count[0] == at:
                        die()
                return replace(src, dst)

        results.os = OS()
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    from ness.cli import main

    sys.exit(main(sys.argv[2:]))
