"""Spectral penalty (seed 004_433ab1764c3faa0c.txt, Guo & Ye, "On regularization of convolutional kernels").

A convolution with kernel K is a linear map vec(Y) = M(K) vec(X) on one input X of the layer's
real size (a doubly block banded Toeplitz matrix for zero padding, eq. 2.1/2.4). The penalty is

    R_α(K) = σ_max(MᵀM − αI)                                              (Section 2)

and R_α(K) < tα bounds both ends of the spectrum: √((1−t)α) < σ_min(M) ≤ σ_max(M) < √((1+t)α)
(Theorem 2.1). With v the unit eigenvector of the eigenvalue λ of MᵀM − αI of largest magnitude
and s = sign(λ), Lemma 2.2 / Theorem 2.3 give ∇_K R = s·∇_K ‖M(K)v‖².

M is never formed: M x is the convolution of x (no bias, the layer's stride, padding, dilation,
groups and padding mode), Mᵀ y its vector-Jacobian product. λ and v come from power iteration on
S = MᵀM − αI with a block of two vectors and a Rayleigh–Ritz step, warm-started from the previous
optimizer step: the paper's remedy (Algorithm 2.1, steps 6-7) for the top value being overtaken
by the second. The block is the geometry's state, so it lives in the optimizer's state_dict().
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..analysis.facts import ParamFacts
from ..errors import GeomCompileError
from .base import Geometry, Option, StepContext, Unit, non_negative, positive, register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
BLOCK = 2   # vectors kept by the power iteration (the paper keeps the two largest)


# ---- the operator M ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvSpec:
    """Everything about the linear map M of one convolution except its kernel."""

    input_size: tuple[int, ...]              # spatial size of one input (H, W) / (L,) / (D, H, W)
    in_channels: int
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]      # (before, after) per spatial dimension
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str                         # zeros | reflect | replicate | circular

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.in_channels, *self.input_size)


def _tuple(value, n: int, what: str) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise GeomCompileError(f"{what} must be an integer or {n} integers, got {value!r}")
    return values


def conv_spec(weight_shape: Sequence[int], input_size, stride=1, padding=0, dilation=1, groups: int = 1,
              padding_mode: str = "zeros", boundary: str = "module") -> ConvSpec:
    """Normalise a convolution's arguments (nn.ConvNd semantics) into a ConvSpec, checking they fit.

    boundary="circular" replaces the padding by periodic padding of total size d·(k−1) per dimension,
    so M is the circular convolution on the torus of the input size (Sedghi, Gupta & Long 2019);
    the layer's own padding only sets the alignment, which does not change the singular values."""
    nd = len(weight_shape) - 2
    if nd not in _CONV:
        raise GeomCompileError(f"spectral supports 1-, 2- and 3-d convolutions; the weight has shape "
                               f"{tuple(weight_shape)}")
    kernel = tuple(weight_shape[2:])
    size = _tuple(input_size, nd, "input_size")
    stride, dilation = _tuple(stride, nd, "stride"), _tuple(dilation, nd, "dilation")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise GeomCompileError(f"padding must be integers, 'same' or 'valid', got {padding!r}")
        totals = [d * (k - 1) if padding == "same" else 0 for d, k in zip(dilation, kernel)]
        pads = tuple((t // 2, t - t // 2) for t in totals)
    else:
        pads = tuple((p, p) for p in _tuple(padding, nd, "padding"))
    if boundary == "circular":
        pads = tuple((min(b, d * (k - 1)), d * (k - 1) - min(b, d * (k - 1)))
                     for (b, _), d, k in zip(pads, dilation, kernel))
        padding_mode = "circular"
    elif boundary != "module":
        raise GeomCompileError(f"boundary must be 'module' or 'circular', got {boundary!r}")
    if padding_mode not in PADDING_MODES:
        raise GeomCompileError(f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}")
    if weight_shape[0] % groups:
        raise GeomCompileError(f"groups={groups} does not divide the {weight_shape[0]} output channels")
    for n, (b, a), d, k, s in zip(size, pads, dilation, kernel, stride):
        if n < 1 or s < 1 or d < 1:
            raise GeomCompileError(f"input_size, stride and dilation must be positive; got input_size {size}, "
                                   f"stride {stride}, dilation {dilation}")
        if (n + b + a - d * (k - 1) - 1) // s + 1 < 1:
            raise GeomCompileError(f"input size {size} is smaller than the kernel {kernel} (dilation "
                                   f"{dilation}, padding {pads}); the convolution has no output")
        if padding_mode != "zeros" and max(b, a) > (n - 1 if padding_mode == "reflect" else n):
            raise GeomCompileError(f"{padding_mode} padding {max(b, a)} is too large for input size {n}")
    if weight_shape[1] * groups * math.prod(size) < BLOCK:
        raise GeomCompileError(f"the input ({weight_shape[1] * groups} channel(s) of size {size}) has fewer "
                               f"than {BLOCK} entries; there is nothing to regularise")
    return ConvSpec(size, weight_shape[1] * groups, stride, pads, dilation, groups, padding_mode)


def conv_matvec(x: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """M x for a batch x of shape (B, C_in, *input_size): the convolution without bias."""
    conv = _CONV[weight.dim() - 2]
    if spec.padding_mode == "zeros" and all(b == a for b, a in spec.padding):
        return conv(x, weight, None, spec.stride, [b for b, _ in spec.padding], spec.dilation, spec.groups)
    flat = [p for pair in reversed(spec.padding) for p in pair]      # F.pad wants the last dim first
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
    return conv(F.pad(x, flat, mode=mode), weight, None, spec.stride, 0, spec.dilation, spec.groups)


def conv_rmatvec(y: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Mᵀ y: the vector-Jacobian product of the convolution with respect to its input."""
    x = torch.zeros((y.shape[0], *spec.input_shape), dtype=y.dtype, device=y.device)
    return gram_matvec(x, weight, spec, cotangent=y)[1]


def gram_matvec(x: torch.Tensor, weight: torch.Tensor, spec: ConvSpec,
                cotangent: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M x, Mᵀ M x) with one convolution and one input-gradient (Mᵀ c instead when `cotangent` is given)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = conv_matvec(x, weight.detach(), spec)
        (back,) = torch.autograd.grad(y, x, y.detach() if cotangent is None else cotangent)
    return y.detach(), back


def conv_matrix(weight: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """The dense M (rows: flattened output, columns: flattened input), from the convolution of every
    basis input. O(n) convolutions and O(n·m) memory: for checks on small layers only."""
    n = math.prod(spec.input_shape)
    basis = torch.eye(n, dtype=weight.dtype, device=weight.device).reshape(n, *spec.input_shape)
    return conv_matvec(basis, weight, spec).reshape(n, -1).T


# ---- power iteration with Rayleigh–Ritz ----------------------------------------------------------
def initial_block(spec: ConvSpec, dtype: torch.dtype, device=None, seed: int = 0) -> torch.Tensor:
    """A random start block (BLOCK, C_in, *input_size) from a private generator (global RNG untouched)."""
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn((BLOCK, *spec.input_shape), generator=gen, dtype=torch.float64)
    return (block / block.flatten(1).norm(dim=1).reshape(-1, *[1] * len(spec.input_shape))).to(dtype).to(device)


def _orthonormal_rows(V: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning those of V (b, n). A block that collapsed (S v = 0 or S v₁ ∥ S v₂,
    non-generic) is first nudged by a fixed random perturbation, so it keeps b independent vectors."""
    Q, Rf = torch.linalg.qr(V.T)
    d = Rf.diagonal().abs()
    if bool((d <= 1e3 * torch.finfo(V.dtype).eps * d.max().clamp_min(torch.finfo(V.dtype).tiny)).any()):
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(V.shape, generator=gen, dtype=torch.float64).to(V)
        Q, _ = torch.linalg.qr((V / V.norm().clamp_min(torch.finfo(V.dtype).tiny) + 1e-3 * noise).T)
    return Q.T


def ritz_iteration(apply_S: Callable[[torch.Tensor], torch.Tensor], V: torch.Tensor, iters: int):
    """Block power iteration on a symmetric S with a Rayleigh–Ritz step per iteration.

    V: (b, *shape), a start block (any scaling). Each iteration applies S once to the block:
    Q = orth(V), H = Qᵀ S Q = U Θ Uᵀ, Ritz vectors Uᵀ Q ordered by |θ| (largest first), and the next
    block is S applied to them. Returns (θ, Ritz vectors (b, *shape), next block (b, *shape), rows
    normalised) — θ[0] is the Rayleigh quotient of ritz[0], so |θ[0]| ≤ σ_max(S) always."""
    if iters < 1:
        raise GeomCompileError(f"power iterations must be >= 1, got {iters}")
    shape = V.shape
    block = V.reshape(shape[0], -1)
    for _ in range(iters):
        Q = _orthonormal_rows(block)
        SQ = apply_S(Q.reshape(shape)).reshape(shape[0], -1)
        H = Q @ SQ.T
        theta, U = torch.linalg.eigh((H + H.T) / 2)
        order = theta.abs().argsort(descending=True)
        theta, U = theta[order], U[:, order]
        ritz = U.T @ Q
        block = U.T @ SQ
    norms = block.norm(dim=1, keepdim=True).clamp_min(torch.finfo(block.dtype).tiny)
    return theta, ritz.reshape(shape), (block / norms).reshape(shape)


# ---- the penalty and its gradient ----------------------------------------------------------------
def penalty_grad(weight: torch.Tensor, v: torch.Tensor, sign: float, spec: ConvSpec) -> torch.Tensor:
    """∇_K R = s·∇_K ‖M(K) v‖² (Lemma 2.2 with u = s·v): one convolution and one weight-gradient."""
    with torch.enable_grad():
        w = weight.detach().requires_grad_(True)
        y = conv_matvec(v.unsqueeze(0), w, spec)
        (grad,) = torch.autograd.grad(y, w, (2.0 * sign) * y.detach())
    return grad


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def spectral_penalty_step(weight: torch.Tensor, spec: ConvSpec, alpha: float, block: torch.Tensor,
                          iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One penalty evaluation: (R estimate, ∇_K R in weight's dtype, Ritz values θ, next block)."""
    dtype = _compute_dtype(weight)
    w = weight.detach().to(dtype)
    theta, ritz, block = ritz_iteration(lambda X: gram_matvec(X, w, spec)[1] - alpha * X,
                                        block.to(device=w.device, dtype=dtype), iters)
    sign = 1.0 if float(theta[0]) >= 0 else -1.0
    return theta[0].abs(), penalty_grad(w, ritz[0], sign, spec).to(weight.dtype), theta, block


def spectral_penalty(weight: torch.Tensor, input_size, alpha: float = 1.0, stride=1, padding=0, dilation=1,
                     groups: int = 1, state: dict | None = None, iters: int = 2, *, padding_mode: str = "zeros",
                     boundary: str = "module") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """R_α(K) = σ_max(MᵀM − αI) of the convolution with kernel `weight` on one input of `input_size`
    (nn.ConvNd arguments), matrix-free. Returns (R, ∇_K R, state); pass the state back to warm-start
    the next call. R is the Rayleigh quotient of the current Ritz vector: a lower bound that is exact
    once the iteration has converged. Pure: `state` is not modified."""
    if alpha <= 0:
        raise GeomCompileError(f"alpha must be > 0, got {alpha}")
    spec = conv_spec(weight.shape, input_size, stride, padding, dilation, groups, padding_mode, boundary)
    block = state["V"] if state else initial_block(spec, _compute_dtype(weight), weight.device)
    if tuple(block.shape[1:]) != spec.input_shape:
        raise GeomCompileError(f"the state's vectors have shape {tuple(block.shape[1:])}, but this convolution "
                               f"acts on inputs of shape {spec.input_shape}; start again with state=None")
    value, grad, theta, block = spectral_penalty_step(weight, spec, alpha, block, iters)
    return value, grad, {"V": block, "theta": theta}


def spectral_estimates(theta: torch.Tensor, alpha: float) -> dict[str, float]:
    """What the Ritz values θ of MᵀM − αI say about M. Ritz values lie inside the spectrum, so
    sigma_max = √(α + max θ) ≤ σ_max(M) and sigma_min = √(α + min θ) ≥ σ_min(M), each exact at
    convergence for the end of the spectrum that gives R (the sign of lambda_top says which).
    sigma_*_bound are Theorem 2.1's bounds √(α ± R), valid when R is exact. σ_min(M) here is
    √λ_min(MᵀM): 0 when M has fewer rows than columns (stride > 1, fewer output channels)."""
    t = [float(x) for x in theta]
    R = abs(t[0])
    return {"R": R, "lambda_top": t[0],
            "sigma_max": math.sqrt(max(alpha + max(t), 0.0)), "sigma_min": math.sqrt(max(alpha + min(t), 0.0)),
            "sigma_max_bound": math.sqrt(alpha + R), "sigma_min_bound": math.sqrt(max(alpha - R, 0.0))}


# ---- the geometry --------------------------------------------------------------------------------
def _input_size_check(value) -> str | None:
    if value in ("auto", "largest") or (isinstance(value, list) and value and
                                        all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return None
    return f"expected 'largest', 'auto' or a list of positive integers like [32, 32], got {value!r}"


def _sizes(facts: ParamFacts) -> list[tuple[int, ...]]:
    """The spatial input sizes the layer runs at in the example inputs (several for a shared head)."""
    shapes = facts.input_shapes or ((facts.input_shape,) if facts.input_shape is not None else ())
    return list(dict.fromkeys(tuple(s[2:]) for s in shapes))


@register
class Spectral(Geometry):
    name = "spectral"
    stage = "penalty"
    paper = "004_433ab1764c3faa0c.txt"
    match_hint = "add `kind: conv` to match"
    options = {
        "alpha": Option(float, 1.0, "α > 0: the penalty σ_max(MᵀM − αI) pulls the squared singular values "
                                    "of M towards α", check=positive),
        "coef": Option(float, 1.0e-4, "weight of the penalty gradient added to the loss gradient",
                       check=non_negative),
        "input_size": Option((str, list), "auto", "'auto' (the layer's input size from example_inputs; a "
                                                  "layer run at several sizes needs a choice), 'largest' (the "
                                                  "largest of those sizes) or the spatial size, e.g. [32, 32]",
                             check=_input_size_check),
        "boundary": Option(str, "module", "module (the conv's own padding) or circular (periodic)",
                           choices=("module", "circular")),
        "power_iters": Option(int, 2, "power iterations per step, warm-started", check=positive),
        "init_iters": Option(int, 10, "power iterations at the first step (nothing to warm-start from)",
                             check=positive),
        "every": Option(int, 1, "apply the penalty every k optimizer steps", check=positive),
    }

    def check(self, facts: ParamFacts) -> str | None:
        if facts.kind != "conv":
            return f"spectral needs a convolution weight; {facts.name} is kind {facts.kind!r}"
        if len(facts.shape) - 2 not in _CONV:
            return f"spectral supports 1-, 2- and 3-d convolutions; {facts.name} has shape {tuple(facts.shape)}"
        if "kernel_size" not in facts.layer:
            return (f"{facts.name} is used by a functional convolution ({facts.module}); its stride and padding "
                    f"are not known to the analysis. Use an nn.Conv module")
        return None

    def input_size(self, facts: ParamFacts) -> tuple[tuple[int, ...], str]:
        """(spatial size of M's input, how it was chosen) from the `input_size` option.

        A layer run at several input sizes (a head shared over FPN levels) has one operator per
        size. `largest` takes the largest (by number of positions): with zero padding the operator at a
        smaller size is a block of it (embed the input with zeros, restrict the output), so its σ_max
        bounds theirs; σ_min has no such bound. `auto` refuses to choose and says so."""
        size = self.opts["input_size"]
        if isinstance(size, list):
            return tuple(size), "given"
        sizes = _sizes(facts)
        if not sizes:
            raise GeomCompileError(
                f"spectral on {facts.name}: input_size is {size!r} but the input size of {facts.module} is "
                f"unknown. Fix: pass example_inputs=(x,) to gc.plan / gc.apply, or set `input_size: "
                f"[H, W]` in the policy")
        if len(sizes) == 1:
            return sizes[0], "from example_inputs"
        listed = ", ".join("x".join(map(str, s)) for s in sizes)
        if size == "auto":
            raise GeomCompileError(
                f"spectral on {facts.name}: {facts.module} runs at {len(sizes)} input sizes ({listed}) in "
                f"example_inputs, so input_size 'auto' has no single size. Fix: set `input_size: largest` "
                f"(the operator at the largest size; its sigma_max bounds the others') or `input_size: "
                f"[H, W]` in the policy")
        largest = max(sizes, key=lambda s: (math.prod(s), s))
        return largest, f"largest of the {len(sizes)} sizes it runs at: {listed}"

    def spec(self, facts: ParamFacts) -> ConvSpec:
        size, _ = self.input_size(facts)
        layer = facts.layer
        try:
            return conv_spec(facts.shape, list(size), layer["stride"], layer["padding"], layer["dilation"],
                             layer["groups"], layer.get("padding_mode", "zeros"), self.opts["boundary"])
        except GeomCompileError as e:
            raise GeomCompileError(f"spectral on {facts.name}: {e}. Fix: check `input_size` "
                                   f"(now {self.opts['input_size']!r}) or the layer") from None

    def units(self, facts: Sequence[ParamFacts], structure=None) -> list[Unit]:
        for f in facts:
            self.spec(f)             # fail at install, with the fix, rather than at the first step
        return super().units(facts, structure)

    def on_install(self, unit: Unit, state: dict, ctx: StepContext) -> list[str]:
        facts = unit.single(self.name)
        size, how = self.input_size(facts)
        return [f"spectral {facts.name}: operator on inputs of size {'x'.join(map(str, size))} ({how})"]

    def init_state(self, unit: Unit, ctx: StepContext) -> dict:
        weight = ctx.params[unit.single(self.name).name]
        seed = zlib.crc32(unit.key.encode())       # reproducible per layer, global RNG untouched
        block = initial_block(self.spec(unit.single(self.name)), _compute_dtype(weight), weight.device, seed)
        # calls: optimizer steps this unit took part in (for `every`); steps: penalty evaluations.
        return {"V": block, "theta": torch.zeros(BLOCK, dtype=block.dtype), "steps": 0, "calls": 0}

    def pre_step(self, unit: Unit, grads, state, ctx: StepContext) -> None:
        facts, (grad,) = unit.single(self.name), grads
        if grad is None:
            return
        calls = state.get("calls", 0)
        state["calls"] = calls + 1
        if calls % self.opts["every"]:
            return
        iters = self.opts["power_iters"] if state["steps"] else max(self.opts["init_iters"], self.opts["power_iters"])
        _, penalty, theta, block = spectral_penalty_step(ctx.params[facts.name].detach(), self.spec(facts),
                                                         self.opts["alpha"], state["V"], iters)
        state.update(V=block, theta=theta, steps=state["steps"] + 1)
        if self.opts["coef"]:
            grad.add_(penalty.to(grad.dtype), alpha=self.opts["coef"])

    def diagnostics(self, unit: Unit, state) -> dict[str, float]:
        if not state.get("steps"):
            return {}
        return {**spectral_estimates(state["theta"], self.opts["alpha"]), "steps": float(state["steps"])}
