"""Per-parameter facts written by the analysis passes and read by policies and geometries.

Passes write facts; they never act on the model. Where a pass is unsure it leaves the
conservative answer (``scale_invariant=None``) and records why in words a user can read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

KINDS = ("conv", "conv_transpose", "linear", "norm_weight", "norm_bias", "bias", "embedding", "other")
UNITS = ("row", "group", "tensor")  # finest -> coarsest family of scalings


@dataclass(frozen=True)
class ScaleInvariance:
    """The loss does not change when the weight's units are scaled by positive factors.

    unit: "row"    - every output channel (row along ``out_dim``) may be scaled on its own;
          "group"  - the rows of one normalisation group are scaled together (GroupNorm);
          "tensor" - the whole tensor is scaled by one factor (LayerNorm over the channels).
    group_size: rows per group when unit == "group" (consecutive rows along out_dim).
    normalizer: qualified name(s) of the normalisation(s) that absorb the scaling.
    reason: one line a person can read.
    """

    unit: str
    normalizer: str
    reason: str
    group_size: int | None = None

    def __str__(self) -> str:
        return f"invariant[{self.unit}] by {self.normalizer}"


@dataclass(frozen=True)
class Absorber:
    """A normalisation that absorbs a scale-invariant weight's channels on one path.

    module: qualified name of the normalisation module (for a functional normalisation without
            running statistics, the name of its op in the captured graph);
    offset: index, in the normaliser's channel dimension, of the layer's output channel 0
            (non-zero behind ``torch.cat``; one normaliser may read the layer at several offsets);
    channels: how many of the layer's output channels it reads there (consecutive from offset);
    bias: qualified name of the layer's bias parameter when it reaches this normaliser unscaled
          (a per-channel constant, removed by the per-channel mean), else None;
    running_stats: the module keeps running statistics (BatchNorm / InstanceNorm with
                   ``track_running_stats=True``) that describe the layer's current scale.
    """

    module: str
    offset: int
    channels: int
    bias: str | None
    running_stats: bool


@dataclass
class ParamFacts:
    name: str
    shape: tuple[int, ...]
    kind: str = "other"
    out_dim: int | None = None          # output-channel dimension of the weight (0 conv/linear, 1 conv-transpose)
    groups: int = 1
    depthwise: bool = False             # groups == in_channels == out_channels > 1
    scale_invariant: ScaleInvariance | None = None
    invariance_reason: str = ""         # why not invariant (or why it is), always filled by the pass
    absorbers: tuple[Absorber, ...] | None = None   # normalisations that absorb the scaled channels; None = unknown
    absorbers_reason: str = ""          # why absorbers is unknown (empty when known)
    module: str | None = None           # qualified name of the module (or op) that consumes the parameter
    layer: dict[str, Any] = field(default_factory=dict)  # stride, padding, dilation, padding_mode, ...
    input_shape: tuple[int, ...] | None = None   # the consuming layer's input shape (needs example_inputs)
    output_shape: tuple[int, ...] | None = None  # the consuming layer's output shape (needs example_inputs)
    input_shapes: tuple[tuple[int, ...], ...] = ()  # every distinct input shape, in call order (a layer
                                                    # run at several sizes has input_shape None)
    aliases: tuple[str, ...] = ()       # other names of the same tensor (tied / shared parameters)
    uses: int = 0                       # how many ops consume it in the captured graph
    notes: list[str] = field(default_factory=list)
    # G-chains (analysis/coupling.py, design gspace.md §8): set on conv (groups 1) / linear weights
    g_next: str | None = None           # next layer's weight when this layer -> it is a G-link
    g_prev: str | None = None           # previous layer's weight when it -> this layer is a G-link
    g_bias: str | None = None           # this layer's own bias parameter (None without bias)
    g_taps: int | None = None           # T of the edge tensor W.reshape(out, in, T)
    g_centre: int | None = None         # the skeleton tap in 0..T-1
    g_block: tuple[int, int] | None = None   # (C, S) for a Linear fed by a channel-major flatten
    g_reason: str = ""                  # why the chain ends after this weight (empty when g_next is set)
    g_weight: str | None = None         # on a bias: its layer's weight, when that weight is G-linked

    @property
    def g_coupled(self) -> bool:
        """A weight with a G-link on either side, or the bias of such a weight."""
        return self.g_next is not None or self.g_prev is not None or self.g_weight is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def roles(self) -> str:
        """Short structural description for the plan report."""
        parts = []
        if self.out_dim is not None:
            parts.append(f"out_dim={self.out_dim}")
        if self.groups > 1:
            parts.append("depthwise" if self.depthwise else f"groups={self.groups}")
        if self.scale_invariant is not None:
            parts.append(str(self.scale_invariant))
        if self.aliases:
            parts.append("shared")
        return " ".join(parts) or "-"


class Structure(Mapping[str, ParamFacts]):
    """Facts for every parameter of a model, keyed by its qualified name (first name for shared ones)."""

    def __init__(self, facts: dict[str, ParamFacts], capture_path: str, notes: list[str] | None = None):
        self._facts = facts
        self.capture_path = capture_path     # "fx" or "run"
        self.notes = list(notes or [])

    def __getitem__(self, name: str) -> ParamFacts:
        try:
            return self._facts[name]
        except KeyError:
            for f in self._facts.values():
                if name in f.aliases:
                    return f
            from ..errors import GeomCompileError
            raise GeomCompileError(
                f"no parameter named {name!r} in the analysed model; known names start with "
                f"{list(self._facts)[:5]}") from None

    def __contains__(self, name: object) -> bool:     # a Mapping: `in` and .get() never raise for unknown names
        return isinstance(name, str) and (name in self._facts or any(name in f.aliases for f in self._facts.values()))

    def get(self, name: str, default=None):
        return self[name] if name in self else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._facts)

    def __len__(self) -> int:
        return len(self._facts)

    def __repr__(self) -> str:
        return f"Structure({len(self)} parameters, capture={self.capture_path})"
