"""The README and docs say what the code does (issue 14): counts and claims that drifted are pinned here."""
from __future__ import annotations

from pathlib import Path

import pytest

import geomcompile  # noqa: F401  (registers the geometries)
from geomcompile.geometries import REGISTRY

ROOT = Path(__file__).resolve().parents[1]


def test_readme_counts_the_papers_it_implements():
    text = (ROOT / "README.md").read_text()
    papers = {cls.paper for cls in REGISTRY.values()}
    words = {3: "three", 4: "four", 5: "five", 6: "six"}
    assert f"from {words[len(papers)]} of the five seed papers" in text, f"{len(papers)} papers implemented"
    assert "grad is None are skipped" not in text


# ---- issue 13: the integration sections' snippets run as written -------------------------------
INTEGRATION_SECTIONS = ("Lightning", "Hugging Face", "timm-style param groups", "Saving the plan", "Editor support")


def _section_blocks(title: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block under the README heading `### {title}`, up to the next
    heading (a `#` line outside a fenced block)."""
    blocks, inside, fence = [], False, None
    for line in (ROOT / "README.md").read_text().splitlines(keepends=True):
        if fence is not None:
            if line.startswith("```"):
                blocks.append(tuple(fence))
                fence = None
            else:
                fence[1] += line
        elif line.startswith("#"):
            if inside:
                break
            inside = line.strip() == f"### {title}"
        elif inside and line.startswith("```"):
            fence = [line[3:].strip(), ""]
    assert inside, f"README has no section '### {title}'"
    return blocks


@pytest.mark.parametrize("title", INTEGRATION_SECTIONS)
def test_the_readme_integration_snippets_run(title, tmp_path, monkeypatch):
    import contextlib
    import warnings

    import jsonschema
    import yaml

    import geomcompile as gc
    from geomcompile.policy import _Loader
    from geomcompile.schema import policy_schema

    from .timm_optim import loaded

    blocks = _section_blocks(title)
    assert any(language == "python" for language, _ in blocks), f"'{title}' has no python snippet"
    monkeypatch.chdir(tmp_path)
    # timm's package needs torchvision here; its optimizer factory is loaded without it (tests/timm_optim.py)
    context = loaded() if title.startswith("timm") else contextlib.nullcontext()
    with context, warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        for language, code in blocks:
            if language == "python":
                exec(compile(code, f"README.md ({title})", "exec"), {"__name__": "__readme__"})
            elif language == "yaml":
                gc.load_policy(code)
                jsonschema.validate(yaml.load(code, Loader=_Loader), policy_schema())
