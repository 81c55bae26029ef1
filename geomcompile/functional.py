"""Pure functions of every geometry: no state, no in-place writes to their inputs.

These are the reference implementations; the runtime's backends are tested against them.
"""
from .geometries.channel_directed import reweighted_h0, sobolev
from .geometries.psi import psi_grad, psi_renorm_factors

__all__ = ["reweighted_h0", "sobolev", "psi_grad", "psi_renorm_factors"]
