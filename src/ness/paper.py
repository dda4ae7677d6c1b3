"""The NESS paper's results table (METHODS_SPEC §14) as data: the numbers our runs are compared against.

Each cell is kept as printed ("72.46 ± 0.26", "-30 ± 1") and parsed once, so the text shown in a report and the
numbers used for ΔACC cannot disagree. "–" in the paper (a method not run on a benchmark) is `None`.
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER_TITLE = "Learning in the Null Space: Small Singular Values for Continual Learning"
PAPER_AUTHORS = "Cuong Anh Pham, Praneeth Vepakomma, Samuel Horváth"
PAPER_ARXIV = "arXiv 2602.21919"
PAPER_VENUE = "CPAL 2026"
TABLE_CAPTION = "ACC and BWT, mean ± std over 5 seeds 1, 2, 3, 4, 37"
DAGGER_NOTE = "† numbers the NESS paper copied from earlier papers, not re-run with seeds 1, 2, 3, 4, 37"

# Benchmark keys (our names) in the paper's column order, with the paper's column headings.
PAPER_BENCHMARKS: dict[str, str] = {
    "split_cifar100": "CIFAR-100 (10 tasks)",
    "five_datasets": "5-datasets (5 tasks)",
    "split_miniimagenet": "miniImageNet (20 tasks)",
}
PAPER_TASKS: dict[str, int] = {"split_cifar100": 10, "five_datasets": 5, "split_miniimagenet": 20}
"""Tasks per benchmark in the paper: a run with fewer (a subset) is reported apart, never beside the paper."""

# (variant, label as printed without citation and †, †, cells per benchmark in PAPER_BENCHMARKS order:
# (ACC, BWT) as printed, or None for "–").
_TABLE: tuple[tuple[str, str, bool, tuple[tuple[str, str] | None, ...]], ...] = (
    ("owm", "OWM", True, (("50.94 ± 0.60", "-30 ± 1"), None, None)),
    ("ewc", "EWC", True, (("68.88 ± 0.80", "-2 ± 1"), ("88.64 ± 0.26", "-4 ± 1"), ("52.01 ± 2.53", "-12 ± 3"))),
    ("hat", "HAT", True, (("72.06 ± 0.50", "0 ± 0"), ("91.32 ± 0.18", "-1 ± 0"), ("59.78 ± 0.57", "-3 ± 0"))),
    ("agem", "A-GEM", True, (("63.98 ± 1.22", "-15 ± 2"), ("84.04 ± 0.33", "-12 ± 1"), ("57.24 ± 0.72", "-12 ± 1"))),
    (
        "gpm",
        "GPM",
        False,
        (("71.63 ± 0.67", "-0.28 ± 0.54"), ("90.61 ± 0.57", "-1.17 ± 0.26"), ("63.56 ± 2.42", "-1.39 ± 1.37")),
    ),
    (
        "sgp",
        "SGP",
        False,
        (("75.99 ± 0.16", "-1.18 ± 0.37"), ("90.48 ± 0.48", "-1.82 ± 0.13"), ("64.45 ± 2.18", "-0.53 ± 0.68")),
    ),
    (
        "trgp",
        "TRGP",
        False,
        (("75.21 ± 0.32", "0.06 ± 0.17"), ("92.78 ± 0.65", "-0.09 ± 0.08"), ("62.74 ± 2.13", "-1.23 ± 0.77")),
    ),
    ("fsdgpm", "FS-DGPM", True, (("74.10 ± 0.09", "-3.03 ± 0.31"), None, None)),
    (
        "dfgp_mixup0.01",
        "DFGP (mixup=0.01)",
        False,
        (("73.24 ± 0.24", "-0.95 ± 0.18"), ("91.47 ± 0.22", "-2.27 ± 0.31"), ("68.50 ± 1.50", "-0.11 ± 1.36")),
    ),
    (
        "dfgp_mixup0.05",
        "DFGP (mixup=0.05)",
        False,
        (("73.77 ± 0.33", "-1.03 ± 0.41"), ("90.22 ± 0.46", "-3.87 ± 0.53"), ("68.64 ± 2.25", "-0.43 ± 1.60")),
    ),
    (
        "dfgp_mixup0.001",
        "DFGP (mixup=0.001)",
        False,
        (("73.32 ± 0.50", "-1.09 ± 0.49"), ("91.59 ± 0.50", "-1.86 ± 0.25"), ("67.75 ± 1.81", "-1.11 ± 1.50")),
    ),
    (
        "dfgp_mixup0.0001",
        "DFGP (mixup=0.0001)",
        False,
        (("73.16 ± 0.46", "-1.11 ± 0.52"), ("91.51 ± 0.15", "-1.70 ± 0.42"), ("68.39 ± 1.07", "-0.16 ± 1.42")),
    ),
    (
        "ness_sam",
        "NESS (with SAM)",
        False,
        (("72.56 ± 0.07", "-0.17 ± 0.51"), ("90.98 ± 0.07", "-0.86 ± 0.28"), ("63.48 ± 1.38", "-0.26 ± 0.67")),
    ),
    (
        "ness_sgdm",
        "NESS (with SGDm: m=0.9)",
        False,
        (("72.46 ± 0.26", "0.03 ± 0.40"), ("90.20 ± 0.47", "-0.58 ± 0.15"), ("63.72 ± 0.46", "0.41 ± 0.58")),
    ),
)


@dataclass(frozen=True)
class PaperEntry:
    """A method (row) on a benchmark (column): ACC and BWT in %, None where the paper has "–"."""

    benchmark: str
    variant: str  # our run name for this row, e.g. "ness_sam"
    label: str  # the row label as printed, without citation and †
    dagger: bool  # † : copied by the NESS paper from earlier papers
    acc: float | None
    acc_std: float | None
    bwt: float | None
    bwt_std: float | None
    acc_text: str  # as printed, "–" when not reported
    bwt_text: str

    @property
    def reported(self) -> bool:
        """Whether the paper gives numbers for this method on this benchmark."""
        return self.acc is not None


def _parse(cell: str) -> tuple[float, float]:
    mean, sep, std = cell.partition(" ± ")
    if not sep:
        raise ValueError(f"paper cell {cell!r} is not 'mean ± std'")
    return float(mean), float(std)


def _entries() -> tuple[PaperEntry, ...]:
    entries = []
    for variant, label, dagger, cells in _TABLE:
        for benchmark, cell in zip(PAPER_BENCHMARKS, cells, strict=True):
            if cell is None:
                entries.append(PaperEntry(benchmark, variant, label, dagger, None, None, None, None, "–", "–"))
                continue
            (acc, acc_std), (bwt, bwt_std) = _parse(cell[0]), _parse(cell[1])
            entries.append(PaperEntry(benchmark, variant, label, dagger, acc, acc_std, bwt, bwt_std, *cell))
    return tuple(entries)


PAPER_VARIANTS: tuple[str, ...] = tuple(row[0] for row in _TABLE)  # the paper's row order
PAPER_LABELS: dict[str, str] = {row[0]: row[1] for row in _TABLE}
PAPER_ENTRIES: tuple[PaperEntry, ...] = _entries()  # row-major: every row × every benchmark, "–" cells included
_BY_KEY: dict[tuple[str, str], PaperEntry] = {(e.benchmark, e.variant): e for e in PAPER_ENTRIES}


def paper_entry(benchmark: str, variant: str) -> PaperEntry | None:
    """The paper's entry for (benchmark, variant), or None when the table has no such row or column."""
    return _BY_KEY.get((benchmark, variant))
