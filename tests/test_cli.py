"""Results files, the report and the `ness demo | run | report` command line, checked independently."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import stat
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ness.cli import main
from ness.results import load_results, report_markdown, summarize, write_json_atomic

RESULT_KEYS = {"method", "benchmark", "seed", "config", "acc_matrix", "acc", "bwt", "diagnostics", "timings"}
OFFICIAL_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


def acc_bwt_by_loop(r: list[list[float]]) -> tuple[float, float]:
    """ACC = (1/T) Σ_j R[T−1][j] and BWT = (1/(T−1)) Σ_{j<T−1} (R[T−1][j] − R[j][j]) (METHODS_SPEC §1.5)."""
    t = len(r)
    acc = sum(r[t - 1][j] for j in range(t)) / t
    bwt = 0.0 if t == 1 else sum(r[t - 1][j] - r[j][j] for j in range(t - 1)) / (t - 1)
    return acc, bwt


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


# -- write_json_atomic -------------------------------------------------------------------------------------------


def test_write_json_atomic_roundtrip_and_no_temp_files(tmp_path):
    data = {"acc": 91.25, "acc_matrix": [[90.0, 0.0], [88.5, 94.0]], "name": "ness", "nan": math.nan}
    target = tmp_path / "deep" / "er" / "results.json"  # parent folders are created
    assert write_json_atomic(target, data) == target
    loaded = json.loads(target.read_text())
    assert loaded["acc"] == 91.25 and loaded["acc_matrix"] == [[90.0, 0.0], [88.5, 94.0]]
    assert math.isnan(loaded["nan"])
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]
    # Overwriting replaces the content and still leaves no temporary file.
    write_json_atomic(target, {"acc": 1.0})
    assert json.loads(target.read_text()) == {"acc": 1.0}
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]


def test_write_json_atomic_failure_keeps_previous_file(tmp_path):
    target = tmp_path / "results.json"
    write_json_atomic(target, {"acc": 90.0, "seed": 1})
    before = target.read_bytes()
    # json.dump streams: the list is partly written to the temporary file before object() fails.
    bad = {"acc": 50.0, "acc_matrix": [[1.0] * 200 for _ in range(20)], "zz": object()}
    with pytest.raises(TypeError):
        write_json_atomic(target, bad)
    assert target.read_bytes() == before
    assert json.loads(before) == {"acc": 90.0, "seed": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    assert leftovers(tmp_path) == []


# -- summarize / report_markdown on hand-made runs ----------------------------------------------------------------


def hand_run(method: str, seed: int, acc: float, bwt: float, seconds: float, benchmark: str = "split_digits"):
    return {
        "benchmark": benchmark,
        "method": method,
        "preset": "quick",
        "seed": seed,
        "acc": acc,
        "bwt": bwt,
        "timings": {"total_seconds": seconds},
    }


HAND_RUNS = [
    hand_run("ness", 2, 94.0, -3.0, 20.0),  # seeds deliberately out of order
    hand_run("finetune", 1, 80.0, -10.0, 8.0),
    hand_run("ness", 1, 90.0, -1.0, 10.0),
    hand_run("finetune", 2, 86.0, -6.0, 12.0),
]


def test_summarize_hand_computed():
    rows = {(r["benchmark"], r["method"]): r for r in summarize(HAND_RUNS)}
    assert set(rows) == {("split_digits", "ness"), ("split_digits", "finetune")}
    ness, ft = rows[("split_digits", "ness")], rows[("split_digits", "finetune")]
    # NESS: ACC (90, 94) → 92 ± √((2² + 2²)/1) = √8; BWT (−1, −3) → −2 ± √2; time (10, 20) → 15.
    assert ness["seeds"] == [1, 2]
    assert ness["acc"] == pytest.approx(92.0) and ness["acc_std"] == pytest.approx(math.sqrt(8))
    assert ness["bwt"] == pytest.approx(-2.0) and ness["bwt_std"] == pytest.approx(math.sqrt(2))
    assert ness["seconds"] == pytest.approx(15.0)
    # Fine-tuning: ACC (80, 86) → 83 ± √18; BWT (−10, −6) → −8 ± √8.
    assert ft["seeds"] == [1, 2]
    assert ft["acc"] == pytest.approx(83.0) and ft["acc_std"] == pytest.approx(math.sqrt(18))
    assert ft["bwt"] == pytest.approx(-8.0) and ft["bwt_std"] == pytest.approx(math.sqrt(8))
    # The same numbers through the standard library (sample std).
    assert ness["acc_std"] == pytest.approx(statistics.stdev([90.0, 94.0]))
    assert ft["bwt_std"] == pytest.approx(statistics.stdev([-10.0, -6.0]))


def test_summarize_groups_by_benchmark_too():
    runs = [*HAND_RUNS, hand_run("ness", 7, 50.0, 0.0, 1.0, benchmark="split_mnist")]
    rows = {(r["benchmark"], r["method"]): r for r in summarize(runs)}
    assert rows[("split_mnist", "ness")]["seeds"] == [7]
    assert rows[("split_mnist", "ness")]["acc_std"] == 0.0
    assert rows[("split_digits", "ness")]["acc"] == pytest.approx(92.0)  # the MNIST run is not mixed in


def test_report_markdown_rows():
    lines = report_markdown(HAND_RUNS).splitlines()
    assert lines[0].startswith("| benchmark | method | preset | seeds |")
    assert "| split_digits | ness | quick | 1,2 | 92.00 ± 2.83 | -2.00 ± 1.41 | 15.0 |" in lines
    assert "| split_digits | finetune | quick | 1,2 | 83.00 ± 4.24 | -8.00 ± 2.83 | 10.0 |" in lines
    assert len(lines) == 2 + 2  # header, rule, one row per method


# -- `ness demo` --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the real demo once: (exit code, stdout, output folder)."""
    out = tmp_path_factory.mktemp("demo")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["demo", "--out", str(out), "--quiet"])
    return code, buffer.getvalue(), out


