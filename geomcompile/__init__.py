"""geomcompile: geometry-aware training for unmodified PyTorch models.

    import geomcompile as gc
    plan = gc.apply(model, "resnet", optimizer)   # analyse, match the policy, install optimizer hooks
    print(plan.summary())
"""
from .errors import GeomCompileError, GeomCompileWarning
from .version import __version__
from .analysis import analyze
from .analysis.facts import ParamFacts, ScaleInvariance, Structure
from .policy import Policy, load_policy
from .plan import Plan, apply, plan
from .plan_io import load_plan
from .suggest import suggest_policy
from .geometries.base import Rescale
from . import ema, functional, geometries

__all__ = ["analyze", "load_policy", "plan", "apply", "load_plan", "suggest_policy", "Plan", "Policy", "Structure",
           "ParamFacts", "ScaleInvariance", "Rescale", "GeomCompileError", "GeomCompileWarning", "functional", "geometries"]
