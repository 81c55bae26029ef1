"""Importing geomcompile (and geomcompile.integrations) never imports a framework (issue 13)."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate", "timm")


def test_importing_geomcompile_imports_no_framework():
    code = ("import sys, geomcompile, geomcompile.integrations, geomcompile.plan_io, geomcompile.param_groups\n"
            f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})\n"
            "print(loaded)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_extras_and_the_package_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    assert any(r.startswith("lightning") for r in extras["lightning"])
    assert any(r.startswith("transformers") for r in extras["hf"])
    assert "geomcompile.integrations" in project["tool"]["setuptools"]["packages"]
