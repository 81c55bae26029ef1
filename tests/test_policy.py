"""The YAML policy language: validation errors (place + fix), selector semantics, precedence, loading.

Facts are built by hand so these tests do not depend on model analysis.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from geomcompile.analysis.facts import ParamFacts, ScaleInvariance, Structure
from geomcompile.errors import GeomCompileError
from geomcompile.geometries.base import REGISTRY, Geometry, register
from geomcompile.policy import Policy, Resolution, glob_to_regex, load_policy, shipped_policies

INV = ScaleInvariance("row", "bn", "BatchNorm follows")


def conv(name, cout=64, cin=64, k=3, invariant=True, depthwise=False, module=None, aliases=()):
    groups = cin if depthwise else 1
    return ParamFacts(name, (cout, cin // groups, k, k), kind="conv", out_dim=0, groups=groups,
                      depthwise=depthwise, scale_invariant=INV if invariant else None,
                      invariance_reason="" if invariant else "no normalisation follows it",
                      module=module or name.rpartition(".")[0], aliases=tuple(aliases))


def resnet_like() -> Structure:
    """A small ResNet-like set of facts: stem, two blocks, a depthwise conv, BN params, the head."""
    facts = [
        conv("conv1.weight", 64, 3, 7),
        ParamFacts("bn1.weight", (64,), kind="norm_weight", module="bn1"),
        ParamFacts("bn1.bias", (64,), kind="norm_bias", module="bn1"),
        conv("layer1.0.conv1.weight"),
        conv("layer1.0.conv2.weight"),
        conv("layer1.0.dw.weight", 64, 64, 3, depthwise=True),
        ParamFacts("layer1.0.bn1.weight", (64,), kind="norm_weight", module="layer1.0.bn1"),
        conv("layer2.0.conv1.weight", 128, 64),
        conv("layer2.0.downsample.0.weight", 128, 64, 1),
        conv("layer2.0.extra.weight", 128, 128, invariant=False),
        ParamFacts("fc.weight", (10, 128), kind="linear", out_dim=0, module="fc",
                   invariance_reason="no normalisation follows it"),
        ParamFacts("fc.bias", (10,), kind="bias", module="fc"),
    ]
    return Structure({f.name: f for f in facts}, capture_path="fx")


def policy_text(rules: str, header: str = "version: 1\n") -> str:
    return header + "rules:\n" + textwrap.indent(textwrap.dedent(rules), "  ")


def raises(text: str, *fragments: str, structure=None) -> str:
    """Load (and resolve, when a structure is given) and return the error message, checking fragments."""
    with pytest.raises(GeomCompileError) as info:
        policy = load_policy(text)
        if structure is not None:
            policy.resolve(structure)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


CONVS = "- name: convs\n  match: {kind: conv}\n  use: {channel_directed: {}}\n"


# ---- one test per error class -------------------------------------------------------------------
def test_unknown_top_level_key():
    raises("version: 1\nvalidat: warn\nrules:\n" + textwrap.indent(CONVS, "  "),
           "<string>:2:1", "unknown key 'validat'", "did you mean 'validate'", "Fix")


def test_unknown_rule_key():
    raises(policy_text("- name: convs\n  mach: {kind: conv}\n  use: {psi: {}}\n"),
           "<string>:4:5", "unknown key 'mach'", "did you mean 'match'")


@pytest.mark.parametrize("version", ["2", "'1'", "1.0"])
def test_bad_version(version):
    raises(policy_text(CONVS, f"version: {version}\n"), "<string>:1:10", "version", "Fix: write `version: 1`")


def test_missing_version():
    raises(policy_text(CONVS, ""), "<string>:1:1", "no `version`", "version: 1")


def test_bad_validate_value():
    raises(policy_text(CONVS, "version: 1\nvalidate: loose\n"), "<string>:2:11", "strict or warn", "'loose'")


def test_unknown_geometry_suggests_closest():
    raises(policy_text("- name: convs\n  match: {kind: conv}\n  use:\n    pis: {}\n"),
           "<string>:6:7", "unknown geometry 'pis'", "did you mean 'psi'", "channel_directed")


def test_unknown_option_suggests_closest():
    raises(policy_text("- name: convs\n  match: {kind: conv}\n  use:\n    channel_directed: {lamda: 2}\n"),
           "<string>:6:26", "unknown option 'lamda'", "did you mean 'lam'")


def test_wrong_option_type():
    raises(policy_text("- match: {kind: conv}\n  use:\n    channel_directed:\n      lam: high\n"),
           "<string>:6:14", "channel_directed.lam", "expected a number", "'high'")


def test_out_of_range_option():
    raises(policy_text("- match: {kind: conv}\n  use:\n    psi:\n      max_norm: -1\n"),
           "<string>:6:19", "psi.max_norm", "must be > 0")


def test_bad_choice_option():
    raises(policy_text("- match: {kind: conv}\n  use: {channel_directed: {metric: h2}}\n"),
           "<string>:4:38", "expected one of h0, sobolev")


def test_two_geometries_of_one_stage_in_a_rule():
    raises(policy_text("- name: both\n  match: {kind: conv}\n  use:\n    psi: {}\n    channel_directed: {}\n"),
           "<string>:7:7", "rule 'both' uses two metric-stage geometries", "psi and channel_directed")


def test_duplicate_rule_names():
    raises(policy_text(CONVS + CONVS.replace("channel_directed", "psi")),
           "<string>:6:11", "duplicate rule name 'convs'", "<string>:3:5")


def test_bad_selector_values():
    raises(policy_text("- match: {kind: [conv, lineer]}\n  use: {psi: {}}\n"),
           "<string>:3:19", "unknown kind 'lineer'", "did you mean 'linear'")
    raises(policy_text("- match: {min_numel: -3}\n  use: {psi: {}}\n"), "<string>:3:24", "integer >= 0")
    raises(policy_text("- match: {depthwise: 'no'}\n  use: {psi: {}}\n"), "<string>:3:24", "true or false")
    raises(policy_text("- match: {prama: x}\n  use: {psi: {}}\n"), "<string>:3:13", "did you mean 'param'")
    raises(policy_text("- match: {param: 're:('}\n  use: {psi: {}}\n"), "<string>:3:20", "regular expression")


def test_rule_matching_nothing_is_an_error_in_strict_mode():
    text = policy_text(CONVS + "- name: embeddings\n  match: {kind: embedding}\n  use: {channel_directed: {}}\n")
    raises(text, "<string>:6:5", "rule 'embeddings' matches no parameter", "validate: warn",
           structure=resnet_like())


def test_rule_matching_nothing_is_a_warning_in_warn_mode():
    text = policy_text(CONVS + "- name: embeddings\n  match: {kind: embedding}\n  use: {channel_directed: {}}\n",
                       "version: 1\nvalidate: warn\n")
    result = load_policy(text).resolve(resnet_like())
    assert len(result.warnings) == 1 and "<string>:7:5" in result.warnings[0]
    assert "'embeddings' matches no parameter" in result.warnings[0]
    assert result.rule_counts == {"convs": 7, "embeddings": 0}


def test_psi_on_a_non_invariant_parameter_quotes_the_reason():
    text = policy_text("- name: all-convs\n  match: {kind: conv}\n  use:\n    psi: {}\n")
    raises(text, "<string>:6:7", "rule 'all-convs' uses psi on conv1.weight", "cannot apply to",
           "no normalisation follows it", "scale_invariant: true", structure=Structure(
               {"conv1.weight": conv("conv1.weight", invariant=False)}, "fx"))


def test_inapplicable_geometry_that_a_later_rule_covers_falls_through_as_a_note():
    text = policy_text("- name: all-psi\n  match: {kind: conv}\n  use: {psi: {}}\n" + CONVS,
                       "version: 1\nvalidate: warn\n")
    result = load_policy(text).resolve(resnet_like())
    assert not any("layer2.0.extra.weight" in w for w in result.warnings)
    assert any("rule 'all-psi' leaves layer2.0.extra.weight to rule 'convs' for the metric stage" in n
               for n in result.notes)
    assert result.assignments["layer2.0.extra.weight"]["metric"].name == "channel_directed"
    assert result.rule_of[("layer2.0.extra.weight", "metric")] == "convs"
    assert result.rule_of[("layer1.0.conv1.weight", "metric")] == "all-psi"


@pytest.fixture
def manifold_geometry():
    """A test-only manifold-stage geometry that must not share a parameter with psi."""
    @register
    class NoPsi(Geometry):
        name = "test_nopsi"
        stage = "manifold"
        incompatible = ("psi",)
    yield NoPsi
    del REGISTRY["test_nopsi"]


def test_incompatible_geometries(manifold_geometry):
    text = policy_text("- name: p\n  match: {kind: conv, scale_invariant: true}\n  use: {psi: {}}\n"
                       "- name: m\n  match: {param: layer1.**}\n  use:\n    test_nopsi: {}\n",
                       "version: 1\nvalidate: warn\n")
    raises(text, "layer1.0.conv1.weight gets psi from rule 'p' (<string>:6:11)",
           "test_nopsi from rule 'm' (<string>:10:7)", "incompatible", "exclude", structure=resnet_like())


def test_yaml_syntax_error():
    raises("version: 1\nrules:\n  - name: x\n   match: {kind: conv\n", "<string>:4:", "YAML syntax error")
    raises(policy_text("- match: {param: *.weight}\n  use: {psi: {}}\n"), "<string>:3:", "quote")


def test_duplicate_yaml_key():
    raises(policy_text("- match: {kind: conv, kind: linear}\n  use: {psi: {}}\n"), "<string>:3:25",
           "duplicate key 'kind'")


def test_dict_source_positions():
    src = {"version": 1, "rules": [{"match": {"kind": "conv"}, "use": {"psi": {"max_norm": 0}}}]}
    raises(src, "<dict>:rules[0].use.psi.max_norm", "must be > 0")
    raises({"version": 1, "rules": []}, "<dict>:rules", "non-empty list")


# ---- selector semantics ---------------------------------------------------------------------
@pytest.mark.parametrize("pattern, name, expected", [
    ("layer*.**.weight", "layer1.0.conv1.weight", True),
    ("layer*.**.weight", "layer1.weight", True),
    ("layer*.**.weight", "layer1.0.conv1.bias", False),
    ("layer*.**.weight", "conv1.weight", False),
    ("*.weight", "fc.weight", True),
    ("*.weight", "layer1.0.conv1.weight", False),      # * never crosses a dot
    ("**.weight", "layer1.0.conv1.weight", True),
    ("**.weight", "weight", True),
    ("layer1.**", "layer1", True),
    ("layer1.**", "layer1.0.conv1.weight", True),
    ("layer1.**", "layer10.weight", False),
    ("**", "anything.at.all", True),
    ("layer?.0.*", "layer2.0.conv1", True),
    ("layer?.0.*", "layer12.0.conv1", False),
    ("weight", "fc.weight", False),                     # whole-name match
    ("fc.w*t", "fc.weight", True),
])
def test_glob(pattern, name, expected):
    import re
    assert bool(re.fullmatch(glob_to_regex(pattern), name)) is expected


def selected(match: str, structure=None) -> set[str]:
    policy = load_policy(policy_text(f"- match: {match}\n  use: {{channel_directed: {{}}}}\n",
                                     "version: 1\nvalidate: warn\n"))
    return {name for name, facts in (structure or resnet_like()).items() if policy.rules[0].matches(facts)}


def test_selectors():
    assert selected("{param: 're:layer\\d\\.0\\.conv\\d\\.weight'}") == {
        "layer1.0.conv1.weight", "layer1.0.conv2.weight", "layer2.0.conv1.weight"}
    assert selected("{param: 're:conv1'}") == set()                          # regex is a fullmatch
    assert selected("{param: [conv1.weight, fc.*]}") == {"conv1.weight", "fc.weight", "fc.bias"}
    assert selected("{module: 'layer2.**', kind: conv, scale_invariant: false}") == {"layer2.0.extra.weight"}
    assert selected("{kind: conv, depthwise: true}") == {"layer1.0.dw.weight"}
    assert selected("{kind: [linear, bias]}") == {"fc.weight", "fc.bias"}
    assert selected("{min_numel: 20000, max_numel: 40000}") == {"layer1.0.conv1.weight", "layer1.0.conv2.weight"}
    assert selected("{ndim: 1, param: 'bn1.*'}") == {"bn1.weight", "bn1.bias"}
    assert len(selected("{}")) == len(resnet_like())


def test_shared_parameter_matches_by_alias():
    tied = ParamFacts("embed.weight", (100, 16), kind="embedding", module="embed",
                      aliases=("decoder.weight",))
    structure = Structure({"embed.weight": tied}, "fx")
    assert selected("{param: decoder.weight}", structure) == {"embed.weight"}
    assert selected("{module: decoder}", structure) == {"embed.weight"}
    assert selected("{module: encoder}", structure) == set()


def test_module_none_never_matches():
    structure = Structure({"w": ParamFacts("w", (3, 3), module=None)}, "run")
    assert selected("{module: '**'}", structure) == set()


def test_exclusion_wins():
    result = load_policy(policy_text(
        "- name: bn-convs\n  match: {param: 'layer*.**.weight', kind: conv}\n"
        "  exclude: {param: 'layer1.0.conv1.weight'}\n  use: {channel_directed: {}}\n")).resolve(resnet_like())
    assert "layer1.0.conv1.weight" not in result.assignments
    assert "layer1.0.conv2.weight" in result.assignments
    assert result.rule_counts == {"bn-convs": 5}


def test_first_rule_per_stage_wins_across_stages(manifold_geometry):
    text = policy_text("""\
        - name: psi-convs
          match: {kind: conv, scale_invariant: true, depthwise: false}
          use: {psi: {max_norm: 1.0e3}}
        - name: layer2-manifold-and-metric
          match: {param: 'layer2.**'}
          exclude: {scale_invariant: true}
          use: {test_nopsi: {}, channel_directed: {lam: 2}}
        - name: rest
          match: {kind: [conv, linear]}
          use: {channel_directed: {metric: h0}}
        """, "version: 1\nvalidate: warn\n")
    policy = load_policy(text)
    result = policy.resolve(resnet_like())
    assert isinstance(result, Resolution)
    # layer2.0.extra: not invariant, so psi's rule does not match; rule 2 gives manifold and metric
    assert {s: g.name for s, g in result.assignments["layer2.0.extra.weight"].items()} == {
        "metric": "channel_directed", "manifold": "test_nopsi"}
    assert result.assignments["layer2.0.extra.weight"]["metric"].opts["lam"] == 2.0
    # layer1 convs: psi from rule 1; rule 3 is shadowed for the metric stage
    assert result.rule_of[("layer1.0.conv1.weight", "metric")] == "psi-convs"
    assert result.assignments["layer1.0.conv1.weight"]["metric"].opts["max_norm"] == 1000.0
    assert result.rule_of[("layer1.0.dw.weight", "metric")] == "rest"
    assert result.rule_of[("fc.weight", "metric")] == "rest"
    assert "bn1.weight" not in result.assignments and "fc.bias" not in result.assignments
    assert list(result.assignments) == [n for n in resnet_like() if n in result.assignments]  # structure order
    assert result.rule_counts == {"psi-convs": 5, "layer2-manifold-and-metric": 1, "rest": 8}
    # a parameter that gets psi AND test_nopsi is an error in both modes
    with pytest.raises(GeomCompileError, match="incompatible"):
        load_policy(text.replace("exclude: {scale_invariant: true}",
                                 "exclude: {param: 'layer2.0.extra.weight'}")).resolve(resnet_like())


# ---- loading --------------------------------------------------------------------------------
def test_shipped_policies_are_listed_and_load_by_name():
    assert {"resnet", "plain"} <= set(shipped_policies())
    policy = load_policy("resnet")
    assert policy.version == 1 and policy.validate == "warn" and policy.source.endswith("resnet.yaml")
    assert load_policy(policy) is policy
    with pytest.raises(GeomCompileError, match="plain, resnet|did you mean 'resnet'"):
        load_policy("resnett")


def test_load_by_path_string_and_dict(tmp_path):
    text = policy_text(CONVS, "version: 1\nvalidate: warn\n")
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    from_path, from_str = load_policy(path), load_policy(str(path))
    assert from_path.source == from_str.source == str(path)
    from_text = load_policy(text)
    assert from_text.source == "<string>"
    from_dict = load_policy({"version": 1, "validate": "warn",
                             "rules": [{"name": "convs", "match": {"kind": "conv"}, "use": {"channel_directed": None}}]})
    assert from_dict.source == "<dict>"
    assert [r.name for r in from_path.rules] == [r.name for r in from_dict.rules] == ["convs"]
    assert from_path.rules[0].use == from_dict.rules[0].use
    assert from_path.rules[0].where == f"{path}:4:5"
    assert from_dict.rules[0].where == "<dict>:rules[0]"
    with pytest.raises(GeomCompileError, match="not found"):
        load_policy(str(tmp_path / "missing.yaml"))


def test_default_rule_names_and_describe():
    policy = load_policy(policy_text("- match: {kind: conv}\n  use: {psi: {}}\n- match: {kind: linear}\n"
                                     "  use: {channel_directed: {}}\n"))
    assert [r.name for r in policy.rules] == ["rule1", "rule2"]
    assert policy.validate == "strict"
    lines = policy.describe().splitlines()
    assert len(lines) == 3 and "rule1: match {kind: conv} -> psi(max_norm=10000.0)" in lines[1]
    assert "rule1" in repr(policy) and "<string>" in repr(policy)


def test_shipped_resnet_policy_on_a_resnet_like_model():
    result = load_policy("resnet").resolve(resnet_like())
    names = {p: {s: g.name for s, g in stages.items()} for p, stages in result.assignments.items()}
    for p in ["conv1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight"]:
        assert names[p] == {"metric": "psi"}
    for p in ["layer1.0.dw.weight", "layer2.0.extra.weight", "fc.weight"]:
        assert names[p] == {"metric": "channel_directed"}
    assert not any(p.startswith("bn") or p.endswith("bias") for p in names)
    assert result.warnings == []
    assert all(n > 0 for n in result.rule_counts.values())


def test_shipped_plain_policy():
    result = load_policy("plain").resolve(resnet_like())
    kinds = {p: resnet_like()[p].kind for p in result.assignments}
    assert set(kinds.values()) == {"conv", "linear"}
    assert all(stages["metric"].name == "channel_directed" for stages in result.assignments.values())
    mlp = Structure({"fc.weight": ParamFacts("fc.weight", (10, 5), kind="linear", out_dim=0, module="fc")}, "fx")
    result = load_policy("plain").resolve(mlp)      # no convs: the optional conv rule is a note
    assert result.warnings == []
    assert any("channel-directed-convs" in n and "optional" in n for n in result.notes)


def test_every_shipped_policy_validates():
    for name in shipped_policies():
        policy = load_policy(name)
        assert policy.rules and policy.describe()
        policy.resolve(resnet_like())


# ---- option combinations that defeat their purpose (Geometry.config_warnings) -----------------------
CONFIG_WARNINGS = textwrap.dedent("""\
    version: 1
    validate: warn
    rules:
      - name: h0-identity
        match: {kind: conv, depthwise: true}
        use:
          channel_directed: {metric: h0, lam: 1, mix: 0}
      - name: tiny-max-norm
        match: {kind: conv, scale_invariant: true}
        use: {psi: {max_norm: 0.5}}
      - name: unit-max-norm
        match: {param: "layer2.**"}
        use:
          psi:
            max_norm: 1
      - name: fine
        match: {kind: linear}
        use: {channel_directed: {metric: h0, lam: 0.5}}
    """)


def test_config_warnings_carry_the_use_entrys_position(tmp_path):
    from geomcompile.errors import GeomCompileWarning
    path = tmp_path / "combos.yaml"
    path.write_text(CONFIG_WARNINGS)
    with pytest.warns(GeomCompileWarning) as record:
        policy = load_policy(path)
    messages = [str(w.message) for w in record if issubclass(w.category, GeomCompileWarning)]
    assert len(messages) == 3, messages                       # exactly one per offending use entry
    h0, tiny, unit = messages
    assert h0.startswith(f"{path}:7:7: rule 'h0-identity': channel_directed: identical to plain SGD")
    assert "set lam != 1 (e.g. 0.5) or use metric: sobolev" in h0
    assert tiny.startswith(f"{path}:10:11: rule 'tiny-max-norm': psi: max_norm = 0.5: units are "
                           f"renormalised to norm 1, which is above max_norm")
    assert "every unit is renormalised at every step" in tiny and "the default is 1e4" in tiny
    assert unit.startswith(f"{path}:14:7: rule 'unit-max-norm': psi: max_norm = 1") and "max_norm > 1" in unit
    assert policy.config_warnings == messages
    # listed in every resolution's warnings, once each (not once per matched parameter)
    for _ in range(2):
        result = policy.resolve(resnet_like())
        assert [w for w in result.warnings if w in messages] == messages


def test_config_warnings_reach_the_plan(tmp_path):
    import warnings as _warnings
    import geomcompile as gc
    from geomcompile.models import small_resnet
    path = tmp_path / "h0.yaml"
    path.write_text(policy_text("- name: convs\n  match: {kind: conv}\n  use:\n    channel_directed: {metric: h0}\n"))
    with _warnings.catch_warnings(record=True) as record:
        _warnings.simplefilter("always")
        plan = gc.plan(small_resnet(), path)
    assert sum("identical to plain SGD" in str(w.message) for w in record) == 1
    assert plan.warnings == [f"{path}:6:7: rule 'convs': channel_directed: identical to plain SGD: re-weighted "
                             f"H0 with lam = 1 leaves the gradient unchanged; set lam != 1 (e.g. 0.5) or use "
                             f"metric: sobolev"]
    assert f"warning: {plan.warnings[0]}" in plan.summary()


@pytest.mark.parametrize("use", ["channel_directed: {}", "channel_directed: {metric: h0, lam: 0.5}",
                                 "channel_directed: {metric: h0, mix: 1}", "channel_directed: {lam: 1}",
                                 "psi: {}", "psi: {max_norm: 1.5}", "spectral: {}", "pom: {}"])
def test_no_config_warning_for_sensible_options(use):
    import warnings as _warnings
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        policy = load_policy(policy_text(f"- match: {{kind: conv}}\n  use: {{{use}}}\n"))
    assert policy.config_warnings == []


def test_every_geometry_has_no_config_warning_by_default():
    for name, cls in REGISTRY.items():
        assert cls().config_warnings() == [], name
