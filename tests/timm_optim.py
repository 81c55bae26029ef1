"""The real `timm.optim` (create_optimizer_v2) without torchvision.

`import timm` needs torchvision (no CPU build here). `timm.optim` itself needs only torch plus two
functions from subpackages whose `__init__` imports torchvision: `use_reentrant_ckpt`
(timm/layers/config.py) and `group_parameters` (timm/models/_manipulate.py). `loaded()` registers
the packages timm, timm.layers and timm.models without running their `__init__`, holding just
those, imports timm.optim from the installed files, and removes everything it registered on exit.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import sys
import types


@contextlib.contextmanager
def loaded():
    before = set(sys.modules)
    root = importlib.metadata.distribution("timm").locate_file("timm")
    try:
        for package in ("timm", "timm.layers", "timm.models"):
            module = types.ModuleType(package)
            module.__path__ = [str(root.joinpath(*package.split(".")[1:]))]
            sys.modules[package] = module
        sys.modules["timm.layers"].use_reentrant_ckpt = importlib.import_module("timm.layers.config").use_reentrant_ckpt
        sys.modules["timm.models"].group_parameters = \
            importlib.import_module("timm.models._manipulate").group_parameters
        yield importlib.import_module("timm.optim")
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]
