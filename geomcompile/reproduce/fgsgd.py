"""001 FG-SGD (pom): conv kernels on sphere / oblique / Stiefel manifolds, grouped PI / PO / PIO, vs SGD.

Model: a BN CNN on the 8x8 digits (conv3x3 1->16, BN, ReLU, conv3x3 16->32, BN, ReLU, max pool,
linear). pom acts on both conv weights, every 3x3 kernel W[o, i] a component (the paper's W_{c,d,l});
`radius: init` keeps the layer's initial scale, so the arms differ by the constraint and FG-SGD's
step (projection, group normalisation by ζ, retraction), not by a rescaled learning rate. All arms
of a seed start from the same weights and see the same batches (SGD-momentum, lr 0.05).
Manifold drift: the largest relative distance of a component to its manifold after training
(pom_distance: |‖w‖ − r|/r for spheres, per column for oblique, ‖WᵀW/r² − I‖ for Stiefel).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import apply
from ..demo import load_digits_tensors
from ..functional import pom_distance
from ..geometries.pom import as_components
from .harness import (Report, Table, batch_schedule, fit, mean_std, new_figure, paired_gain, per_seed_results,
                      progress_bar, save_figure)

PAPER, NAME = "001", "fgsgd"
TITLE = "FG-SGD on products of weight manifolds (pom)"
CLAIM = ("Sec. 1-5 (experiments in the supplement): training CNNs with FG-SGD, every kernel constrained to a "
         "weight manifold (sphere, oblique, Stiefel) and grouped by input/output channels (PI, PO, PIO), bounds "
         "the weights' norms and 'improve[s] accuracy of the DNNs' compared to unconstrained training; the "
         "iterates stay on the product manifold (Algorithm 1, retraction at every step).")
CRITERIA = [
    "drift (required for any verdict above 'not reproduced'): after training, every component of every pom "
    "arm is within 1e-4 (relative) of its manifold;",
    "accuracy: an arm 'improves' when its test accuracy minus SGD's, paired over seeds, has a mean above twice "
    "its standard error, and 'hurts' when below minus twice;",
    "reproduced: drift holds and every pom arm improves; trend reproduced: drift holds, no arm hurts, most "
    "have a positive mean gain and at least one improves; otherwise not reproduced at this scale.",
]
MANIFOLDS, GROUPINGS = ("sphere", "oblique", "stiefel"), ("PI", "PO", "PIO")
BUDGETS = {"full": {"seeds": 3, "epochs": 6, "manifolds": MANIFOLDS, "groupings": GROUPINGS},
           "tiny": {"seeds": 2, "epochs": 1, "manifolds": ("sphere",), "groupings": ("PI",), "steps": 3}}
LR, MOMENTUM, BATCH = 0.05, 0.9, 64


class BNCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


def policy(manifold: str, grouping: str) -> dict:
    return {"version": 1, "rules": [{"name": "kernels", "match": {"kind": "conv"}, "use": {"pom": {
        "manifold": manifold, "component": "kernel", "grouping": grouping, "radius": "init"}}}]}


def drift(model: BNCNN, plan, manifold: str) -> float:
    """Largest relative distance of a kernel to its manifold, over both conv weights."""
    worst = 0.0
    for name, diag in plan.diagnostics().items():
        w = as_components(model.get_parameter(name), "kernel")
        worst = max(worst, float(pom_distance(w, manifold, diag["pom"]["radius"]).max()))
    return worst


def train_arm(init: BNCNN, arm: tuple[str, str] | None, data, schedule, on_step) -> dict:
    model = BNCNN()
    model.load_state_dict(init.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    plan = None if arm is None else apply(model, policy(*arm), opt, example_inputs=(data[0][:2],))
    out = fit(model, opt, data, schedule, on_step)
    out["drift"] = float("nan") if plan is None else drift(model, plan, arm[0])
    return out


def verdict(runs: dict) -> tuple[str, list[str]]:
    base = [r["test_acc"] for r in runs["SGD"]]
    pom_arms = {label: rs for label, rs in runs.items() if label != "SGD"}
    worst = max(r["drift"] for rs in pom_arms.values() for r in rs)
    on_manifold = worst < 1e-4
    gains = {label: paired_gain([r["test_acc"] for r in rs], base) for label, rs in pom_arms.items()}
    reasons = [f"largest manifold drift over all pom arms and seeds: {worst:.1e}"]
    reasons += [f"{label}: test accuracy {100 * g.mean:+.2f} ± {100 * g.half_width:.2f} points vs SGD"
                + (" (improves)" if g.improves else " (hurts)" if g.hurts else "") for label, g in gains.items()]
    if on_manifold and all(g.improves for g in gains.values()):
        return "reproduced", reasons
    if (on_manifold and not any(g.hurts for g in gains.values())
            and sum(g.mean > 0 for g in gains.values()) > len(gains) / 2 and any(g.improves for g in gains.values())):
        return "trend reproduced", reasons
    return "not reproduced at this scale", reasons


def plot(runs: dict, path) -> str:
    fig, axes = new_figure(1, 1, size=(7, 3.6))
    ax = axes[0][0]
    labels = list(runs)
    accs = [[100 * r["test_acc"] for r in runs[label]] for label in labels]
    ax.boxplot(accs)
    ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.set_ylabel("test accuracy %")
    ax.set_title("FG-SGD (pom, radius init) vs SGD-momentum on digits")
    return save_figure(fig, path)


def run(budget: dict, budget_name: str, out_dir, progress: bool) -> Report:
    data = load_digits_tensors(0)
    arms = [None] + [(m, g) for m in budget["manifolds"] for g in budget["groupings"]]
    schedules = [batch_schedule(len(data[1]), BATCH, budget["epochs"], seed)[:budget.get("steps")]
                 for seed in range(budget["seeds"])]
    bar = progress_bar(len(arms) * sum(map(len, schedules)), "001 fgsgd", progress)
    runs = {("SGD" if arm is None else f"{arm[0]} {arm[1]}"): [] for arm in arms}
    for seed, schedule in enumerate(schedules):
        torch.manual_seed(seed)
        init = BNCNN()
        for arm, label in zip(arms, runs):
            runs[label].append(train_arm(init, arm, data, schedule, bar.update))
    bar.close()
    table = Table(f"test accuracy, final train loss and manifold drift (mean ± std over {budget['seeds']} seeds)",
                  ["arm", "test accuracy", "train loss", "max drift"])
    for label, rs in runs.items():
        table.rows.append([label, mean_std(r["test_acc"] for r in rs), mean_std((r["train_loss"] for r in rs), 4),
                           "-" if label == "SGD" else f"{max(r['drift'] for r in rs):.1e}"])
    word, reasons = verdict(runs)
    figure = plot(runs, out_dir / f"{PAPER}_{NAME}.png")
    setup = (f"digits (1437 train / 360 test), BN CNN conv3x3(1->16)-BN-ReLU-conv3x3(16->32)-BN-ReLU-maxpool-"
             f"linear, SGD-momentum lr {LR} momentum {MOMENTUM}, batch {BATCH}, {budget['epochs']} epochs, seeds "
             f"0-{budget['seeds'] - 1}; pom on both convs: component kernel, radius init, manifold x grouping as "
             f"in the arm's name")
    return Report(PAPER, TITLE, CLAIM, setup, CRITERIA, [table], word, reasons, budget_name, [figure],
                  per_seed_results(runs))
