"""Shell blocks of the documentation that run offline, run as written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"


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
