"""The README and docs say what the code does (issue 14): counts and claims that drifted are pinned here."""
from __future__ import annotations

from pathlib import Path

import geomcompile  # noqa: F401  (registers the geometries)
from geomcompile.geometries import REGISTRY

ROOT = Path(__file__).resolve().parents[1]


def test_readme_counts_the_papers_it_implements():
    text = (ROOT / "README.md").read_text()
    papers = {cls.paper for cls in REGISTRY.values()}
    words = {3: "three", 4: "four", 5: "five", 6: "six"}
    assert f"from {words[len(papers)]} of the five seed papers" in text, f"{len(papers)} papers implemented"
    assert "grad is None are skipped" not in text
