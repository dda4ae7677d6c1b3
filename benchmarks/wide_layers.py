"""NESS's task boundary on LLaMA-shaped layers: the statistics' bytes per layer (float64 and float32 sums), the time of
the statistics pass and of each eigh, the memory, and what a float32 sum does to the null basis.

For each hidden size a LLaMA stack is built from `transformers.LlamaConfig` (random weights, float32, `--layers`
blocks, an MLP 11008/4096 times as wide as LLaMA-7B's, a vocabulary of `--vocab`) and fed `--batches` batches of
`--batch-size` × `--tokens` random tokens. With fewer rows than d, or a vocabulary smaller than d (the first block's
q/k/v read one embedding per token), a sum has exact null directions, which an eigh deflates quickly. For each
statistics dtype, in a process of its own (so that its memory figures are its own), a NESS with the defaults (every
Linear layer adapted, energy rule δ = 1e-3; no transfer adapter) runs the task boundary: `end_task(0)`, the hooked
statistics pass that makes each distinct input's Σxxᵀ (q/k/v share one, gate/up another), then `begin_task(1)`, one
float64 eigh per distinct sum and the null bases. The products of each sum and each eigh are timed by wrapping
`CovarianceSum` and `covariance_spectrum` where ness.methods.ness calls them. Where a sum is wider than
`--max-eigh-dim` (on a CPU its eigh takes many minutes: d = 11008 costs 20× d = 4096) begin_task(1) is not run, and
the eighs that fit are timed on their own, as begin_task runs them (`eigh_device`, `covariance_spectrum`).

The float32 process then compares its sums and bases (the default rule) with the float64 process's, which it left in
a temporary folder: the sum's relative error (Frobenius), the ranks, ‖P₃₂ − P₆₄‖_F (`projector_distance`) and
σ_max(U), against the layer's largest σ₁ and its relative change.

Usage: python benchmarks/wide_layers.py [--hidden 2048 4096] [--layers 1] [--batches 4] [--batch-size 2]
       [--tokens 128] [--vocab 256] [--dtypes float64 float32] [--device cpu|cuda] [--statistics-device model|cpu]
       [--max-eigh-dim D] [--threads 2] [--quick] [--json OUT.json]
--quick: hidden 1024 only, 2 batches of 2 × 64 tokens (under a minute on 2 cores). --max-eigh-dim defaults to 4096 on
a CPU and to no limit (0) on a GPU. Results go to stdout as markdown tables; BENCHMARKS.md records them.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers

import ness.methods.ness as ness_module
from ness import NESS, NESSConfig
from ness.subspace import CovarianceSum, Spectrum, eigh_device, projector_distance, spectrum_null_basis

LLAMA_7B = {"hidden": 4096, "intermediate": 11008, "blocks": 32}
GIB = 2**30
DTYPES = ("float64", "float32")


def intermediate_size(hidden: int) -> int:
    """LLaMA-7B's MLP width for its hidden size (11008 for 4096), scaled and rounded to a multiple of 64."""
    return round(hidden * LLAMA_7B["intermediate"] / LLAMA_7B["hidden"] / 64) * 64


def rss_gib() -> float:
    """The process's resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / GIB


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timings:
    """What the wrapped NESS calls recorded: each sum's product seconds (by the id of its total, which becomes the
    kept covariance), each eigh's seconds (by the layer name NESS passes: the first of those sharing the sum), and
    the seconds spent leaving each basis for the comparison (not NESS's: taken off begin_task's time)."""

    def __init__(self, folder: Path, dtype: str) -> None:
        self.folder, self.dtype = folder, dtype
        self.products: dict[int, float] = {}
        self.eighs: dict[str, float] = {}
        self.saving = 0.0

    def keep_basis(self, name: str, spectrum: Spectrum) -> None:
        """The default rule's basis of this spectrum, to disk: the float32 process compares its bases with these."""
        started = time.perf_counter()
        rule = NESSConfig()
        basis = spectrum_null_basis(spectrum, rule.eps1, rule.threshold, delta=rule.delta)
        sigma_u = float(basis.kept_singular_values.max()) if basis.rank else 0.0
        record = {"basis": basis.basis.cpu(), "sigma_u": sigma_u, "sigma_1": float(basis.singular_values.max())}
        torch.save(record, self.folder / f"{self.dtype}.basis.{name}.pt")
        self.saving += time.perf_counter() - started


