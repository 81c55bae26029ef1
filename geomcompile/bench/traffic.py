"""How many bytes an optimizer step must move: the benchmark's byte count.

The count is what one ideal fused kernel per step would read and write, in the parameter's dtype:
every tensor touched once per access below, nothing re-read, nothing spilled. The same count is
used for every backend of a row group, so GB/s compares backends on equal terms (effective
bandwidth), and a backend that moves more bytes simply shows a lower GB/s.

Accesses per element of every parameter with a gradient, by base optimizer:

    SGD             read grad, weight                        write weight                  3
    SGD + momentum  read grad, weight, momentum_buffer       write weight, momentum_buffer  5
    Adam / AdamW    read grad, weight, exp_avg, exp_avg_sq   write weight, exp_avg, exp_avg_sq  7

Extra accesses per element of the parameters a geometry is applied to (``GEOMETRY_EXTRA``):

    channel_directed  +1  the sums over the O output channels (mean, or S0/S1/S2 for Sobolev) must be
                          complete before any row is written: one extra read of the gradient
    psi               +0  ‖w_u‖² comes from the weight the update reads anyway; the renormalisation
                          check takes the norm of the weight the update writes
    others            +0  not modelled (the report says so)

SGD with momentum on fp32: 5 x 4 = 20 bytes per element; with channel_directed, 24 on its weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

BASE_ACCESSES = {"sgd": 3, "sgd_momentum": 5, "adam": 7, "adamw": 7}
GEOMETRY_EXTRA = {"channel_directed": 1, "psi": 0}
ACCESS_TEXT = {
    "sgd": "read grad, weight; write weight",
    "sgd_momentum": "read grad, weight, momentum_buffer; write weight, momentum_buffer",
    "adam": "read grad, weight, exp_avg, exp_avg_sq; write weight, exp_avg, exp_avg_sq",
    "adamw": "read grad, weight, exp_avg, exp_avg_sq; write weight, exp_avg, exp_avg_sq",
}


@dataclass(frozen=True)
class Traffic:
    bytes: int
    modelled: bool = True            # False when a geometry's extra traffic is not modelled


def step_bytes(params: Iterable[torch.Tensor], optimizer: str,
               geometry_params: dict[str, Iterable[torch.Tensor]] | None = None) -> Traffic:
    """Bytes of one ideal fused step over `params` (all of them get the base update), plus each
    geometry's extra accesses over the parameters it is applied to (geometry name -> tensors)."""
    if optimizer not in BASE_ACCESSES:
        raise ValueError(f"no byte count for optimizer {optimizer!r}; known: {', '.join(BASE_ACCESSES)}")
    total = sum(BASE_ACCESSES[optimizer] * p.numel() * p.element_size() for p in params)
    modelled = True
    for name, tensors in (geometry_params or {}).items():
        if name not in GEOMETRY_EXTRA:
            modelled = False
            continue
        total += sum(GEOMETRY_EXTRA[name] * p.numel() * p.element_size() for p in tensors)
    return Traffic(int(total), modelled)


def copy_lists(largest_step_bytes: int, parameter_bytes: int) -> int:
    """How many parameter-shaped lists the copy bound copies: enough to move at least the bytes of
    the largest step of the run (each copied list is read once and written once)."""
    return max(1, -(-largest_step_bytes // (2 * parameter_bytes)))
