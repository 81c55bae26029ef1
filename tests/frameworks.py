"""Shared pieces of the framework-client tests (Lightning, HF Trainer, DCP, ZeRO, torch.compile).

The tests use the public API only. They observe what the base optimizer consumed from outside:
with plain SGD (momentum 0, no weight decay) a step is p_new = p_old - lr * g, so g can be read
off the parameters. `UpdateRecorder` sums, with a tensor hook (`p.register_hook`), each backward's
own gradient for p as autograd hands it over, before it is added to `p.grad`, and records the
weight before the step; after each step it checks g == T(sum of the raw gradients since the last
step) for geometry parameters and g == that sum for the others. Reading `p.grad` itself (a
post-accumulate-grad hook) would not do: a runtime that transforms `p.grad` in place between two
accumulated backwards would corrupt the very sum the check is made against.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import geomcompile as gc

LR = 0.05
LAM = 0.5

CD_CONV = {"version": 1, "rules": [{"name": "convs", "match": {"kind": "conv"},
                                    "use": {"channel_directed": {"metric": "sobolev", "lam": LAM}}}]}
PSI = {"version": 1, "rules": [{"name": "bn-convs", "match": {"kind": "conv", "scale_invariant": True},
                                "use": {"psi": {"max_norm": 2.0}}}]}
SPECTRAL = {"version": 1, "rules": [{"name": "convs", "match": {"kind": "conv"},
                                     "use": {"spectral": {"coef": 0.1, "power_iters": 1}}}]}


def sobolev_on_convs(model: nn.Module) -> dict[str, Callable]:
    """The update direction CD_CONV prescribes: Sobolev along out_dim 0 on conv weights."""
    return {f"{n}.weight": partial(gc.functional.sobolev, lam=LAM, dim=0)
            for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


class TinyBNNet(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> global pool -> linear; both conv weights are
    row-scale-invariant (bias-free, BatchNorm in training mode)."""

    def __init__(self, channels: int = 6, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def example_images(n: int = 4) -> tuple[torch.Tensor]:
    return (torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(123)),)


def image_batches(n: int, batch: int = 8, seed: int = 0, classes: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def train_plain(model: nn.Module, opt: torch.optim.Optimizer, batches, step: Callable | None = None) -> None:
    """The reference loop: zero_grad, forward, backward, step."""
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        (step or opt.step)()


def scale_rows_to_norm(weight: torch.Tensor, norm: float) -> None:
    with torch.no_grad():
        rows = weight.reshape(weight.shape[0], -1)
        rows.mul_(norm / rows.norm(dim=1, keepdim=True))


def assert_params_equal(model: nn.Module, reference: nn.Module, what: str) -> None:
    bad = [n for (n, p), q in zip(model.named_parameters(), reference.parameters()) if not torch.equal(p, q)]
    if bad:
        n = bad[0]
        p, q = dict(model.named_parameters())[n], dict(reference.named_parameters())[n]
        raise AssertionError(f"{what}: {len(bad)} of {len(list(model.parameters()))} parameters differ, "
                             f"e.g. {n}: max |diff| {float((p - q).abs().max()):.3e}")


def assert_params_close(model: nn.Module, reference: nn.Module, what: str, rtol: float, atol: float) -> None:
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m, n=n: f"{what}: {n}: {m}")


def assert_same_diagnostics(resumed, uninterrupted) -> None:
    """Geometry state a resumed plan reports (counters, estimates) equals the uninterrupted plan's."""
    got, want = resumed.diagnostics(), uninterrupted.diagnostics()
    diff = {f"{unit}/{geometry}/{key}": (got.get(unit, {}).get(geometry, {}).get(key), value)
            for unit, per_geometry in want.items() for geometry, values in per_geometry.items()
            for key, value in values.items() if got.get(unit, {}).get(geometry, {}).get(key) != value}
    assert got.keys() == want.keys() and not diff, f"resumed vs uninterrupted diagnostics (got, want): {diff}"


class UpdateRecorder:
    """Checks, after every step of a momentum-free, decay-free SGD with learning rate `lr`, that
    each parameter moved by -lr * T(raw), where raw is the sum of the gradients accumulated since
    the previous step and T = transforms[name] (identity for parameters not in `transforms`).

    Register it after `gc.apply`, so that its step post-hook runs after the plan's own."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float,
                 transforms: dict[str, Callable], rtol: float = 1e-5, atol: float = 1e-7):
        self.params = dict(model.named_parameters())
        missing = set(transforms) - set(self.params)
        assert not missing, f"no such parameters: {missing}"
        self.lr, self.transforms, self.rtol, self.atol = lr, transforms, rtol, atol
        self.parts: dict[str, list[torch.Tensor]] = {}     # each backward's gradient since the last step
        self.before: dict[str, torch.Tensor] = {}
        self.steps = 0                   # steps at which at least one gradient was seen
        self.transformed_steps = 0       # steps at which every geometry parameter got exactly T(raw)
        self.failures: list[str] = []
        self.handles = [p.register_hook(partial(self._record, n, p))
                        for n, p in self.params.items() if p.requires_grad]
        self.handles.append(optimizer.register_step_post_hook(self._check))

    def _record(self, name: str, p: torch.Tensor, grad: torch.Tensor) -> None:
        self.parts.setdefault(name, []).append(grad.detach().clone())
        self.before[name] = p.detach().clone()

    def _close(self, actual: torch.Tensor, expected: torch.Tensor) -> bool:
        return torch.allclose(actual, expected, rtol=self.rtol, atol=self.atol)

    def _check(self, optimizer, args, kwargs) -> None:
        if not self.parts:
            return
        self.steps += 1
        all_transformed = True
        for name, parts in self.parts.items():
            raw = torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]
            p = self.params[name].detach()
            transform = self.transforms.get(name)
            direction = transform(raw) if transform is not None else raw
            if self._close(p, self.before[name] - self.lr * direction):
                continue
            if name in self.transforms:
                all_transformed = False
            got = (self.before[name] - p) / self.lr
            rel = float((got - direction).norm() / direction.norm().clamp_min(1e-30))
            self.failures.append(f"step {self.steps}: {name} moved by -lr*g with |g - expected|/|expected| = "
                                 f"{rel:.1%}" + self._explain(p, name, parts, transform))
        self.transformed_steps += all_transformed
        self.parts.clear()
        self.before.clear()

    def _explain(self, p, name, parts, transform) -> str:
        if transform is None:
            return ""
        if self._close(p, self.before[name] - self.lr * sum(parts)):
            return " (g is the raw gradient sum, untransformed)"
        if len(parts) > 1 and self._close(p, self.before[name] - self.lr * (transform(parts[0]) + sum(parts[1:]))):
            return " (g = T(g1) + g2 + ...: transformed before the last backward)"
        return ""

    def verify(self, expected_steps: int) -> None:
        assert self.steps == expected_steps, f"checked {self.steps} optimizer steps, expected {expected_steps}"
        assert not self.failures, (f"{self.transformed_steps} of {self.steps} steps gave the base optimizer "
                                   f"T(sum of raw gradients); first mismatches:\n  " + "\n  ".join(self.failures[:6]))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def batches_loader(batches) -> DataLoader:
    """The given (x, y) batches, in order, as a DataLoader (one batch per step)."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return DataLoader(TensorDataset(x, y), batch_size=len(batches[0][1]), shuffle=False)