def demo_results(out: Path, method: str) -> dict:
    return json.loads((out / "split_digits" / method / "seed_1" / "results.json").read_text())


def test_demo_writes_results(demo):
    code, _, out = demo
    assert code == 0
    for method in ("ness", "finetune"):
        r = demo_results(out, method)
        assert set(r) >= RESULT_KEYS
        assert r["method"] == method and r["benchmark"] == "split_digits" and r["seed"] == 1
        t = len(r["acc_matrix"])
        assert t == 5 and all(len(row) == t for row in r["acc_matrix"])
        acc, bwt = acc_bwt_by_loop(r["acc_matrix"])
        assert r["acc"] == pytest.approx(acc, abs=1e-9)
        assert r["bwt"] == pytest.approx(bwt, abs=1e-9)
        assert r["timings"]["total_seconds"] > 0
        assert (r["diagnostics"] != []) == (method == "ness")
    assert sorted(p.name for p in (out / "split_digits").iterdir()) == ["finetune", "ness"]


def test_demo_promise_ness_beats_finetuning(demo):
    _, _, out = demo
    ness, ft = demo_results(out, "ness"), demo_results(out, "finetune")
    assert ness["bwt"] >= ft["bwt"] + 5.0, f"NESS BWT {ness['bwt']:.2f} vs fine-tuning {ft['bwt']:.2f}"
    assert ness["acc"] >= ft["acc"], f"NESS ACC {ness['acc']:.2f} vs fine-tuning {ft['acc']:.2f}"


def test_demo_prints_both_matrices_and_metrics(demo):
    _, stdout, out = demo
    assert "FINETUNE" in stdout and "NESS" in stdout
    lines = stdout.splitlines()
    for method in ("finetune", "ness"):
        r = demo_results(out, method)
        for i, row in enumerate(r["acc_matrix"]):
            cells = " ".join(f"{row[j]:6.1f}" for j in range(i + 1))
            assert any(cells in line for line in lines), f"{method} row {i} ({cells!r}) not printed"
        assert f"ACC {r['acc']:.2f}" in stdout
        assert f"BWT {r['bwt']:.2f}" in stdout


