"""`plan.save(path)` / `gc.load_plan(path, model)` (issue 13): the record, the round trip, and the
refusals when the model no longer fits."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import geomcompile as gc
from geomcompile.plan_io import PLAN_FILE, plan_record

from .frameworks import PSI, TinyBNNet, assert_params_equal, example_images, image_batches, scale_rows_to_norm, \
    train_plain


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = TinyBNNet(**kwargs)
    for conv in (model.conv1, model.conv2):
        scale_rows_to_norm(conv.weight, 1.99)        # psi (max_norm 2) renormalises within a few steps
    return model


def test_the_file_records_version_policy_text_and_hash_capture_fingerprint_and_assignments(tmp_path):
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text("version: 1\nrules:\n  - name: bn-convs\n    match: {kind: conv, scale_invariant: true}\n"
                           "    use: {psi: {max_norm: 2.0}}\n")
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plan = gc.apply(model, str(policy_file), opt, example_inputs=example_images())
    path = plan.save(tmp_path)
    assert path == tmp_path / PLAN_FILE
    record = json.loads(path.read_text())
    assert record["geomcompile_version"] == gc.__version__ and record["format"] == 1
    assert record["policy"]["text"] == policy_file.read_text()
    import hashlib
    assert record["policy"]["sha256"] == hashlib.sha256(policy_file.read_bytes()).hexdigest()
    assert record["capture_path"] == "fx"
    # the fingerprint is the one the optimizer state carries
    entries = [s["geomcompile"] for s in opt.state_dict()["state"].values() if "geomcompile" in s]
    assert entries and {e["plan"] for e in entries} == {record["fingerprint"]}
    conv = record["parameters"]["conv1.weight"]
    assert conv["shape"] == [6, 1, 3, 3] and conv["kind"] == "conv"
    assert conv["geometries"] == {"metric": {"geometry": "psi", "options": {"max_norm": 2.0},
                                             "label": "psi(max_norm=2.0)", "rule": "bn-convs"}}
    assert record["parameters"]["head.weight"]["geometries"] == {}
    assert set(record["parameters"]) == {n for n, _ in model.named_parameters()}


def test_a_dict_policy_is_recorded_as_yaml_that_loads_to_the_same_policy(tmp_path):
    plan = gc.plan(_model(), PSI, example_inputs=example_images())
    record = json.loads(plan.save(tmp_path / "x.json").read_text())
    again = gc.load_policy(record["policy"]["text"])
    assert [(r.name, r.match, r.use) for r in again.rules] == [(r.name, r.match, r.use) for r in plan.policy.rules]


def test_round_trip_binds_the_saved_plan_and_resumes_bit_identically(tmp_path):
    batches = image_batches(6)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    plan = gc.apply(model, PSI, opt, example_inputs=example_images())
    train_plain(model, opt, batches[:3])
    plan.save(tmp_path)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train_plain(model, opt, batches[3:])

    resumed = _model(seed=1)
    resumed.load_state_dict(saved_model)
    loaded = gc.load_plan(tmp_path, resumed, example_inputs=example_images())
    assert plan_record(loaded)["parameters"] == plan_record(plan)["parameters"]
    assert plan_record(loaded)["fingerprint"] == plan_record(plan)["fingerprint"]
    assert not loaded.installed and any("plan loaded from" in n for n in loaded.notes)
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.5, momentum=0.9)
    loaded.install(opt2)
    opt2.load_state_dict(saved_opt)                  # the fingerprint matches: the state loads
    train_plain(resumed, opt2, batches[3:])
    assert_params_equal(resumed, model, "load_plan + resume vs uninterrupted")
    assert sum(v["psi"]["renormalised_units"] for v in plan.diagnostics().values()) > 0


def test_the_saved_assignments_win_over_a_policy_that_changed_since(tmp_path):
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text(json.dumps(PSI))          # JSON is YAML
    gc.plan(_model(), str(policy_file), example_inputs=example_images()).save(tmp_path)
    policy_file.write_text(json.dumps({**PSI, "rules": [{**PSI["rules"][0], "use": {"psi": {"max_norm": 7.0}}}]}))
    loaded = gc.load_plan(tmp_path / PLAN_FILE, _model(), example_inputs=example_images())
    assert loaded.assignments["conv1.weight"]["metric"].label() == "psi(max_norm=2.0)"
    assert gc.plan(_model(), str(policy_file)).assignments["conv1.weight"]["metric"].label() == "psi(max_norm=7.0)"


class ResidualNet(TinyBNNet):
    """Same parameter names and shapes as TinyBNNet, but conv2's output also skips past bn2, so
    conv2.weight is no longer scale-invariant."""

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        h = self.conv2(x)
        x = torch.relu(self.bn2(h) + h)
        return self.head(x.mean((2, 3)))


class Renamed(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = TinyBNNet()

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("other, expected", [
    (lambda: _model(channels=5), ["conv1.weight: shape 6x1x3x3 in the saved plan, 5x1x3x3 here",
                                  "head.weight: shape 4x6 in the saved plan, 4x5 here"]),
    (ResidualNet, ["conv2.weight: structure 'out_dim=0 invariant[row] by bn2' in the saved plan, 'out_dim=0' here",
                   "conv2.weight: psi no longer applies: psi needs a scale-invariant weight"]),
    (Renamed, ["8 saved parameter(s) are not in the model: conv1.weight",
               "8 model parameter(s) are not in the saved plan: body.conv1.weight"]),
], ids=["other-width", "lost-invariance", "renamed"])
def test_a_model_that_no_longer_fits_is_refused_with_what_differs(tmp_path, other, expected):
    gc.plan(_model(), PSI, example_inputs=example_images()).save(tmp_path)
    gc.load_plan(tmp_path, _model(seed=3), example_inputs=example_images())     # control: the same model binds
    with pytest.raises(gc.GeomCompileError, match="the saved plan does not fit this model") as info:
        gc.load_plan(tmp_path, other(), example_inputs=example_images())
    for line in expected:
        assert line in str(info.value), str(info.value)
    assert "Fix:" in str(info.value)


def test_a_wrapped_model_binds_by_canonical_name(tmp_path):
    gc.plan(_model(), PSI, example_inputs=example_images()).save(tmp_path)
    wrapped = nn.DataParallel(_model())               # names gain `module.`; canonical names do not
    loaded = gc.load_plan(tmp_path, wrapped, example_inputs=example_images())
    assert set(loaded.assignments) == {"conv1.weight", "conv2.weight"}


def test_edited_or_foreign_files_are_refused(tmp_path):
    path = gc.plan(_model(), PSI, example_inputs=example_images()).save(tmp_path)
    record = json.loads(path.read_text())
    record["policy"]["text"] = record["policy"]["text"].replace("2.0", "3.0")
    path.write_text(json.dumps(record))
    with pytest.raises(gc.GeomCompileError, match="does not match its recorded sha256"):
        gc.load_plan(path, _model())
    path.write_text(json.dumps({**record, "format": 99}))
    with pytest.raises(gc.GeomCompileError, match="plan format 99"):
        gc.load_plan(path, _model())
    path.write_text("{not json")
    with pytest.raises(gc.GeomCompileError, match="invalid JSON"):
        gc.load_plan(path, _model())
    with pytest.raises(gc.GeomCompileError, match="cannot read the plan file"):
        gc.load_plan(tmp_path / "missing.json", _model())
