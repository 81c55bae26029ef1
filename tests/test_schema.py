"""`geomcompile schema` (issue 13): a JSON Schema (draft 2020-12) of the policy language generated
from the registry; the shipped policies validate against it and name it; schema and strict
validation agree on bad policies, except where the schema module says they cannot."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import jsonschema
import pytest
import yaml

import geomcompile as gc
import geomcompile.cli as cli
from geomcompile.geometries import REGISTRY
from geomcompile.geometries.base import Option, bounded
from geomcompile.policy import SELECTORS, _Loader, shipped_policies
from geomcompile.schema import DIALECT, SCHEMA_FILE, policy_schema

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "policies"
VALIDATOR = jsonschema.Draft202012Validator(policy_schema())


def _schema_errors(text: str) -> list[str]:
    return [e.message for e in VALIDATOR.iter_errors(yaml.load(text, Loader=_Loader))]


def _strict_error(text: str) -> str | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        try:
            gc.load_policy(text)
        except gc.GeomCompileError as e:
            return str(e)
    return None


def test_the_schema_is_a_valid_2020_12_schema_naming_every_geometry_option_and_selector():
    schema = policy_schema()
    assert schema["$schema"] == DIALECT
    jsonschema.Draft202012Validator.check_schema(schema)
    for name, cls in REGISTRY.items():
        geometry = schema["$defs"][f"geometry_{name}"]
        assert geometry["description"].startswith(f"{cls.stage}-stage geometry: ")
        assert set(geometry["properties"]) == set(cls.options)
        for key, spec in cls.options.items():
            option = geometry["properties"][key]
            assert option["default"] == spec.default and option["description"] == spec.doc
            if spec.choices:
                assert option["enum"] == list(spec.choices)
    assert set(schema["$defs"]["selectors"]["properties"]) == set(SELECTORS)
    assert schema["$defs"]["geometry_psi"]["properties"]["max_norm"]["exclusiveMinimum"] == 0
    assert schema["$defs"]["geometry_channel_directed"]["properties"]["mix"]["minimum"] == 0


def test_the_shipped_schema_file_is_the_generated_one_and_the_cli_prints_it(capsys):
    assert cli.main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == policy_schema()
    shipped = json.loads((POLICIES / SCHEMA_FILE).read_text())
    assert shipped == printed, (f"policies/{SCHEMA_FILE} is out of date; regenerate it with "
                                f"`geomcompile schema > policies/{SCHEMA_FILE}`")


@pytest.mark.parametrize("name", shipped_policies())
def test_every_shipped_policy_names_the_schema_and_validates(name):
    text = (POLICIES / f"{name}.yaml").read_text()
    assert text.splitlines()[0] == f"# yaml-language-server: $schema={SCHEMA_FILE}"
    assert _schema_errors(text) == [] and _strict_error(text) is None


GOOD = """\
version: 1
validate: warn
description: a test
rules:
  - name: convs
    optional: true
    match: {kind: [conv, linear], param: ["layer*.**", "re:.*"], min_numel: 4, scale_invariant: true}
    exclude: {module: head}
    use: {psi: {max_norm: 100}, spectral: {input_size: [8, 8], coef: 0}}
  - match: {}
    use: {pom: {radius: 0.5, std_momentum: 0.0}, channel_directed: null}