# -- `ness run` and `ness report` ---------------------------------------------------------------------------------


def test_run_two_seeds_then_report(tmp_path, capsys):
    args = ["run", "--benchmark", "split_digits", "--method", "ness", "--seeds", "1", "2"]
    assert main([*args, "--out", str(tmp_path), "--set", "epochs=2", "--quiet"]) == 0
    run_out = capsys.readouterr().out
    paths = sorted(tmp_path.rglob("results.json"))
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "split_digits/ness/seed_1/results.json",
        "split_digits/ness/seed_2/results.json",
    ]
    runs = [json.loads(p.read_text()) for p in paths]
    for seed, r in zip((1, 2), runs, strict=True):
        assert r["seed"] == seed
        assert r["config"]["train"]["epochs"] == 2  # the --set override reached the trainer
        assert all(1 <= task["epochs"] <= 2 for task in r["tasks"])
        acc, bwt = acc_bwt_by_loop(r["acc_matrix"])
        assert r["acc"] == pytest.approx(acc, abs=1e-9) and r["bwt"] == pytest.approx(bwt, abs=1e-9)
        assert f"split_digits ness seed {seed}: ACC {r['acc']:.2f}  BWT {r['bwt']:.2f}" in run_out

    assert main(["report", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    mean_acc = statistics.mean(r["acc"] for r in runs)
    std_acc = statistics.stdev(r["acc"] for r in runs)
    mean_bwt = statistics.mean(r["bwt"] for r in runs)
    std_bwt = statistics.stdev(r["bwt"] for r in runs)
    row = f"| ness | quick* | 1,2 | {mean_acc:.2f} ± {std_acc:.2f} | – | – | {mean_bwt:.2f} ± {std_bwt:.2f} | – |"
    assert any(line.startswith(row) for line in report.splitlines()), report
    assert "NOT the paper's protocol" in report  # a quick run is never presented as the paper's

    assert main(["report", str(tmp_path), "--save"]) == 0
    assert row in (tmp_path / "report.md").read_text()
    with open(tmp_path / "report.csv", newline="") as f:
        (csv_row,) = list(csv.DictReader(f))
    assert csv_row["variant"] == "ness" and csv_row["preset"] == "quick"
    assert float(csv_row["acc"]) == pytest.approx(mean_acc) and float(csv_row["bwt_std"]) == pytest.approx(std_bwt)
    # NESS runs also write the singular spectra the figures need, one per (task ≥ 1, layer), outside results.json.
    spectra = json.loads((paths[0].parent / "spectra.json").read_text())["spectra"]
    assert {(s["task"], s["layer"]) for s in spectra} == {(d["task"], d["layer"]) for d in runs[0]["diagnostics"]}
    assert all("singular_values" not in d for d in runs[0]["diagnostics"])
    for s in spectra:
        values = s["singular_values"]
        assert values == sorted(values, reverse=True)
        rank = next(d["rank"] for d in runs[0]["diagnostics"] if (d["task"], d["layer"]) == (s["task"], s["layer"]))
        assert rank == sum(v <= s["threshold"] for v in values)


def test_run_faithful_applies_the_official_code_settings(tmp_path):
    args = ["run", "--benchmark", "split_digits", "--method", "ness", "--seeds", "1", "--faithful"]
    assert main([*args, "--out", str(tmp_path), "--set", "epochs=1", "--quiet"]) == 0
    (path,) = tmp_path.rglob("results.json")
    assert path.relative_to(tmp_path).as_posix() == "split_digits/ness_faithful/seed_1/results.json"
    r = json.loads(path.read_text())
    assert r["faithful"] is True
    assert r["config"]["method"]["threshold"] == "nuclear" and r["config"]["method"]["memory"] == "replay"
    assert r["config"]["train"]["sam_tasks"] == "first"
    # The nuclear threshold is ε₁·Σσ: check it against the recorded spectrum.
    spectra = json.loads((path.parent / "spectra.json").read_text())["spectra"]
    eps1 = r["config"]["method"]["eps1"]
    for s in spectra:
        assert s["threshold"] == pytest.approx(eps1 * sum(s["singular_values"]), rel=1e-9)


def test_run_unknown_option_exits_2_naming_it(tmp_path, capsys):
    args = ["run", "--benchmark", "split_digits", "--method", "ness", "--out", str(tmp_path), "--quiet"]
    assert main([*args, "--set", "no_such_option=1"]) == 2
    err = capsys.readouterr().err
    assert "'no_such_option'" in err
    assert not list(tmp_path.rglob("results.json"))


def test_run_bad_eps1_exits_2_naming_it(tmp_path, capsys):
    args = ["run", "--benchmark", "split_digits", "--method", "ness", "--out", str(tmp_path), "--quiet"]
    assert main([*args, "--set", "eps1=0"]) == 2
    assert "eps1" in capsys.readouterr().err
    assert not list(tmp_path.rglob("results.json"))


def test_run_unknown_benchmark_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--benchmark", "split_cifar", "--method", "ness", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "split_cifar" in capsys.readouterr().err


def test_set_without_equals_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--benchmark", "split_digits", "--method", "ness", "--out", str(tmp_path), "--set", "eps1"])
    assert exc.value.code == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_run_diverging_lr_is_a_clean_error(tmp_path, capsys):
    args = [
        "run",
        "--benchmark",
        "split_digits",
        "--method",
        "finetune",
        "--seeds",
        "1",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    assert main([*args, "--set", "lr=1e30", "--set", "epochs=1"]) == 2
    assert "lower the learning rate" in capsys.readouterr().err


def test_report_missing_dir_fails(tmp_path, capsys):
    missing = tmp_path / "nothing_here"
    assert main(["report", str(missing)]) != 0
    assert "nothing_here" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["report", "plot"])
def test_report_and_plot_of_a_folder_without_results_are_user_errors(command, tmp_path, capsys):
    (tmp_path / "split_digits" / "ness" / "seed_1").mkdir(parents=True)  # a folder, but no results.json in it
    assert main([command, str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert err == (
        f"ness {command}: error: no results.json under '{tmp_path}'; write runs there first with "
        f"`ness run ... --out {tmp_path}`\n"
    )
    assert out == "" and not list(tmp_path.rglob("report.*"))


def test_report_corrupt_results_names_the_file(tmp_path, capsys):
    bad = tmp_path / "split_digits" / "ness" / "seed_1" / "results.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"acc": 9')  # half a file
    assert main(["report", str(tmp_path)]) == 2
    assert str(bad) in capsys.readouterr().err
    with pytest.raises(ValueError):
        load_results(tmp_path)


def stderr_of_a_tiny_run(out: Path, terminal: bool) -> str:
    """stderr of `python -m ness run` (fine-tuning, 1 epoch a task, no --quiet) when stderr is a pipe, or a
    120-column terminal (a pseudo-terminal, read while the run writes so that it never blocks)."""
    args = [sys.executable, "-m", "ness", "run", "--benchmark", "split_digits", "--method", "finetune", "--seeds", "1"]
    args += ["--set", "epochs=1", "--out", str(out)]
    if not terminal:
        return subprocess.run(args, capture_output=True, text=True, timeout=300, check=True).stderr
    fcntl, pty, termios = (pytest.importorskip(name) for name in ("fcntl", "pty", "termios"))
    reader, writer = pty.openpty()
    fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # rows, columns (tqdm's width)
    with subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=writer) as process:
        os.close(writer)
        chunks = []
        with contextlib.suppress(OSError):  # EIO once the run has ended and closed its end
            while chunk := os.read(reader, 4096):
                chunks.append(chunk)
        os.close(reader)
        assert process.wait(timeout=300) == 0
    return b"".join(chunks).decode()


@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
def test_progress_bars_only_on_a_terminal(terminal, tmp_path):
    # A redrawn tqdm bar is "\rtask 0:  0%|   | 0/1 [...ep/s]"; in a pipe or log file each redraw would be kept.
    err = stderr_of_a_tiny_run(tmp_path, terminal)
    bar = re.compile(r"\rtask \d+:\s+\d+%\|")
    assert "after task 4:" in err  # the log lines are there either way
    if terminal:
        assert bar.search(err), err  # the test can see a bar when there is one
    else:
        assert not bar.search(err) and "\r" not in err and "ep/s" not in err, err


def test_python_dash_m_ness_help():
    proc = subprocess.run(
        [sys.executable, "-m", "ness", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("demo", "run", "report"):
        assert command in proc.stdout


# -- real MNIST, only where the official files are --------------------------------------------------------------


def official_mnist_root() -> Path | None:
    root = os.environ.get("NESS_DATA_ROOT")
    if not root:
        return None
    folder = Path(root) / "mnist"
    for name, md5 in OFFICIAL_MNIST_MD5.items():
        path = folder / name
        if not path.is_file() or hashlib.md5(path.read_bytes()).hexdigest() != md5:
            return None
    return Path(root)


MNIST_ROOT = official_mnist_root()


@pytest.mark.skipif(MNIST_ROOT is None, reason="NESS_DATA_ROOT does not point at the four official MNIST .gz files")
@pytest.mark.parametrize(
    ("benchmark", "extra"),
    [
        ("split_mnist", []),
        # 500 images × 1 epoch at the preset's lr 0.01 (16 steps per task) leave the 10-way shared head near
        # 20–25 % ACC for every method; lr 0.1 makes the same budget learn (~60 %).
        ("permuted_mnist", ["--set", "lr=0.1"]),
    ],
)
def test_mnist_through_cli(benchmark, extra, tmp_path, capsys):
    args = ["run", "--benchmark", benchmark, "--method", "ness", "--seeds", "1", "--out", str(tmp_path)]
    args += ["--set", "epochs=1", "--set", "train_per_task=500", *extra, "--quiet"]
    assert main(args) == 0
    path = tmp_path / benchmark / "ness" / "seed_1" / "results.json"
    assert path.is_file()
    r = json.loads(path.read_text())
    acc, bwt = acc_bwt_by_loop(r["acc_matrix"])
    assert r["acc"] == pytest.approx(acc, abs=1e-9) and r["bwt"] == pytest.approx(bwt, abs=1e-9)
    assert r["acc"] > 50.0
    assert len(r["acc_matrix"]) == (5 if benchmark == "split_mnist" else 10)
    assert f"{benchmark} ness seed 1: ACC {r['acc']:.2f}" in capsys.readouterr().out


def test_write_json_atomic_gives_an_ordinary_file_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_the_readme_shows_the_demos_output_as_it_prints(demo):
    """The README's demo output is what `ness demo` prints (seed 1, this machine's 2 cores), not a stale copy."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"Its output on a 2-core CPU[^\n]*\n[^\n]*\n\n```\n(.*?)```", readme, re.S)
    assert block, "README.md has no demo output block after 'Its output on a 2-core CPU'"
    _, stdout, _ = demo
    printed = [line.rstrip() for line in stdout.strip().splitlines() if not line.startswith("Results: ")]
    shown = [line.rstrip() for line in block.group(1).strip().splitlines()]
    assert shown == printed  # all but the line naming where the results were written


def test_the_cli_starts_without_importing_scikit_learn_or_scipy():
    # Each takes a tenth of a second to most of one to import: only the loaders that read with them (split_digits,
    # SVHN's .mat files) import them, when called.
    code = (
        "import sys, ness.cli, ness.experiment, ness.data\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