@contextmanager
def instrumented(device: torch.device, timings: Timings) -> Iterator[None]:
    """Inside the block NESS's sums and eighs are timed into `timings` (and each basis left for the comparison)."""

    original_sum, original_spectrum = ness_module.CovarianceSum, ness_module.covariance_spectrum

    class TimedSum(CovarianceSum):
        def _flush(self) -> None:
            synchronize(device)
            started = time.perf_counter()
            super()._flush()
            synchronize(device)
            if self.total is not None:
                key = id(self.total)
                timings.products[key] = timings.products.get(key, 0.0) + time.perf_counter() - started

    def timed_spectrum(covariance: torch.Tensor, name: str = "layer") -> Spectrum:
        synchronize(covariance.device)
        started = time.perf_counter()
        spectrum = original_spectrum(covariance, name)
        synchronize(covariance.device)
        timings.eighs[name] = time.perf_counter() - started
        timings.keep_basis(name, spectrum)
        return spectrum

    ness_module.CovarianceSum, ness_module.covariance_spectrum = TimedSum, timed_spectrum  # type: ignore[misc]
    try:
        yield
    finally:
        ness_module.CovarianceSum, ness_module.covariance_spectrum = original_sum, original_spectrum  # type: ignore[misc]


def llama_stack(hidden: int, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    heads = hidden // 128
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=hidden, intermediate_size=intermediate_size(hidden),
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=args.tokens,
    )  # fmt: skip
    return transformers.LlamaModel(config).float().to(device).eval()


