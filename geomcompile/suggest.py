"""A policy written for one model from its analysis: `geomcompile suggest MODULE:CALLABLE`.

    text = gc.suggest_policy(model, example_inputs=(x,))    # YAML, with a comment per rule
    plan = gc.plan(model, text, example_inputs=(x,))         # validates in strict mode

Each group of weights gets the geometry its facts justify, the way the shipped policies choose:

* a conv / linear weight a normalisation makes scale-invariant, not depthwise -> psi (seed 003);
* a depthwise conv that is scale-invariant -> channel_directed (its units hold k*k numbers: psi's
  norm scaling is noisy there, as in the shipped `resnet` and `mobilenet` policies);
* every other conv / transposed conv / linear weight -> channel_directed (seed 000), which needs
  no invariance.

Where the analysis finds 𝒢-chains (ReLU layers without a normalisation between them), a G-SGD
rule (gspace, seed 002) for them is written too, commented out, first in the file so that it takes
them when uncommented: G-SGD is a choice of training recipe (its exact step needs plain SGD, its
skeleton initialisation changes the function), and on a deep plain chain its first-order form
under SGD-momentum diverged where channel_directed did not (measured on tests/policy_zoo.py's
tiny_vgg11, lr 0.05: a non-finite loss within 5 steps, with skeleton_init paper or keep).

The groups are disjoint and every rule's selectors are facts (`kind`, `scale_invariant`,
`depthwise`), so each rule matches exactly the parameters its comment counts. pom (seed 001) and
spectral (seed 004) are never suggested: they constrain or regularise weights by choice, not because
of a fact the analysis proves (the `fgsgd` and `spectral` policies use them). Biases, norm parameters
and embeddings are left to the base optimizer. The text is the same for the same model and inputs (no
dates, no randomness): it can be committed and diffed.
"""
from __future__ import annotations

import re
import textwrap
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .analysis import Structure, analyze
from .analysis.coupling import g_chains
from .analysis.facts import KINDS, ParamFacts
from .errors import GeomCompileError
from .findings import Finding, group, mask, name_list
from .names import unwrap_model

WEIGHT_KINDS = ("conv", "conv_transpose", "linear")
MAX_CAUSES = 6          # reasons listed per rule comment; `geomcompile plan` shows every one


@dataclass(frozen=True)
class Group:
    """One suggested rule: the parameters it takes, its selectors, geometry and comment lines."""

    name: str
    description: str
    members: tuple[str, ...]
    match: dict
    use: str               # the `use:` block, YAML lines indented under the rule
    facts: tuple[str, ...]  # comment lines: the facts that justify the geometry
    commented: bool = False  # written commented out (an alternative the user may choose)


def _weight(f: ParamFacts) -> bool:
    return f.kind in WEIGHT_KINDS


def _kinds(members: list[ParamFacts]):
    present = [k for k in KINDS if any(f.kind == k for f in members)]
    return present[0] if len(present) == 1 else present


def _count_by_kind(members: list[ParamFacts]) -> str:
    counts = Counter(f.kind for f in members)
    return ", ".join(f"{counts[k]} {k}" for k in KINDS if counts[k])


