"""geomcompile: geometry-aware training for unmodified PyTorch models.

    import geomcompile as gc
    plan = gc.apply(model, "resnet", optimizer)   # analyse, match the policy, install optimizer hooks
    print(plan.summary())
"""
from .errors import GeomCompileError, GeomCompileWarning
from .analysis import analyze
from .analysis.facts import ParamFacts, ScaleInvariance, Structure
from .policy import Policy, load_policy
from .plan import Plan, apply, plan
from . import functional, geometries

__version__ = "0.1.0"
__all__ = ["analyze", "load_policy", "plan", "apply", "Plan", "Policy", "Structure", "ParamFacts",
           "ScaleInvariance", "GeomCompileError", "GeomCompileWarning", "functional", "geometries"]