def token_batches(args: argparse.Namespace, device: torch.device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shape = (args.batch_size, args.tokens)
    ids = [torch.randint(0, args.vocab, shape, generator=g) for _ in range(args.batches)]
    return [{"input_ids": x.to(device), "attention_mask": torch.ones(shape, device=device)} for x in ids]


def measure(hidden: int, dtype: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One hidden size's boundary with `dtype` sums, in this process; with float32, the comparison with float64."""
    device = torch.device(args.device)
    model = llama_stack(hidden, args, device)
    parameters = sum(p.numel() for p in model.parameters())  # before begin_task(1) adds the V's
    batches = token_batches(args, device)
    with torch.no_grad():
        synchronize(device)
        started = time.perf_counter()
        for batch in batches:
            model(**batch)
        synchronize(device)
        forward_seconds = time.perf_counter() - started
    method = NESS(model, NESSConfig(transfer_rank=0, statistics_dtype=dtype, statistics_device=args.statistics_device))
    timings = Timings(folder, dtype)
    rss_before = rss_gib()
    with instrumented(device, timings):
        method.begin_task(0)
        synchronize(device)
        started = time.perf_counter()
        method.end_task(0, batches)
        synchronize(device)
        pass_seconds = time.perf_counter() - started
        rss_after_pass = rss_gib()
        sizes = method.statistics_bytes()
        covariances = method.covariances
        begin_seconds = None
        if not args.max_eigh_dim or max(c.shape[0] for c in covariances.values()) <= args.max_eigh_dim:
            started = time.perf_counter()
            method.begin_task(1)
            synchronize(device)
            begin_seconds = time.perf_counter() - started - timings.saving
        else:  # the eighs that fit, as begin_task(1) runs them
            for s in sizes:
                if not s.shared and covariances[s.layer].shape[0] <= args.max_eigh_dim:
                    where = eigh_device(device, covariances[s.layer].shape[0])
                    ness_module.covariance_spectrum(covariances[s.layer].to(where, torch.float64), s.layer)
    result = {
        "hidden": hidden,
        "intermediate": intermediate_size(hidden),
        "rows": args.batches * args.batch_size * args.tokens,
        "parameters": parameters,
        "forward_seconds": forward_seconds,
        "pass_seconds": pass_seconds,
        "begin_task_seconds": begin_seconds,
        "memory_bytes": method.memory_bytes(),
        "rss_before_gib": rss_before,
        "rss_after_pass_gib": rss_after_pass,
        "peak_rss_gib": peak_rss_gib(),
        "cuda_peak_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
        "layers": {
            s.layer: {
                "d": covariances[s.layer].shape[0],
                "bytes": s.bytes,
                "owner": s.owner,
                "products_seconds": timings.products.get(id(covariances[s.owner])),
                "eigh_seconds": timings.eighs.get(s.owner),
            }
            for s in sizes
        },
    }
    owners = [s.layer for s in sizes if not s.shared]
    if dtype == "float64":
        torch.save({name: covariances[name].cpu() for name in owners}, folder / "float64.sums.pt")
    elif (folder / "float64.sums.pt").exists():
        result["float32_vs_float64"] = compare(owners, {name: covariances[name] for name in owners}, folder)
    return result


def compare(owners: list[str], sums: dict[str, torch.Tensor], folder: Path) -> dict[str, dict[str, Any]]:
    """The float32 sums and bases against the float64 ones the other process left in `folder`."""
    exact_sums = torch.load(folder / "float64.sums.pt")
    comparison: dict[str, dict[str, Any]] = {}
    for name in owners:
        exact_sum = exact_sums[name]
        entry: dict[str, Any] = {
            "sum_relative_error": float((sums[name].double() - exact_sum).norm() / exact_sum.norm())
        }
        files = [folder / f"{dtype}.basis.{name}.pt" for dtype in DTYPES]
        if all(f.exists() for f in files):
            exact, rough = (torch.load(f) for f in files)
            entry.update(
                rank_float64=exact["basis"].shape[1],
                rank_float32=rough["basis"].shape[1],
                projector_distance=projector_distance(exact["basis"], rough["basis"]),
                # σ_max(U) against σ₁: an exact null direction (σ = 0 up to float64 round-off) turns into float32
                # noise, whose relative change says little, and whose size against σ₁ says how far it moved
                sigma_max_U_float64=exact["sigma_u"] / exact["sigma_1"],
                sigma_max_U_float32=rough["sigma_u"] / exact["sigma_1"],
            )
        comparison[name] = entry
    return comparison


def relative_change(before: float, after: float) -> str:
    return f"{abs(after - before) / before:.1e}" if before else f"0 → {after:.1e}"


def seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def short(name: str) -> str:
    return name.removeprefix("model.").removeprefix("layers.")


def table_head(*columns: str) -> list[str]:
    """A markdown table's header and rule lines."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def layer_table(results: list[dict[str, Any]]) -> list[str]:
    lines = table_head(
        "hidden", "layer", "d", "Σxxᵀ float64 (MiB)", "float32 (MiB)", "products f64 / f32 (s)",
        "eigh f64 / f32 sum (s)", "f32 sum's error", "rank f64 / f32", "‖P₃₂ − P₆₄‖_F", "σ_max(U)/σ₁",
        "σ_max(U) change in f32",
    )  # fmt: skip
    for r in results:
        runs, compared = r["runs"], r.get("float32_vs_float64", {})
        for name, layer in next(iter(runs.values()))["layers"].items():
            if layer["owner"] != name:
                lines.append(f"| {r['hidden']} | {short(name)} | {layer['d']} | = {short(layer['owner'])} |" + " |" * 8)
                continue
            per = {dtype: run["layers"][name] for dtype, run in runs.items()}
            mib = {dtype: f"{p['bytes'] / 2**20:,.0f}" for dtype, p in per.items()}
            cells = [
                mib.get("float64", "—"),
                mib.get("float32", "—"),
                " / ".join(seconds(p["products_seconds"]) for p in per.values()),
                " / ".join(seconds(p["eigh_seconds"]) for p in per.values()),
            ]
            c = compared.get(name, {})
            cells.append(f"{c['sum_relative_error']:.1e}" if c else "—")
            if "rank_float64" in c:
                cells += [
                    f"{c['rank_float64']} / {c['rank_float32']}",
                    f"{c['projector_distance']:.1e}",
                    f"{c['sigma_max_U_float64']:.1e}",
                    relative_change(c["sigma_max_U_float64"], c["sigma_max_U_float32"]),
                ]
            else:
                cells += ["—"] * 4
            lines.append(f"| {r['hidden']} | {short(name)} | {layer['d']} | " + " | ".join(cells) + " |")
    return lines


def boundary_table(results: list[dict[str, Any]]) -> list[str]:
    lines = table_head(
        "hidden", "intermediate", "rows", "dtype", "forward alone (s)", "statistics pass (s)", "begin_task(1) (s)",
        "kept sums (MiB)", "RSS before / after the pass (GiB)", "peak RSS (GiB)", "GPU peak (GiB)",
    )  # fmt: skip
    for r in results:
        for dtype, run in r["runs"].items():
            gpu = "—" if run["cuda_peak_gib"] is None else f"{run['cuda_peak_gib']:.2f}"
            lines.append(
                f"| {r['hidden']} | {r['intermediate']} | {r['rows']:,} | {dtype} | {run['forward_seconds']:.2f} "
                f"| {run['pass_seconds']:.2f} | {seconds(run['begin_task_seconds'])} "
                f"| {run['memory_bytes'] / 2**20:,.0f} | {run['rss_before_gib']:.2f} / {run['rss_after_pass_gib']:.2f} "
                f"| {run['peak_rss_gib']:.2f} | {gpu} |"
            )
    return lines


def llama_7b_estimate(results: list[dict[str, Any]]) -> list[str]:
    """LLaMA-7B's kept sums from the bytes measured per distinct input of a hidden-4096 block (else from d²)."""
    measured = next((r for r in results if r["hidden"] == LLAMA_7B["hidden"]), None)
    lines = []
    for dtype, width in (("float64", 8), ("float32", 4)):
        if measured is not None and dtype in measured["runs"]:
            layers = measured["runs"][dtype]["layers"]
            block = sum(p["bytes"] for n, p in layers.items() if p["owner"] == n and ".layers.0." in f".{n}")
            source = "measured bytes of block 0's distinct inputs"
        else:
            block = (3 * LLAMA_7B["hidden"] ** 2 + LLAMA_7B["intermediate"] ** 2) * width
            source = "3·4096² + 11008² entries"
        total = block * LLAMA_7B["blocks"]
        lines.append(
            f"LLaMA-7B, {dtype}: {block:,} bytes = {block / 1e9:.3f} GB per block ({source}) × {LLAMA_7B['blocks']} "
            f"blocks = {total / 1e9:.1f} GB ({total / GIB:.1f} GiB)"
        )
    return lines


def report(results: list[dict[str, Any]], env: dict[str, Any]) -> str:
    header = (
        f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}, transformers {env['transformers']}; "
        f"{env['args']}"
    )
    return "\n".join([header, "", *layer_table(results), "", *boundary_table(results), "", *llama_7b_estimate(results)])


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())