def _normaliser_types(model: nn.Module, members: list[ParamFacts]) -> str:
    """'BatchNorm2d (14), LayerNorm (1)': the module types of the normalisations that absorb them."""
    modules = dict(model.named_modules())
    counts: Counter = Counter()
    for f in members:
        names = [n for n in re.split(r"[,+ ]+", f.scale_invariant.normalizer) if n]
        types = sorted({type(modules[n]).__name__ if n in modules else "a functional normalisation" for n in names})
        counts[" and ".join(types)] += 1
    return ", ".join(f"{t} ({n})" for t, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _units(members: list[ParamFacts]) -> str:
    counts = Counter(f.scale_invariant.unit for f in members)
    return ", ".join(f"{unit} {counts[unit]}" for unit in ("row", "group", "tensor") if counts[unit])


def _causes(members: list[ParamFacts], modules: set[str]) -> list[str]:
    """Why these weights are not scale-invariant, one line per cause (most common first); the
    reasons are compared without the module names they quote."""
    found = []
    for f in members:
        why = re.sub(r"^not invariant: ", "", f.invariance_reason or "no normalisation absorbs its scale")
        why = why.split(": ", 1)[1] if ": " in why else why        # drop the path 'a -> b -> c'
        why = _GENERIC_LIST.sub("", why)
        key = re.sub(r"[\w.]+", lambda m: "<name>" if m[0] in modules else m[0], mask(why))
        found.append(Finding(f"{f.name}: {why}", name=f.name, key=(key,), head="", tail=f": {why}"))
    lines = sorted(group(found), key=lambda line: -_count(line))
    more = len(lines) - MAX_CAUSES
    return lines[:MAX_CAUSES] + ([f"... and {more} more causes (`geomcompile plan` "
                                                             f"lists every weight's reason)"] if more > 0 else [])


# The list of what breaks a scaling that ends every "is not known to keep" reason: the same each time.
_GENERIC_LIST = re.compile(r" \(residual add, product of tensors.*\)$")


def _count(line: str) -> int:
    m = re.match(r"(\d+) parameters \(", line)
    return int(m[1]) if m else 1


def _comment(text: str, indent: str, width: int = 100) -> list[str]:
    """`text` as YAML comment lines of at most `width` characters (continuations indented 4 more)."""
    lead = len(text) - len(text.lstrip(" "))
    return [f"{indent}# {line}" for line in textwrap.wrap(text, width - len(indent) - 2, initial_indent=" " * lead,
                                                         subsequent_indent=" " * (lead + 4), break_on_hyphens=False)]


CHANNEL_DIRECTED = ("      channel_directed:\n"
                    "        metric: sobolev        # H1 along the output channels (h0: re-weighted H0)\n"
                    "        lam: 1.0               # smoothing strength > 0; larger = closer to the channel mean\n"
                    "        mix: 1.0               # adds mix * (plain gradient), keeping per-channel detail")


def _gspace_group(structure: Structure, params: list[ParamFacts]) -> Group | None:
    members = [f for f in params if f.g_coupled]
    if not members:
        return None
    chains = g_chains(structure)
    shown = [" -> ".join(n.removesuffix(".weight") for n in c) for c in chains[:3]]
    weights = sum(1 for f in members if f.kind != "bias")
    return Group(
        "gspace-chains", "G-SGD on every chain of coupled ReLU layers (weights and biases)",
        tuple(f.name for f in members), {"g_coupled": "true"},
        "      gspace:\n"
        "        # tangent: the first-order G-SGD direction written into .grad, for any optimizer; exact\n"
        "        # is the paper's step, for plain torch.optim.SGD without momentum or weight decay only.\n"
        "        step: tangent\n"
        "        # paper: every skeleton weight set to +1 at install (changes the function: a model\n"
        "        # trained from scratch, as in the shipped gsgd policy); keep: the weights untouched.\n"
        "        skeleton_init: paper",
        (f"{len(chains)} 𝒢-chain(s) of layers joined only by positively homogeneous ops (ReLU, pooling, "
         f"flatten), without a normalisation between them (analysis/coupling.py): "
         + "; ".join(shown) + (f"; ... and {len(chains) - 3} more" if len(chains) > 3 else ""),
         f"their {weights} weight(s) and {len(members) - weights} bias(es): rescaling a hidden unit's "
         f"incoming weights by c > 0 and its outgoing ones by 1/c leaves the function unchanged, the "
         f"symmetry G-SGD is invariant to (seed 002)",
         "a choice of recipe, so commented out: uncomment the rule to train these with G-SGD instead of "
         "the rules below (it comes first, so it takes them); measured on a plain 8-conv VGG, this "
         "tangent step diverged under SGD-momentum (lr 0.05) where channel_directed did not"),
        commented=True)


def _psi_group(model: nn.Module, params: list[ParamFacts]) -> Group | None:
    members = [f for f in params if _weight(f) and f.scale_invariant is not None and not f.depthwise]
    if not members:
        return None
    return Group(
        "psi-scale-invariant", "PSI on the weights a normalisation makes scale-invariant",
        tuple(f.name for f in members),
        {"kind": _kinds(members), "scale_invariant": "true", "depthwise": "false"},
        "      psi:\n"
        "        max_norm: 1.0e4        # a unit past this norm is rescaled to 1 after the step (function unchanged)",
        (f"scale-invariant through {_normaliser_types(model, members)}: {len(members)} weight(s) "
         f"({_count_by_kind(members)}); units: {_units(members)}",
         "the loss does not change when their units are rescaled, so PSI's Riemannian gradient "
         "(||w_u||^2 times the gradient, seed 003) applies; use SGD(-momentum) for them, and no weight decay "
         "(plan.param_groups)"))


def _depthwise_group(model: nn.Module, params: list[ParamFacts]) -> Group | None:
    members = [f for f in params if _weight(f) and f.scale_invariant is not None and f.depthwise]
    if not members:
        return None
    sizes = sorted({f.numel // f.shape[0] for f in members})
    return Group(
        "channel-directed-depthwise", "Sobolev channel-directed gradients on the depthwise convs",
        tuple(f.name for f in members),
        {"kind": _kinds(members), "scale_invariant": "true", "depthwise": "true"},
        CHANNEL_DIRECTED,
        (f"depthwise and scale-invariant through {_normaliser_types(model, members)}: {len(members)} weight(s)",
         f"each unit holds only {', '.join(map(str, sizes))} numbers, so psi's per-unit norm scaling is "
         f"noisy there (as in the shipped resnet and mobilenet policies): a metric that needs no invariance"))


def _channel_directed_group(model: nn.Module, params: list[ParamFacts]) -> Group | None:
    members = [f for f in params if _weight(f) and f.scale_invariant is None]
    if not members:
        return None
    return Group(
        "channel-directed", "Sobolev channel-directed gradients on the weights nothing makes scale-invariant",
        tuple(f.name for f in members),
        {"kind": _kinds(members), "scale_invariant": "false"}, CHANNEL_DIRECTED,
        (f"not scale-invariant: {len(members)} weight(s) ({_count_by_kind(members)}); "
         f"the analysis's reasons:", *(f"  {line}" for line in _causes(members, {n for n, _ in model.named_modules()})),
         "channel-directed gradients (seed 000) need no invariance"))


def suggest_groups(model: nn.Module, structure: Structure) -> list[Group]:
    """The suggested rules, in file order; the parameter sets of the active ones are disjoint."""
    params = list(structure.values())
    makers: list[Callable[[], Group | None]] = [
        lambda: _gspace_group(structure, params), lambda: _psi_group(model, params),
        lambda: _depthwise_group(model, params), lambda: _channel_directed_group(model, params)]
    return [g for g in (make() for make in makers) if g is not None]


def _selectors(match: dict) -> list[str]:
    out = []
    for key, value in match.items():
        text = f"[{', '.join(value)}]" if isinstance(value, list) else str(value)
        out.append(f"      {key}: {text}")
    return out


def _left_alone(structure: Structure, taken: set[str]) -> str:
    rest = [f for f in structure.values() if f.name not in taken]
    if not rest:
        return "Every parameter gets a geometry."
    counts = Counter(f.kind for f in rest)
    kinds = ", ".join(f"{counts[k]} {k}" for k in KINDS if counts[k])
    return (f"Left to the base optimizer: {len(rest)} parameter(s) ({kinds}), e.g. "
            f"{name_list([f.name for f in rest])}.")


def _rule_lines(g: Group) -> list[str]:
    """The rule as YAML lines, after its comment; a commented group's rule is commented out (each
    line's two-space indent becomes "  # ", so that removing "# " once restores it)."""
    lines = [line for fact in g.facts for line in _comment(fact, "  ")]
    lines += _comment(f"matches {len(g.members)} parameter(s): {name_list(list(g.members))}", "  ")
    rule = [f"  - name: {g.name}", f"    description: {g.description}", "    match:", *_selectors(g.match),
            "    use:", *g.use.splitlines()]
    return lines + ([f"  # {line[2:]}" for line in rule] if g.commented else rule) + [""]


def write_policy(model: nn.Module, structure: Structure, inputs_note: str) -> str:
    """The policy text for the analysed model (see the module docstring)."""
    model, _ = unwrap_model(model)          # the names and types the analysis saw
    name = type(model).__name__
    groups = suggest_groups(model, structure)
    active = [g for g in groups if not g.commented]
    if not active:
        raise GeomCompileError(
            f"geomcompile suggest: {name} has no conv, transposed-conv or linear weight, so no geometry applies "
            f"to any of its {len(structure)} parameters. Fix: suggest a policy for a model with such layers (a "
            f"functional layer needs example_inputs so that the analysis sees it)")
    capture = "torch.fx symbolic trace" if structure.capture_path == "fx" else "running the model once"
    header = [
        f"geomcompile policy suggested for {name} by `geomcompile suggest` from its analysis "
        f"({len(structure)} parameters, captured by {capture}; {inputs_note}).",
        "Each rule says which facts justify its geometry and how many parameters it matches; the active "
        "rules match disjoint sets. `validate: strict`: on a changed model a rule that no longer matches, "
        "or a geometry that no longer applies, is an error. See the assignments with `geomcompile plan "
        "MODULE:CALLABLE FILE`.",
        "Not suggested: pom (FG-SGD, the `fgsgd` policy) and spectral (the `spectral` policy) constrain or "
        "regularise weights by choice, not because of a fact of the analysis; add them by hand.",
        _left_alone(structure, {n for g in active for n in g.members}),
    ]
    lines = [line for paragraph in header for line in _comment(paragraph, "")]
    lines += ["", "version: 1", "validate: strict",
              f"description: suggested for {name} from its analysis ({len(active)} "
              f"rule{'s' if len(active) > 1 else ''})", "", "rules:"]
    for g in groups:
        lines += _rule_lines(g)
    return "\n".join(lines).rstrip() + "\n"


def _inputs_note(example_inputs) -> str:
    if example_inputs is None:
        return "no example inputs"
    tensors = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    shapes = ["x".join(map(str, t.shape)) for t in tensors if hasattr(t, "shape")]
    return f"example inputs of shape {', '.join(shapes)}" if shapes else "example inputs given"


def suggest_policy(model: nn.Module, example_inputs=None) -> str:
    """A policy (YAML text, with a comment per rule) for `model`, from its analysis facts. It
    validates in strict mode against the model: ``gc.plan(model, text, example_inputs)``. Pass
    `example_inputs` where ``gc.plan`` would need them (a model torch.fx cannot trace, shapes)."""
    return write_policy(model, analyze(model, example_inputs), _inputs_note(example_inputs))
