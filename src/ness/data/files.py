"""Official dataset files: where they may lie under the data root, their md5, and one clear error for the missing.

Every loader describes its files with a `DatasetFiles`; `locate` finds them (or raises one DataError naming each
missing file, the paths searched and where to get it) and `verify_md5` checks a file against its official digest.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ness.data.tasks import DataError


@dataclass(frozen=True)
class OfficialFile:
    """One file of a dataset: the paths (relative to the data root) where it may lie, first match wins, and
    its official md5 (None where the publisher gives none)."""

    candidates: tuple[str, ...]
    md5: str | None = None


@dataclass(frozen=True)
class DatasetFiles:
    """The files of one dataset, where to get them, and the torchvision calls that download them."""

    name: str
    files: dict[str, OfficialFile]
    source: str
    """Human instructions: the URL and how to unpack, shown when files are missing."""
    torchvision: tuple[tuple[str, dict[str, Any]], ...] = field(default_factory=tuple)
    """(torchvision.datasets class name, keyword arguments) calls that download the files into the root."""


def md5sum(path: Path) -> str:
    """md5 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: Path, md5: str | None) -> None:
    """Raise a DataError if `path` does not have the official md5 (nothing to check when md5 is None)."""
    if md5 is None:
        return
    actual = md5sum(path)
    if actual != md5:
        raise DataError(
            f"{path}: md5 is {actual}, expected {md5}; the file is corrupt, partial or not the official one. "
            "Download it again (or pass verify_md5=False if it is a deliberate substitute)"
        )


def torchvision_available() -> bool:
    """Whether torchvision can be imported (it is optional: only used to download missing files)."""
    return importlib.util.find_spec("torchvision") is not None


def download_with_torchvision(spec: DatasetFiles, root: Path) -> None:
    """Let torchvision download `spec`'s files into `root` (needs torchvision and internet access)."""
    if not spec.torchvision:
        raise DataError(f"{spec.name} cannot be downloaded with torchvision; get it by hand: {spec.source}")
    if not torchvision_available():
        raise DataError(
            f"downloading {spec.name} needs torchvision, which is not installed; install it "
            f"(pip install torchvision) or get the files by hand: {spec.source}"
        )
    import torchvision.datasets

    for class_name, kwargs in spec.torchvision:
        getattr(torchvision.datasets, class_name)(str(root), download=True, **kwargs)


def locate(root: Path, spec: DatasetFiles, download: bool = False) -> dict[str, Path]:
    """Path of every file of `spec` under `root`; with `download`, fetch missing ones through torchvision first.

    Raises one DataError listing each missing file, the paths searched and how to get it.
    """
    found, missing = _search(root, spec)
    if missing and download:
        download_with_torchvision(spec, root)
        found, missing = _search(root, spec)
    if not missing:
        return found
    lines = [f"{spec.name}: {len(missing)} file(s) missing under data root {root}:"]
    for role in missing:
        paths = " or ".join(str(root / c) for c in spec.files[role].candidates)
        lines.append(f"  {role}: expected at {paths}")
    lines.append(f"To fix: {spec.source}")
    if spec.torchvision:
        if torchvision_available():
            lines.append("torchvision is installed: pass --download (download=True) to fetch them if you are online.")
        else:
            lines.append("Or install torchvision and pass --download (download=True) to fetch them when online.")
    raise DataError("\n".join(lines))


def load_pickle(path: Path) -> Any:
    """Unpickle a dataset file (Python 2 pickles decode as latin1), turning damage into a DataError."""
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError, IndexError) as err:
        raise DataError(
            f"{path}: cannot unpickle it ({type(err).__name__}: {err}); the file is truncated or not the "
            "expected pickle, download it again"
        ) from err


def load_pickled_dict(path: Path, keys: tuple[str, ...], fix: str) -> dict[str, Any]:
    """A pickled dict holding at least `keys`; otherwise a DataError naming what was found and `fix`."""
    data = load_pickle(path)
    if not isinstance(data, dict) or not set(keys) <= data.keys():
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        wanted = " and ".join(repr(k) for k in keys)
        raise DataError(f"{path}: expected a pickled dict with keys {wanted}, found {found}; {fix}")
    return data


def _search(root: Path, spec: DatasetFiles) -> tuple[dict[str, Path], list[str]]:
    found, missing = {}, []
    for role, official in spec.files.items():
        hit = next((root / c for c in official.candidates if (root / c).is_file()), None)
        if hit is None:
            missing.append(role)
        else:
            found[role] = hit
    return found, missing
