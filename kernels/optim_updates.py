"""The base optimizers' element-wise updates, as @triton.jit helpers the fused kernels inline.

They follow ``torch.optim``'s single-tensor code (``_single_tensor_sgd``, ``_single_tensor_adam``)
operation by operation, in fp32, so a fused step matches torch's step on the same gradient to
fp32 rounding. Hyperparameters are kernel *scalar arguments* (never constexpr): an lr changed by a
scheduler is read at every step and nothing recompiles. Only on/off switches are constexpr.

Host side: ``SGDUpdate`` / ``AdamUpdate`` hold one step's hyperparameters; ``kernel_args`` turns one
into the scalar arguments and constexpr flags every fused kernel takes, in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

NONE, SGD, ADAM = 0, 1, 2      # UPDATE constexpr


@dataclass(frozen=True)
class SGDUpdate:
    """torch.optim.SGD's group hyperparameters for one step."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False

    @property
    def state_keys(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum != 0 else ()


@dataclass(frozen=True)
class AdamUpdate:
    """torch.optim.Adam / AdamW's group hyperparameters and the step count *after* this step's
    increment (torch increments ``state['step']`` before computing the bias corrections)."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False        # AdamW
    maximize: bool = False
    step: int = 1

    @property
    def state_keys(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")


def kernel_args(update) -> tuple[dict, dict]:
    """(scalar kwargs, constexpr kwargs) of a fused kernel for `update` (None: gradient transform)."""
    s = dict(lr=0.0, momentum=0.0, one_minus_dampening=1.0, weight_decay=0.0, lerp_w=0.0, beta2=0.0,
             one_minus_beta2=0.0, eps=0.0, neg_step_size=0.0, bc2_sqrt=1.0, decay=1.0)
    c = dict(UPDATE=NONE, N_STATE=0, MAXIMIZE=False, HAS_WD=False, DECOUPLED=False, HAS_MOMENTUM=False,
             NESTEROV=False)
    if isinstance(update, SGDUpdate):
        s.update(lr=float(update.lr), momentum=float(update.momentum),
                 one_minus_dampening=1.0 - float(update.dampening), weight_decay=float(update.weight_decay))
        c.update(UPDATE=SGD, N_STATE=1 if update.momentum != 0 else 0, MAXIMIZE=bool(update.maximize), HAS_WD=update.weight_decay != 0,
                 HAS_MOMENTUM=update.momentum != 0, NESTEROV=bool(update.nesterov))
    elif isinstance(update, AdamUpdate):
        # Python floats (double), exactly as torch computes them before its fp32 tensor ops.
        bias_correction1 = 1 - update.beta1 ** update.step
        bias_correction2 = 1 - update.beta2 ** update.step
        s.update(lr=float(update.lr), weight_decay=float(update.weight_decay), lerp_w=1 - update.beta1,
                 beta2=float(update.beta2), one_minus_beta2=1 - update.beta2, eps=float(update.eps),
                 neg_step_size=-(update.lr / bias_correction1), bc2_sqrt=bias_correction2 ** 0.5,
                 decay=1 - update.lr * update.weight_decay)
        c.update(UPDATE=ADAM, N_STATE=2, MAXIMIZE=bool(update.maximize), HAS_WD=update.weight_decay != 0,
                 DECOUPLED=bool(update.decoupled))
    elif update is not None:
        raise TypeError(f"update must be SGDUpdate, AdamUpdate or None, got {type(update).__name__}")
    return s, c


@triton.jit
def base_update(g, w, s1, s2, first, lr, momentum, one_minus_dampening, weight_decay, lerp_w, beta2,
                one_minus_beta2, eps, neg_step_size, bc2_sqrt, decay,
                UPDATE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr,
                HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    """One tile of the base update, in fp32; returns (weight, s1, s2).

    UPDATE == 1, ``_single_tensor_sgd``: s1 is the momentum buffer; `first`: it does not exist yet
    and becomes the gradient (torch: ``buf = grad.clone()``).
    UPDATE == 2, ``_single_tensor_adam`` (amsgrad=False, capturable=False): s1 = exp_avg,
    s2 = exp_avg_sq; neg_step_size = −lr/(1 − beta1^t), bc2_sqrt = √(1 − beta2^t) from the host."""
    if MAXIMIZE:
        g = -g
    if UPDATE == 1:
        if HAS_WD:
            g = g + weight_decay * w
        if HAS_MOMENTUM:
            s1 = tl.where(first, g, s1 * momentum + one_minus_dampening * g)
            if NESTEROV:
                g = g + momentum * s1
            else:
                g = s1
        w = w + (-lr) * g
    else:
        if HAS_WD:
            if DECOUPLED:
                w = w * decay                    # AdamW: param.mul_(1 - lr * weight_decay)
            else:
                g = g + weight_decay * w
        # exp_avg.lerp_(grad, 1 - beta1), with torch's two-sided lerp formula
        s1 = tl.where(lerp_w < 0.5, s1 + lerp_w * (g - s1), g - (g - s1) * (1.0 - lerp_w))
        s2 = s2 * beta2 + one_minus_beta2 * g * g
        denom = tl.sqrt(s2) / bc2_sqrt + eps
        w = w + neg_step_size * s1 / denom
    return w, s1, s2


TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def tl_dtype(dtype: torch.dtype):
    """The triton.language dtype of a torch floating dtype the kernels support (fp32, fp16, bf16)."""
    try:
        return TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"geomcompile kernels support float32, float16 and bfloat16 tensors, got {dtype}") from None