def child_arguments(args: argparse.Namespace, hidden: int, dtype: str, folder: str) -> list[str]:
    """The command line of the process that measures one hidden size with one dtype."""
    return [
        "--child", folder, "--hidden", str(hidden), "--dtypes", dtype, "--layers", str(args.layers),
        "--batches", str(args.batches), "--batch-size", str(args.batch_size), "--tokens", str(args.tokens),
        "--vocab", str(args.vocab),
        "--device", args.device, "--statistics-device", args.statistics_device,
        "--max-eigh-dim", str(args.max_eigh_dim), "--threads", str(args.threads),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--layers", type=int, default=1, help="LLaMA blocks (default 1)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--statistics-device", default="model", choices=["model", "cpu"])
    parser.add_argument("--max-eigh-dim", type=int, default=None, help="0: no limit (default: 4096 on a CPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="hidden 1024, 2 batches of 2 × 64 tokens")
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the folder the two dtypes' processes share
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.batches, args.tokens = [1024], 2, 64
    if args.max_eigh_dim is None:
        args.max_eigh_dim = 0 if args.device.startswith("cuda") else 4096
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    if args.child:
        print(json.dumps(measure(args.hidden[0], args.dtypes[0], args, Path(args.child))))
        return
    results = []
    for hidden in args.hidden:
        runs = {}
        with tempfile.TemporaryDirectory() as folder:
            for dtype in (d for d in DTYPES if d in args.dtypes):  # float64 first: float32 compares with it
                command = [sys.executable, __file__, *child_arguments(args, hidden, dtype, folder)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"hidden {hidden}, {dtype} failed:\n{done.stderr}")
                runs[dtype] = json.loads(done.stdout.strip().splitlines()[-1])
        first = next(iter(runs.values()))
        results.append(
            {key: first[key] for key in ("hidden", "intermediate", "rows", "parameters")}
            | {"runs": runs, "float32_vs_float64": runs.get("float32", {}).pop("float32_vs_float64", {})}
        )
    env = {
        "device_name": device_name(args.device),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "args": " ".join(sys.argv[1:]) or "(defaults)",
    }
    print(report(results, env))
    if args.json:
        from ness.results import write_json_atomic

        write_json_atomic(args.json, {"environment": env, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
