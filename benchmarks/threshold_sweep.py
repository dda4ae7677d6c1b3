"""Sweep each NESS threshold rule's knob on one benchmark; print ACC/BWT and plot both against the knob.

Usage: python benchmarks/threshold_sweep.py BENCHMARK PRESET SEED OUT RULE=V1,V2,... [RULE=...]
e.g.   python benchmarks/threshold_sweep.py split_mnist quick 1 runs/sweep frobenius=0.01,0.1 energy=1e-4,1e-2 rank=8,64
RULE is frobenius or nuclear (knob ε₁), energy (knob δ) or rank (knob r). The NESS-SAM variant of the preset is used
with only the rule and its knob changed. OUT receives sweep.json (written atomically) and sweep.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ness.experiment import run_experiment
from ness.plots import save_figure
from ness.results import write_json_atomic
from ness.runs import RunSpec

KNOB = {"frobenius": "eps1", "nuclear": "eps1", "energy": "delta", "rank": "rank"}


def sweep(benchmark: str, preset: str, seed: int, out: Path, grid: dict[str, list[float]]) -> list[dict]:
    rows = []
    print("| rule | knob | ACC | BWT | mean rank / d (last task) |")
    print("|---|---|---|---|---|")
    for rule, values in grid.items():
        for value in values:
            knob = int(value) if rule == "rank" else value
            overrides = {"threshold": rule, KNOB[rule]: knob}
            spec = RunSpec(benchmark, "ness_sam", seed, preset, overrides=overrides)
            result = run_experiment(spec, out=out / f"{rule}_{value:g}", progress=False)
            last = max(r["task"] for r in result["diagnostics"])
            share = [r["rank"] / r["d"] for r in result["diagnostics"] if r["task"] == last]
            rows.append({"rule": rule, "knob": knob, "acc": result["acc"], "bwt": result["bwt"], "rank_share": share})
            print(f"| {rule} | {knob:g} | {result['acc']:.2f} | {result['bwt']:.2f} | {sum(share) / len(share):.2f} |")
    return rows


def figure(rows: list[dict], title: str) -> Figure:
    fig = Figure(figsize=(4.2 * len({r["rule"] for r in rows}), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    for k, rule in enumerate(rules):
        own = sorted((r for r in rows if r["rule"] == rule), key=lambda r: r["knob"])
        ax = fig.add_subplot(1, len(rules), k + 1)
        x = [r["knob"] for r in own]
        ax.plot(x, [r["acc"] for r in own], marker="o", color="tab:blue", label="ACC")
        twin = ax.twinx()
        twin.plot(x, [r["bwt"] for r in own], marker="s", color="tab:red", label="BWT")
        ax.set_xscale("log")
        ax.set_xlabel({"eps1": "ε₁", "delta": "δ", "rank": "rank r"}[KNOB[rule]])
        ax.set_ylabel("ACC (%)", color="tab:blue")
        twin.set_ylabel("BWT (%)", color="tab:red")
        ax.set_title(rule, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return fig


if __name__ == "__main__":
    benchmark, preset, seed, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    grid = {spec.split("=")[0]: [float(v) for v in spec.split("=")[1].split(",")] for spec in sys.argv[5:]}
    rows = sweep(benchmark, preset, seed, out, grid)
    write_json_atomic(out / "sweep.json", {"benchmark": benchmark, "preset": preset, "seed": seed, "rows": rows})
    save_figure(figure(rows, f"{benchmark}, {preset} preset, seed {seed}: NESS-SAM"), out / "sweep.png")