"""

RULE = "version: 1\nrules:\n  - name: r\n    match: {kind: conv}\n    use: {psi: {}}\n"

BAD = {
    "no version": "rules:\n  - {match: {}, use: {psi: {}}}\n",
    "version 2": RULE.replace("version: 1", "version: 2"),
    "unknown top key": RULE + "extra: 1\n",
    "validate typo": RULE + "validate: strikt\n",
    "empty rules": "version: 1\nrules: []\n",
    "unknown rule key": RULE.replace("    match:", "    mtach: {}\n    match:"),
    "no use": "version: 1\nrules:\n  - {name: r, match: {}}\n",
    "no match": "version: 1\nrules:\n  - {name: r, use: {psi: {}}}\n",
    "empty name": RULE.replace("name: r", "name: ''"),
    "optional not bool": RULE.replace("    match:", "    optional: yes please\n    match:"),
    "unknown selector": RULE.replace("{kind: conv}", "{knd: conv}"),
    "unknown kind": RULE.replace("{kind: conv}", "{kind: convolution}"),
    "empty kind list": RULE.replace("{kind: conv}", "{kind: []}"),
    "flag not bool": RULE.replace("{kind: conv}", "{scale_invariant: 1}"),
    "negative count": RULE.replace("{kind: conv}", "{min_numel: -1}"),
    "empty pattern": RULE.replace("{kind: conv}", "{param: ''}"),
    "empty exclude": RULE.replace("    use:", "    exclude: {}\n    use:"),
    "match not a mapping": RULE.replace("{kind: conv}", "[conv]"),
    "empty use": RULE.replace("{psi: {}}", "{}"),
    "unknown geometry": RULE.replace("{psi: {}}", "{psy: {}}"),
    "two metric geometries": RULE.replace("{psi: {}}", "{psi: {}, channel_directed: {}}"),
    "unknown option": RULE.replace("{psi: {}}", "{psi: {max_nrm: 2}}"),
    "option wrong type": RULE.replace("{psi: {}}", "{psi: {max_norm: big}}"),
    "option bool for number": RULE.replace("{psi: {}}", "{psi: {max_norm: true}}"),
    "option out of range": RULE.replace("{psi: {}}", "{psi: {max_norm: 0}}"),
    "negative mix": RULE.replace("{psi: {}}", "{channel_directed: {mix: -0.5}}"),
    "bad choice": RULE.replace("{psi: {}}", "{channel_directed: {metric: h2}}"),
    "momentum at 1": RULE.replace("{psi: {}}", "{pom: {std_momentum: 1.0}}"),
    "radius word": RULE.replace("{psi: {}}", "{pom: {radius: huge}}"),
    "radius negative": RULE.replace("{psi: {}}", "{pom: {radius: -1.0}}"),
    "input size zero": RULE.replace("{psi: {}}", "{spectral: {input_size: [0, 8]}}"),
    "input size word": RULE.replace("{psi: {}}", "{spectral: {input_size: small}}"),
    "options not a mapping": RULE.replace("{psi: {}}", "{psi: [1]}"),
}

# What a JSON Schema cannot express (geomcompile/schema.py says so): strict validation refuses these,
# the schema accepts them. Pinned, so the documentation stays true.
SCHEMA_CANNOT = {
    "duplicate rule names": "version: 1\nrules:\n  - {name: r, match: {}, use: {psi: {}}}\n"
                            "  - {name: r, match: {}, use: {spectral: {}}}\n",
    "regex that does not compile": RULE.replace("{kind: conv}", "{param: 're:('}"),
    "integer written as 2.0": RULE.replace("{psi: {}}", "{spectral: {power_iters: 2.0}}"),
    "version 1.0": RULE.replace("version: 1", "version: 1.0"),
}


def test_a_good_policy_passes_both():
    assert _schema_errors(GOOD) == [] and _strict_error(GOOD) is None


@pytest.mark.parametrize("case", list(BAD))
def test_schema_and_strict_validation_both_refuse(case):
    text = BAD[case]
    assert _strict_error(text) is not None, f"strict validation accepted {case!r}"
    assert _schema_errors(text), f"the schema accepted {case!r}"


@pytest.mark.parametrize("case", list(SCHEMA_CANNOT))
def test_what_only_strict_validation_refuses(case):
    assert _strict_error(SCHEMA_CANNOT[case]) is not None and _schema_errors(SCHEMA_CANNOT[case]) == []


def test_an_options_schema_bounds_are_enforced_by_strict_validation_too():
    spec = Option(float, 0.5, "a fraction", schema={"minimum": 0, "maximum": 1})
    assert spec.validate(0.5) is None and spec.validate(1.5) == "must be <= 1, got 1.5"
    assert spec.schema_fragment() == {"minimum": 0, "maximum": 1}
    check = bounded(exclusiveMinimum=0)
    assert check(0) == "must be > 0, got 0" and check(1) is None and check.schema == {"exclusiveMinimum": 0}
    assert Option(int, 1, check=check).schema_fragment() == {"exclusiveMinimum": 0}
