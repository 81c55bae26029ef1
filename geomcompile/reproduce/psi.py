"""003 PSI: Figure 1 (balanced vs unbalanced init, SGD vs PSI-SGD(M)) and Theorem 1, in numbers.

Model: the flattened 8x8 digits into a bias-free [64:h:h:10] MLP whose two hidden layers are followed
by BatchNorm, so their rows are positively scale-invariant (the paper's "two batch normalized" layers).
The unbalanced start is T_a(W) with a = 1e4 for one half of each hidden layer's units and 1e-4 for
the other (the paper's a = (1e4, 1e4, 1e-4, 1e-4)). All arms of a seed see the same batches.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .. import GeomCompileWarning, apply
from ..demo import load_digits_tensors
from .harness import Report, Table, batch_schedule, fit, mean, mean_std, new_figure, progress_bar, save_figure

PAPER, NAME = "003", "psi"
TITLE = "PSI-SGD(M) on the PSI manifold of BatchNorm networks"
CLAIM = ("Sec. 3 and Figure 1: with an unbalanced initialisation T_a(W) (weights of one layer at very different "
         "scales, a = (1e4, 1e4, 1e-4, 1e-4)) SGD 'performs very poorly' on a two-layer BN network on MNIST while "
         "PSI-SGD trains normally; SGD is fine from a balanced start. Theorem 1: PSI-SGDM started from "
         "{W0, U0} and from {T_a(W0), T_a(U0)} gives iterates with W'_t = T_a(W_t) for every t.")
CRITERIA = [
    "Figure 1 part A: from the unbalanced start, the PSI arm's mean final train loss is at most half the plain "
    "arm's, for SGD and for SGD-momentum;",
    "Figure 1 part B: plain SGD(M) is hurt by the unbalanced start: its mean final loss is at least twice its "
    "balanced one (otherwise the figure's contrast is not there to reproduce);",
    "Theorem 1: in float64, PSI-SGDM from W0 and from T_a(W0) stays equivalent, max_t,u ‖w'_u − a_u w_u‖/‖a_u w_u‖ "
    "< 1e-9, while plain SGDM from the same two starts differs by > 1e-3 (the control);",
    "reproduced: all three hold; trend reproduced: Theorem 1 holds and the unbalanced PSI arms' mean losses are "
    "below the plain ones (without the 2x margins); otherwise not reproduced at this scale.",
]
BUDGETS = {"full": {"seeds": 5, "steps": 100, "hidden": 64, "theorem_steps": 200},
           "tiny": {"seeds": 2, "steps": 5, "hidden": 8, "theorem_steps": 5}}
LR, MOMENTUM, BATCH = 0.1, 0.9, 64
ARMS = ("SGD", "PSI-SGD", "SGDM", "PSI-SGDM")
PSI_POLICY = {"version": 1, "rules": [{"name": "psi", "match": {"scale_invariant": True}, "use": {"psi": {}}}]}


# BatchNorm's eps makes T_a a symmetry only while a unit's variance is far above eps: with the default
# 1e-5, a unit scaled by 1e-4 (variance ~1e-9) is divided by sqrt(eps) instead of its std, and the
# "unbalanced" net would be another function. The paper's analysis has no eps: 1e-12 in float32 for
# Figure 1, 1e-30 (torch needs eps > 0)
# in float64 for Theorem 1, which is about exact invariance.
BN_EPS = 1e-12


class BNMLP(nn.Module):
    def __init__(self, hidden: int, eps: float = BN_EPS):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden, eps=eps)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.bn2 = nn.BatchNorm1d(hidden, eps=eps)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.fc1(x.flatten(1))))
        return self.out(torch.relu(self.bn2(self.fc2(x))))


def paper_scaling(hidden: int) -> torch.Tensor:
    """a: 1e4 for the first half of the units, 1e-4 for the second."""
    return torch.where(torch.arange(hidden) < hidden // 2, 1e4, 1e-4)


def rescale_units(model: BNMLP, a1: torch.Tensor, a2: torch.Tensor) -> BNMLP:
    """T_a: row u of fc1 (fc2) times a1[u] (a2[u]); the function is unchanged (BN follows each)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.fc1.weight.mul_(a1.to(model.fc1.weight.dtype)[:, None])
        model.fc2.weight.mul_(a2.to(model.fc2.weight.dtype)[:, None])
    return model


