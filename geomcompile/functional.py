"""Pure functions of every geometry: no state, no in-place writes to their inputs.

These are the reference implementations; the runtime's backends are tested against them.
"""
from .geometries.channel_directed import reweighted_h0, sobolev
from .geometries.gspace import (gspace_direction, gspace_icr, gspace_masks, gspace_normalize,
                                 gspace_step)
from .geometries.pom import (pom_direction, pom_distance, pom_group_norms, pom_membership, pom_proj,
                             pom_retract, pom_zeta)
from .geometries.psi import psi_grad, psi_renorm_factors
from .geometries.spectral import spectral_penalty

__all__ = ["reweighted_h0", "sobolev", "psi_grad", "psi_renorm_factors",
           "pom_proj", "pom_retract", "pom_distance", "pom_group_norms", "pom_zeta", "pom_direction",
           "pom_membership", "spectral_penalty",
           "gspace_masks", "gspace_icr", "gspace_step", "gspace_direction", "gspace_normalize"]
