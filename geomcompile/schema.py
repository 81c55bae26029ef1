"""The policy language as a JSON Schema (draft 2020-12), generated from the geometry registry and
the policy module's keys, so editors complete and check policies (``geomcompile schema``).

    geomcompile schema > policy.schema.json
    # first line of a policy:  # yaml-language-server: $schema=policy.schema.json

Every geometry, option (type, choices, range, default, doc line), selector and rule key is in it.
What a schema cannot say, strict validation (``gc.load_policy``) still checks:

* duplicate rule names, and regular expressions (``re:...``) that do not compile;
* an integer written with a decimal point (``power_iters: 2.0``, ``version: 1.0``): JSON Schema
  counts 2.0 as an integer, geomcompile asks for ``2``;
* range checks of options whose ``check`` has no schema fragment (``Option.schema``).
Everything that depends on the model (a rule matching nothing, a geometry that cannot apply) is
outside both.
"""
from __future__ import annotations

import sys
from itertools import combinations

from .analysis.facts import KINDS
from .geometries.base import REGISTRY, STAGES, Option
from .policy import MODES, RULE_KEYS, SELECTORS, TOP_KEYS

DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_FILE = "policy.schema.json"

_JSON_TYPES = {float: "number", int: "integer", str: "string", bool: "boolean", list: "array", dict: "object"}

_PATTERNS = {"anyOf": [{"type": "string", "minLength": 1},
                       {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}]}
_COUNT = {"type": "integer", "minimum": 0}

# One schema per selector of policy.SELECTORS (policy_schema refuses a selector without one).
SELECTOR_SCHEMAS = {
    "param": {**_PATTERNS, "description": "parameter name globs (* within a dotted component, ** any number of "
                                          "components, ? one character) or \"re:...\" regexes; canonical names"},
    "module": {**_PATTERNS, "description": "name globs of the module that uses the parameter"},
    "kind": {"anyOf": [{"enum": list(KINDS)}, {"type": "array", "minItems": 1, "items": {"enum": list(KINDS)}}],
             "description": "what the analysis found the parameter to be"},
    "scale_invariant": {"type": "boolean", "description": "the loss is invariant to scaling the weight's units "
                                                          "(a normalisation absorbs it)"},
    "depthwise": {"type": "boolean", "description": "a depthwise convolution weight"},
    "g_coupled": {"type": "boolean", "description": "the weight (or its bias) is in a G-chain: coupled with the next or "
                                                   "previous layer by a positive rescaling symmetry (gspace)"},
    "min_numel": {**_COUNT, "description": "at least this many elements"},
    "max_numel": {**_COUNT, "description": "at most this many elements"},
    "ndim": {**_COUNT, "description": "exactly this many dimensions"},
}


def option_schema(spec: Option) -> dict:
    types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
    names = sorted({_JSON_TYPES[t] for t in types})
    if "number" in names and "integer" in names:
        names.remove("integer")                      # a JSON number includes the integers
    out = {"type": names[0] if len(names) == 1 else names, "description": spec.doc, "default": spec.default}
    if spec.choices is not None:
        out["enum"] = list(spec.choices)
    out.update(spec.schema_fragment())
    return out


def _doc_line(cls) -> str:
    module = sys.modules.get(cls.__module__)
    text = (cls.__doc__ or (module.__doc__ if module else "") or "").strip()
    return text.splitlines()[0] if text else cls.name


def geometry_schema(cls) -> dict:
    return {"type": ["object", "null"], "additionalProperties": False,
            "description": f"{cls.stage}-stage geometry: {_doc_line(cls)} (null or {{}}: the defaults)",
            "properties": {key: option_schema(spec) for key, spec in cls.options.items()}}


def policy_schema() -> dict:
    """The JSON Schema of a version-1 policy document."""
    missing = set(SELECTORS) - set(SELECTOR_SCHEMAS)
    if missing:
        raise RuntimeError(f"selectors without a schema in geomcompile/schema.py: {sorted(missing)}")
    geometries = sorted(REGISTRY)
    same_stage = [{"not": {"required": [a, b]}}
                  for stage in STAGES
                  for a, b in combinations([n for n in geometries if REGISTRY[n].stage == stage], 2)]
    use = {"type": "object", "minProperties": 1, "additionalProperties": False,
           "description": "geometry name -> its options; at most one geometry per stage (" + ", ".join(STAGES) + ")",
           "properties": {name: {"$ref": f"#/$defs/geometry_{name}"} for name in geometries}}
    if same_stage:
        use["allOf"] = same_stage
    rule_properties = {
        "name": {"type": "string", "minLength": 1, "description": "unique within the policy (default rule<N>)"},
        "description": {"description": "free text"},
        "optional": {"type": "boolean", "default": False,
                     "description": "matching no parameter of a model is expected (a note, not a problem)"},
        "match": {"$ref": "#/$defs/selectors", "description": "every selector given must hold ({} matches all)"},
        "exclude": {"$ref": "#/$defs/selectors", "minProperties": 1,
                    "description": "parameters for which every selector holds are left out (exclusion wins)"},
        "use": use,
    }
    top_properties = {
        "version": {"const": 1, "description": "policy language version; 1 is the only one so far"},
        "validate": {"enum": list(MODES), "default": "strict",
                     "description": "strict: model-dependent problems are errors; warn: warnings"},
        "description": {"description": "free text"},
        "rules": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/rule"},
                  "description": "tried in file order; for each stage the first matching rule wins"},
    }
    if set(rule_properties) != set(RULE_KEYS) or set(top_properties) != set(TOP_KEYS):
        raise RuntimeError("the rule or top-level keys of policy.py and geomcompile/schema.py differ")
    return {
        "$schema": DIALECT,
        "title": "geomcompile policy",
        "description": "Which geometry each parameter gets (geomcompile.policy). Generated by `geomcompile schema`.",
        "type": "object",
        "required": ["version", "rules"],
        "additionalProperties": False,
        "properties": top_properties,
        "$defs": {
            "rule": {"type": "object", "required": ["match", "use"], "additionalProperties": False,
                     "properties": rule_properties},
            "selectors": {"type": "object", "additionalProperties": False, "properties": dict(SELECTOR_SCHEMAS)},
            **{f"geometry_{name}": geometry_schema(REGISTRY[name]) for name in geometries},
        },
    }