def optimizer_for(model, arm: str, example, max_norm: float | None = None):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM if arm.endswith("M") else 0.0)
    if arm.startswith("PSI"):
        policy = copy.deepcopy(PSI_POLICY)
        if max_norm is not None:
            policy["rules"][0]["use"]["psi"]["max_norm"] = max_norm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GeomCompileWarning)
            apply(model, policy, opt, example_inputs=(example,))
    return opt


def figure1(budget: dict, data, bar) -> dict:
    runs = {(init, arm): [] for init in ("balanced", "unbalanced") for arm in ARMS}
    a = paper_scaling(budget["hidden"])
    for seed in range(budget["seeds"]):
        torch.manual_seed(seed)
        balanced = BNMLP(budget["hidden"])
        starts = {"balanced": balanced, "unbalanced": rescale_units(balanced, a, a)}
        schedule = batch_schedule(len(data[1]), BATCH, 100, seed)[:budget["steps"]]
        for (init, arm), out in runs.items():
            model = copy.deepcopy(starts[init])
            out.append(fit(model, optimizer_for(model, arm, data[0][:BATCH]), data, schedule, bar.update))
    return runs


def theorem1(budget: dict, data, bar) -> dict:
    """Max relative deviation of the second run from T_a(first run), over steps and units, in float64."""
    x_train, y_train = data[0].double(), data[1]
    torch.manual_seed(0)
    model = BNMLP(budget["hidden"], eps=1e-30).double()
    gen = torch.Generator().manual_seed(1)
    a1, a2 = (torch.exp(torch.empty(budget["hidden"], dtype=torch.float64).uniform_(-4.6, 4.6, generator=gen))
              for _ in range(2))                                    # a in [1/100, 100], log-uniform
    schedule = batch_schedule(len(y_train), BATCH, 100, 0)[:budget["theorem_steps"]]
    out = {}
    for arm in ("SGDM", "PSI-SGDM"):
        first, second = copy.deepcopy(model), rescale_units(model, a1, a2)
        # max_norm above any norm reached, so no unit is renormalised and W'_t = T_a(W_t) holds literally
        opts = [optimizer_for(m, arm, x_train[:BATCH], max_norm=1e30) for m in (first, second)]
        worst, loss_gap = 0.0, 0.0
        for idx in schedule:
            losses = []
            for m, opt in zip((first, second), opts):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(m(x_train[idx]), y_train[idx])
                loss.backward()
                opt.step()
                losses.append(loss.item())
            loss_gap = max(loss_gap, abs(losses[0] - losses[1]))
            with torch.no_grad():
                for layer, a in (("fc1", a1), ("fc2", a2)):
                    expected = getattr(first, layer).weight * a[:, None]
                    got = getattr(second, layer).weight
                    worst = max(worst, float(((got - expected).norm(dim=1) / expected.norm(dim=1)).max()))
            bar.update(1)
        out[arm] = {"max_rel_deviation": worst, "max_loss_gap": loss_gap}
    return out


