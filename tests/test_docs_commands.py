"""Shell blocks of the documentation that run offline, run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"
COMMAND = re.compile(r"\s*(ness |python -m ness |(python -m torch\.distributed\.run|torchrun) .* -m ness )")
"""The start of a line that runs ness."""
PAPER_BENCHMARKS = ("split_cifar100", "five_datasets", "split_miniimagenet")
"""What `BENCH` stands for in docs/reproduce.md's table."""


def shell_block(path: Path, containing: str) -> str:
    """The one ``` block (no language) of `path` that contains `containing`."""
    blocks, current, language = [], None, None
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, language = [], line[3:].strip()
            else:
                if not language:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    blocks = [b for b in blocks if containing in b]
    assert len(blocks) == 1, f"{path.name} has {len(blocks)} blocks containing {containing!r}, not one"
    return blocks[0]


def test_the_guides_adapter_commands_run_as_written(tmp_path):
    """`ness run ... --save-adapters`, then `ness adapters` to describe, merge, and merge task 2's own model."""
    script = shell_block(GUIDE, "--save-adapters")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "adapter_model.safetensors" in done.stdout  # the description lists the files
    merged, own = load_file(tmp_path / "merged.safetensors"), load_file(tmp_path / "task2.safetensors")
    assert merged.keys() == own.keys() and merged  # the same architecture, task 2's own weights differ
    assert any(not (merged[k] == own[k]).all() for k in merged)


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every `ness ...` command in a shell block of the README and the docs (continuation lines
    joined, comments dropped) or in an inline code span with an option; one with a `...` placeholder is left out."""
    import shlex

    root = GUIDE.parents[1]
    found = []
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        in_block, language, pending = False, "", ""
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_block, language = not in_block, line[3:].strip()
                continue
            if not in_block:  # a whole command in an inline code span (the table of docs/reproduce.md)
                for span in re.findall(r"`(ness [^`]*--[^`]*)`", line):
                    if "..." in span:
                        continue
                    argv = shlex.split(span)[1:]
                    for benchmark in PAPER_BENCHMARKS if "BENCH" in argv else [None]:  # BENCH: each of the table's
                        found.append((f"{path.name}:{number}", [benchmark if w == "BENCH" else w for w in argv]))
                continue
            if language:
                continue
            text = pending + line
            if text.rstrip().endswith("\\"):
                pending = text.rstrip()[:-1] + " "
                continue
            pending = ""
            if not COMMAND.match(text):
                continue  # not a command line (a directory listing, an output, another tool)
            words = shlex.split(text, comments=True)
            if "ness" in words and "..." not in words:
                start = words.index("ness")
                if start == 0 or words[start - 1] == "-m":
                    found.append((f"{path.name}:{number}", words[start + 1 :]))
    return found


def test_every_documented_command_is_valid():
    """Each `ness` command shown in the README and the docs parses, and each `ness run --benchmark` one resolves its
    settings (benchmark, method or variant, preset, --set keys and values, --network) as a real run would."""
    from ness.cli import Plan, build_parser
    from ness.experiment import resolve_settings

    commands = documented_commands()
    assert len(commands) >= 10, commands  # the README's overview, the guide's, the command line page's
    for where, argv in commands:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as err:
            raise AssertionError(f"{where}: `ness {' '.join(argv)}` does not parse") from err
        if args.command == "run" and args.benchmark:
            # a GPU command: this machine may have none, and that is not the doc's fault
            args.set = [(key, value) for key, value in args.set or [] if key != "device"]
            try:
                for spec in Plan.from_args(args).runs:  # as `ness run` builds and resolves them
                    resolve_settings(spec)
            except ValueError as err:
                raise AssertionError(f"{where}: `ness {' '.join(argv)}`: {err}") from err
