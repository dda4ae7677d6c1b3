"""The files a research package carries: one version everywhere, the license pyproject.toml declares, a citation."""

from __future__ import annotations

import re
from pathlib import Path

import ness

ROOT = Path(__file__).resolve().parents[1]


def test_the_version_is_the_same_in_the_package_pyproject_citation_and_changelog():
    pyproject = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    citation = re.search(r"^version: (\S+)", (ROOT / "CITATION.cff").read_text(), re.M)
    assert pyproject and citation
    assert pyproject.group(1) == citation.group(1) == ness.__version__
    assert f"## {ness.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_the_license_file_is_the_one_pyproject_declares_and_the_citation_names_the_paper():
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    citation = (ROOT / "CITATION.cff").read_text()
    assert "cff-version: 1.2.0" in citation and "license: MIT" in citation
    assert "Learning in the Null Space: Small Singular Values for Continual Learning" in citation
    assert "arXiv:2602.21919" in citation