def verdict(runs: dict, theorem: dict) -> tuple[str, list[str]]:
    loss = lambda init, arm: mean(r["train_loss"] for r in runs[(init, arm)])
    reasons, part_a, part_b, trend = [], True, True, True
    for plain, psi in (("SGD", "PSI-SGD"), ("SGDM", "PSI-SGDM")):
        lp, lq, lb = loss("unbalanced", plain), loss("unbalanced", psi), loss("balanced", plain)
        part_a &= lq <= 0.5 * lp
        part_b &= lp >= 2 * lb
        trend &= lq < lp
        reasons.append(f"unbalanced start: {psi} loss {lq:.3f} vs {plain} {lp:.3f} ({lq / lp:.2f}x); "
                       f"{plain} balanced {lb:.3f} -> unbalanced {lp:.3f} ({lp / lb:.1f}x)")
    thm = theorem["PSI-SGDM"]["max_rel_deviation"] < 1e-9 and theorem["SGDM"]["max_rel_deviation"] > 1e-3
    reasons.append(f"Theorem 1: PSI-SGDM deviates by {theorem['PSI-SGDM']['max_rel_deviation']:.1e}, "
                   f"plain SGDM by {theorem['SGDM']['max_rel_deviation']:.1e}")
    if part_a and part_b and thm:
        return "reproduced", reasons
    if thm and trend:
        return "trend reproduced", reasons
    return "not reproduced at this scale", reasons


def plot(runs: dict, path) -> str:
    fig, axes = new_figure(1, 2, size=(9, 3.4))
    for ax, init in zip(axes[0], ("balanced", "unbalanced")):
        for arm in ARMS:
            curves = torch.tensor([r["losses"] for r in runs[(init, arm)]])
            ax.plot(curves.mean(0), label=arm, ls="-" if arm.startswith("PSI") else "--")
        ax.set_yscale("log")
        ax.set_title(f"{init} init (mean of {len(runs[(init, ARMS[0])])} seeds)")
        ax.set_xlabel("step")
        ax.set_ylabel("train batch loss")
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, path)


def run(budget: dict, budget_name: str, out_dir, progress: bool) -> Report:
    data = load_digits_tensors(0)
    total = 8 * budget["seeds"] * budget["steps"] + 2 * budget["theorem_steps"]
    bar = progress_bar(total, "003 psi", progress)
    runs = figure1(budget, data, bar)
    theorem = theorem1(budget, data, bar)
    bar.close()
    fig_table = Table(f"Figure 1: final train loss and test accuracy (eval mode, BN statistics of the training set) after {budget['steps']} steps "
                      f"(mean ± std over {budget['seeds']} seeds)",
                      ["optimizer", "balanced loss", "unbalanced loss", "balanced acc", "unbalanced acc"])
    for arm in ARMS:
        b, u = runs[("balanced", arm)], runs[("unbalanced", arm)]
        fig_table.rows.append([arm, mean_std(r["train_loss"] for r in b), mean_std(r["train_loss"] for r in u),
                               mean_std(r["test_acc"] for r in b), mean_std(r["test_acc"] for r in u)])
    thm_table = Table(f"Theorem 1: two starts W0 and T_a(W0), a log-uniform in [1e-2, 1e2] per unit, float64, "
                      f"{budget['theorem_steps']} steps",
                      ["optimizer", "max_t,u |w'-a*w|/|a*w|", "max_t |loss'-loss|"])
    for arm, r in theorem.items():
        thm_table.rows.append([arm, f"{r['max_rel_deviation']:.2e}", f"{r['max_loss_gap']:.2e}"])
    word, reasons = verdict(runs, theorem)
    figure = plot(runs, out_dir / f"{PAPER}_{NAME}_figure1.png")
    results = {"figure1": {f"{init}/{arm}": [{k: v for k, v in r.items() if k != "losses"} for r in rs]
                           for (init, arm), rs in runs.items()}, "theorem1": theorem}
    return Report(PAPER, TITLE, CLAIM,
                  f"digits (1437 train / 360 test), bias-free [64:{budget['hidden']}:{budget['hidden']}:10] MLP with "
                  f"BatchNorm (eps {BN_EPS:g}; 1e-30 for Theorem 1) after both hidden layers, batch {BATCH}, lr {LR}, momentum {MOMENTUM} for the M arms, "
                  f"psi (max_norm 1e4) on the two scale-invariant weights", CRITERIA, [fig_table, thm_table],
                  word, reasons, budget_name, [figure], results)
