"""A brute-force float64 reference for G-SGD (design ../shared/designs/gspace.md §14), independent of
the closed forms in geomcompile/geometries/gspace.py.

It works on one G-chain of a small torch model, with every weight and bias entry as an edge of
a flat vector w (layer by layer: E[0], b[0], E[1], b[1], ...):

* the skeleton, written out from the table of design §2 with Python loops (designated in- and
  out-edges per unit, F, U, N);
* every input→output path (and every bias→output path), the 0/1 structure matrix A (m × #paths),
  its rank (= m − H, Thm 3.4), and a check that the designated basis paths span every path with
  integer coefficients;
* the explicit reparametrisation w = w(v; w_F): N-edges in layer order, w_e = v_{p(e)} / (product
  of the other edges of p(e)), the F entries held at their values;
* ∂l/∂v by autograd through that reparametrisation, and the truth of one G-SGD step:
  v' = v − η·∂l/∂v, w' = w(v'; w_F).

Slow by design (Python loops over edges and paths); the nets are tiny.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch.func import functional_call


@dataclass
class ChainSpec:
    """One chain of a model: its layers' weight names, bias names (or None), taps and centres."""

    weights: list
    biases: list
    taps: list
    centres: list


@dataclass
class Reference:
    model: torch.nn.Module
    spec: ChainSpec
    x: torch.Tensor
    y: torch.Tensor
    shapes: list = field(init=False)          # the torch shapes of the chain's weights
    h: list = field(init=False)
    edges: list = field(init=False)           # flat index -> ("w", l, o, i, t) or ("b", l, o)
    index: dict = field(init=False)           # the inverse
    free: set = field(init=False)
    updated: set = field(init=False)
    basis: dict = field(init=False)           # N-edge flat index -> its basis path (tuple of flat indices)

    def __post_init__(self):
        params = dict(self.model.named_parameters())
        self.shapes = [tuple(params[n].shape) for n in self.spec.weights]
        L = len(self.shapes)
        self.h = [params[self.spec.weights[0]].reshape(self.shapes[0][0], -1, self.spec.taps[0]).shape[1]]
        self.h += [s[0] for s in self.shapes]
        self.edges = []
        for l in range(L):
            for o in range(self.h[l + 1]):
                for i in range(self.h[l]):
                    for t in range(self.spec.taps[l]):
                        self.edges.append(("w", l, o, i, t))
            if self.spec.biases[l] is not None:
                self.edges += [("b", l, o) for o in range(self.h[l + 1])]
        self.index = {e: k for k, e in enumerate(self.edges)}
        self._skeleton()

    # -- the skeleton, one unit at a time (design §2) ---------------------------------------
    def in_edge(self, lv, o):
        l = lv - 1
        return self.index[("w", l, o, o % self.h[l], self.spec.centres[l])]

    def out_edge(self, lv, i):
        return self.index[("w", lv, i % self.h[lv + 1], i, self.spec.centres[lv])]

    def _skeleton(self):
        L, h = len(self.shapes), self.h
        ins = {self.in_edge(lv, o) for lv in range(1, L) for o in range(h[lv])}
        self.free = {self.out_edge(lv, i) for lv in range(1, L) for i in range(h[lv])}
        self.updated = ins - self.free
        self.basis = {}
        for k, e in enumerate(self.edges):
            if k in self.free:
                continue
            if e[0] == "b":
                tail, head = None, (e[1] + 1, e[2])
            else:
                _, l, o, i, _ = e
                tail, head = (l, i), (l + 1, o)
            self.basis[k] = tuple(self.back(tail)) + (k,) + tuple(self.fwd(head))

    def back(self, unit):
        out = []
        while unit is not None and unit[0] > 0:
            lv, o = unit
            out.insert(0, self.in_edge(lv, o))
            unit = (lv - 1, o % self.h[lv - 1])
        return out

    def fwd(self, unit):
        out = []
        L = len(self.shapes)
        while unit[0] < L:
            lv, i = unit
            out.append(self.out_edge(lv, i))
            unit = (lv + 1, i % self.h[lv + 1])
        return out

    @property
    def m(self) -> int:
        return len(self.edges)

    @property
    def H(self) -> int:
        return sum(self.h[1:-1])

    def masks(self):
        """(free, updated) per layer, shaped (out, in, taps), from the sets."""
        out = []
        for l in range(len(self.shapes)):
            shape = (self.h[l + 1], self.h[l], self.spec.taps[l])
            free, upd = torch.zeros(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool)
            for k in self.free:
                e = self.edges[k]
                if e[1] == l:
                    free[e[2:]] = True
            for k in self.updated:
                e = self.edges[k]
                if e[1] == l:
                    upd[e[2:]] = True
            out.append((free, upd))
        return out

    # -- all paths and the structure matrix --------------------------------------------------
    def all_paths(self):
        L, h, T = len(self.shapes), self.h, self.spec.taps
        paths = []
        for start in range(-1, L):         # -1: from an input; l: from a bias of layer l
            if start >= 0 and self.spec.biases[start] is None:
                continue
            first = 0 if start < 0 else start + 1
            heads = [(o,) for o in range(h[start + 1])] if start >= 0 else [(i,) for i in range(h[0])]
            for choice in itertools.product(*[range(h[l + 1]) for l in range(first, L)]):
                for taps in itertools.product(*[range(T[l]) for l in range(first, L)]):
                    for (node,) in heads:
                        path = [] if start < 0 else [self.index[("b", start, node)]]
                        cur = node
                        for l, o, t in zip(range(first, L), choice, taps):
                            path.append(self.index[("w", l, o, cur, t)])
                            cur = o
                        paths.append(tuple(path))
        return paths

    def structure_checks(self) -> dict:
        """rank A, rank of the basis columns, and the largest deviation from an integer combination."""
        paths = self.all_paths()
        A = torch.zeros(self.m, len(paths), dtype=torch.float64)
        for p, path in enumerate(paths):
            A[list(path), p] = 1.0
        Ab = torch.zeros(self.m, len(self.basis), dtype=torch.float64)
        for p, path in enumerate(self.basis.values()):
            Ab[list(path), p] = 1.0
        coeffs = torch.linalg.lstsq(Ab, A).solution
        return {"paths": len(paths), "rank_A": int(torch.linalg.matrix_rank(A)),
                "rank_basis": int(torch.linalg.matrix_rank(Ab)),
                "residual": float((Ab @ coeffs - A).abs().max()),
                "non_integer": float((coeffs - coeffs.round()).abs().max()),
                "basis_are_paths": set(self.basis.values()) <= set(paths)}

    # -- flat vector <-> model parameters ----------------------------------------------------
    def flat(self, model=None) -> torch.Tensor:
        params = dict((model or self.model).named_parameters())
        parts = []
        for l, (wn, bn) in enumerate(zip(self.spec.weights, self.spec.biases)):
            parts.append(params[wn].detach().reshape(-1).to(torch.float64))
            if bn is not None:
                parts.append(params[bn].detach().reshape(-1).to(torch.float64))
        return torch.cat(parts)

    def unflat(self, w: torch.Tensor) -> dict:
        out, k = {}, 0
        for l, (wn, bn) in enumerate(zip(self.spec.weights, self.spec.biases)):
            n = 1
            for s in self.shapes[l]:
                n *= s
            out[wn] = w[k:k + n].reshape(self.shapes[l])
            k += n
            if bn is not None:
                out[bn] = w[k:k + self.h[l + 1]]
                k += self.h[l + 1]
        return out

    def output(self, w: torch.Tensor) -> torch.Tensor:
        params = {n: p.detach().to(torch.float64) for n, p in self.model.named_parameters()}
        params.update(self.unflat(w))
        return functional_call(self.model, params, (self.x,))

    def loss(self, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.output(w) - self.y) ** 2).sum()

    # -- path values and the reparametrisation -----------------------------------------------
    def values(self, w: torch.Tensor) -> torch.Tensor:
        return torch.stack([w[list(p)].prod() for p in self.basis.values()])

    def weights_of(self, v: torch.Tensor, w_free: torch.Tensor) -> torch.Tensor:
        """w(v; w_F): F entries from w_free, every N-edge solved from its path in layer order."""
        w = list(w_free.unbind())
        for (k, path), value in zip(self.basis.items(), v.unbind()):
            others = [w[j] for j in path if j != k]
            w[k] = value / torch.stack(others).prod() if others else value
        return torch.stack(w)

    def dl_dv(self, w: torch.Tensor) -> torch.Tensor:
        v = self.values(w).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self.loss(self.weights_of(v, w.detach())), v)
        return g

    def truth_step(self, w: torch.Tensor, lr: float) -> torch.Tensor:
        """One G-SGD step in path space, mapped back with F fixed."""
        v = self.values(w)
        return self.weights_of(v - lr * self.dl_dv(w), w).detach()

    def plain_grad(self, w: torch.Tensor) -> torch.Tensor:
        w = w.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self.loss(w), w)
        return g

    # -- the library's layout -----------------------------------------------------------------
    def split(self, flat: torch.Tensor):
        """A flat vector -> (edge tensors, biases) in the library's layout."""
        params = self.unflat(flat)
        E = [params[wn].reshape(self.h[l + 1], self.h[l], self.spec.taps[l]) for l, wn in enumerate(self.spec.weights)]
        b = [None if bn is None else params[bn] for bn in self.spec.biases]
        return E, b

    def join(self, E, b) -> torch.Tensor:
        parts = []
        for e, bb in zip(E, b):
            parts.append(e.reshape(-1))
            if bb is not None:
                parts.append(bb.reshape(-1))
        return torch.cat(parts)

    def rescale(self, w: torch.Tensor, gen: torch.Generator, low: float = -2.0, high: float = 2.0) -> torch.Tensor:
        """A random 𝒢-action: every hidden unit scaled by c = exp(U[low, high])."""
        E, b = self.split(w.clone())
        E, b = [e.clone() for e in E], [None if bb is None else bb.clone() for bb in b]
        for lv in range(1, len(E)):
            c = torch.exp(torch.empty(self.h[lv], dtype=torch.float64).uniform_(low, high, generator=gen))
            E[lv - 1] = E[lv - 1] * c[:, None, None]
            if b[lv - 1] is not None:
                b[lv - 1] = b[lv - 1] * c
            E[lv] = E[lv] / c[None, :, None]
        return self.join(E, b)
