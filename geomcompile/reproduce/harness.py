"""The small harness every reproduction shares: budgets, progress, statistics, tables, verdicts, files.

An experiment module defines ``PAPER``, ``TITLE``, ``CLAIM``, ``CRITERIA``, ``BUDGETS`` (``full`` and
``tiny``) and ``run(budget, out_dir, progress) -> Report``. Its verdict is computed by the criteria
written in the module, from the measured numbers, never chosen by hand.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..demo import batches
from ..errors import GeomCompileError

VERDICTS = ("reproduced", "trend reproduced", "not reproduced at this scale")
BUDGET_NAMES = ("full", "tiny")
DEFAULT_OUT = Path("benchmarks") / "results" / "reproduce"


# ---- statistics ---------------------------------------------------------------------------------
def mean(values) -> float:
    return statistics.fmean(values)


def std(values) -> float:
    """Sample standard deviation; 0 for a single value."""
    values = list(values)
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values, digits: int = 3) -> str:
    values = list(values)
    return f"{mean(values):.{digits}f} ± {std(values):.{digits}f}"


@dataclass(frozen=True)
class PairedGain:
    """arm − base over the same seeds: mean difference and its 2-standard-error half width."""

    mean: float
    half_width: float

    @property
    def improves(self) -> bool:
        return self.mean > self.half_width

    @property
    def hurts(self) -> bool:
        return self.mean < -self.half_width


def paired_gain(arm, base) -> PairedGain:
    diffs = [a - b for a, b in zip(arm, base, strict=True)]
    return PairedGain(mean(diffs), 2 * std(diffs) / math.sqrt(len(diffs)))


# ---- training on digits -------------------------------------------------------------------------
def batch_schedule(n: int, batch_size: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """The index batches of `epochs` shuffled passes (drop-last): every arm of a seed gets the same."""
    return list(batches(n, batch_size, epochs, seed))


def recompute_batchnorm_stats(model, x_train: torch.Tensor) -> None:
    """Replace BatchNorm running statistics by the exact ones of the training set (one full-batch pass).

    The running averages (momentum 0.1, started at mean 0 / var 1) lag far behind a unit whose scale is
    1e-4 or 1e4, as in PSI's unbalanced start, which would make eval-mode numbers measure the lag, not the
    weights. Done for every arm alike."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                     # cumulative average: one batch gives its exact statistics
    model.train()
    with torch.no_grad():
        model(x_train)
    for m, momentum in saved:
        m.momentum = momentum


def fit(model, optimizer, data, schedule, on_step=None) -> dict:
    """Cross-entropy training on `schedule`; returns the batch losses, final train loss and test accuracy
    (both in eval mode on the whole split, after `recompute_batchnorm_stats`)."""
    x_train, y_train, x_test, y_test = data
    losses = []
    model.train()
    for idx in schedule:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step()
    recompute_batchnorm_stats(model, x_train)
    model.eval()
    with torch.no_grad():
        train_loss = float(F.cross_entropy(model(x_train), y_train))
        test_acc = float((model(x_test).argmax(1) == y_test).double().mean())
    return {"losses": losses, "train_loss": train_loss, "test_acc": test_acc}


# ---- progress -----------------------------------------------------------------------------------
class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr (the tables go to stdout), or a silent stand-in."""
    if not enabled:
        return _Silent()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)


# ---- report -------------------------------------------------------------------------------------
@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)

    def render(self) -> str:
        cells = [[str(c) for c in self.columns]] + [[c if isinstance(c, str) else f"{c:.4g}" for c in row]
                                                    for row in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        return "\n".join([self.title, line(cells[0]), "  ".join("-" * w for w in widths)]
                         + [line(r) for r in cells[1:]])

    def as_dict(self) -> dict:
        return {"title": self.title, "columns": self.columns, "rows": self.rows}


@dataclass
class Report:
    paper: str
    title: str
    claim: str
    setup: str
    criteria: list[str]
    tables: list[Table]
    verdict: str
    reasons: list[str]
    budget: str
    figures: list[str] = field(default_factory=list)
    results: dict = field(default_factory=dict)
    wall_s: float = 0.0
    cpu_s: float = 0.0          # process CPU time: the cost on an idle machine (wall grows with others' load)

    def __post_init__(self):
        if self.verdict not in VERDICTS:     # a programming error in an experiment module, not user input
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")

    def render(self) -> str:
        out = [f"== paper {self.paper}: {self.title} (budget {self.budget}) ==", "",
               "claim: " + self.claim, "", "setup: " + self.setup, ""]
        for t in self.tables:
            out += [t.render(), ""]
        out += ["verdict criteria (fixed in geomcompile/reproduce/ before running):"]
        out += [f"  - {c}" for c in self.criteria]
        out += ["", f"verdict: {self.verdict.upper()}"]
        out += [f"  {r}" for r in self.reasons]
        out += ["", f"wall {self.wall_s:.0f} s, CPU {self.cpu_s:.0f} s (1 thread); wrote " + ", ".join(self.figures)]
        return "\n".join(out)

    def as_dict(self) -> dict:
        return {"paper": self.paper, "title": self.title, "claim": self.claim, "setup": self.setup,
                "criteria": self.criteria, "tables": [t.as_dict() for t in self.tables], "verdict": self.verdict,
                "reasons": self.reasons, "budget": self.budget, "figures": self.figures, "wall_s": self.wall_s, "cpu_s": self.cpu_s,
                "results": self.results, "torch": torch.__version__, "threads": torch.get_num_threads()}


def per_seed_results(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Each arm's per-seed results for the JSON, without their loss curves (those go to the plots)."""
    return {label: [{k: v for k, v in r.items() if k != "losses"} for r in rs] for label, rs in runs.items()}


def write_json(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report.as_dict(), indent=1, ensure_ascii=False, allow_nan=True) + "\n")


def new_figure(nrows: int = 1, ncols: int = 1, size=(6.0, 3.6)):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(nrows, ncols, figsize=size, squeeze=False)


def save_figure(fig, path: Path) -> str:
    """PNG at a modest resolution (the committed ones stay well under 150 KB)."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def check_budget(budget: str) -> None:
    if budget not in BUDGET_NAMES:
        raise GeomCompileError(f"unknown budget {budget!r}: use one of {', '.join(BUDGET_NAMES)} "
                               f"(tiny is a smoke test of a few seconds, full is the committed run)")
