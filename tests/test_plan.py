"""Tests of lrexport.plan and the config (de)serialisation in lrexport.config."""

from __future__ import annotations

import json

import pytest

import lrexport.util
from lrexport.allocate import Flrc, PaluFisher, Strs, Uniform
from lrexport.config import config_from_dict, config_to_dict
from lrexport.errors import ConfigError, LrexportError, PlanError
from lrexport.factorize import Asvd, FisherWhitenSvd, PlainSvd, WhitenSvd
from lrexport.plan import PLAN_FORMAT, PLAN_VERSION, Plan, WeightPlan
from lrexport.schedule import Constant, Cosine, Linear, Schedule, Steps


def make_plan(tiny_spec) -> Plan:
    names = tiny_spec.linear_names()
    return Plan(
        # the JSON form of the HF config (JSON turns id2label's int keys into strings, see below)
        model=json.loads(json.dumps(tiny_spec.hf_config)),
        source="hf:tiny-random-llama",
        dtype="float32",
        max_len=32,
        calibration={"kind": "self", "num_windows": 4, "window": 12, "seed": 0, "temperature": 1.0, "tokens": 48},
        weights=WeightPlan(
            factorization=FisherWhitenSvd(ridge=1e-5, power=0.5, floor=0.02),
            allocation=Flrc(0.3, align=8, min_rank=16),
            ranks={names[0]: 8, names[3]: 16, names[6]: 24},
            params_kept=12345,
            params_total=23456,
            alloc_seconds=0.125,
        ),
        schedule=Schedule(form=Steps(((1, 1.0), (8, 0.5), (64, 0.25))), min_rank=4, align=2, prefill=0.9),
        kv={"rank_ratio": 0.5, "group": 4},
        io={"inputs": ["input_ids", "past_len"], "outputs": ["logits"]},
    )


def test_plan_json_round_trip_gives_an_equal_plan(tiny_spec):
    plan = make_plan(tiny_spec)
    d = json.loads(plan.to_json())
    assert d["format"] == PLAN_FORMAT and d["version"] == PLAN_VERSION
    assert d["weights"]["factorization"] == {"type": "FisherWhitenSvd", "ridge": 1e-5, "power": 0.5, "floor": 0.02,
                                              "full": False}
    assert d["schedule"]["form"] == {"type": "Steps", "points": [[1, 1.0], [8, 0.5], [64, 0.25]]}
    back = Plan.from_dict(d)
    assert back == plan
    points = back.schedule.form.points
    assert type(points) is tuple and all(type(p) is tuple for p in points)
    assert back.schedule.fraction(8) == 0.5  # the restored schedule works
    assert type(back.weights.factorization) is FisherWhitenSvd and type(back.weights.allocation) is Flrc


def test_plan_model_config_rebuilds_the_same_spec(tiny_spec):
    """A plan built from the raw HF config dict (id2label has int keys) does not compare equal after
    JSON, but what matters survives: the ModelSpec rebuilt from the loaded plan is the same."""
    from lrexport.models.spec import spec_from_hf_config

    plan = make_plan(tiny_spec)
    plan.model = dict(tiny_spec.hf_config)
    back = Plan.from_dict(json.loads(plan.to_json()))
    assert spec_from_hf_config(back.model) == tiny_spec
    assert back.model["hidden_size"] == 16 and back.model["num_key_value_heads"] == 2


def test_plan_save_and_load(tmp_path, tiny_spec):
    plan = make_plan(tiny_spec)
    path = tmp_path / "out" / "lrexport.json"
    plan.save(path)  # creates the folder
    assert Plan.load(path) == plan
    assert Plan.load(path.parent) == plan  # a folder means its lrexport.json
    plain = Plan(model={"model_type": "llama"}, source="x")
    plain.save(tmp_path / "plain.json")
    back = Plan.load(tmp_path / "plain.json")
    assert back == plain and back.weights is None and back.schedule is None


def test_plan_save_is_atomic(tmp_path, tiny_spec, monkeypatch):
    plan = make_plan(tiny_spec)
    target = tmp_path / "lrexport.json"
    plan.save(target)
    plan.save(target)  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lrexport.json"], "temporary files left behind"
    assert json.loads(target.read_text()) == json.loads(plan.to_json())
    before = target.read_bytes()

    # a crash at the moment of the rename must leave the old file intact and no temp file
    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(lrexport.util.os, "replace", boom)
    other = make_plan(tiny_spec)
    other.max_len = 4096
    with pytest.raises(OSError, match="disk on fire"):
        other.save(target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lrexport.json"]


ALL_CONFIGS = [
    PlainSvd(), Asvd(alpha=1.5), WhitenSvd(ridge=0.0), FisherWhitenSvd(ridge=1e-4, power=0.25, floor=0.5),
    Uniform(0.2, align=4, min_rank=2), PaluFisher(0.5), Flrc(0.35, align=16), Strs(0.4, grid=(0.25, 0.5, 0.75)),
    Constant(0.5), Steps(((0, 0.9), (5, 0.3))), Linear(0.9, 0.4, 12), Cosine(1.0, 0.5, 7),
    Schedule(form=Cosine(1.0, 0.5, 7), min_rank=2, align=4, prefill=0.5),
]


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: type(c).__name__)
def test_every_config_round_trips_through_json(cfg):
    d = json.loads(json.dumps(config_to_dict(cfg)))
    assert d["type"] == type(cfg).__name__
    back = config_from_dict(d)
    assert back == cfg and type(back) is type(cfg)


def test_config_from_dict_does_not_modify_its_input():
    d = {"type": "Flrc", "ratio": 0.3}
    config_from_dict(d)
    assert d == {"type": "Flrc", "ratio": 0.3}


def test_config_from_dict_uses_defaults_for_absent_optional_fields():
    assert config_from_dict({"type": "Schedule"}) == Schedule()
    assert config_from_dict({"type": "Flrc", "ratio": 0.5}) == Flrc(0.5, align=1, min_rank=1)


# ------------------------------------------------------------------ errors


def test_wrong_format(tiny_spec):
    d = make_plan(tiny_spec).to_dict()
    d["format"] = "onnx-thing"
    with pytest.raises(PlanError, match="not an lrexport plan \\(format 'onnx-thing'\\)"):
        Plan.from_dict(d)
    del d["format"]
    with pytest.raises(PlanError, match="not an lrexport plan"):
        Plan.from_dict(d)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_version(tiny_spec, version):
    d = make_plan(tiny_spec).to_dict()
    d["version"] = version
    with pytest.raises(PlanError, match=f"plan version {version} is not supported \\(this lrexport reads 1\\)"):
        Plan.from_dict(d)


@pytest.mark.parametrize("path", [("model",), ("source",), ("weights", "ranks"), ("weights", "allocation"),
                                  ("weights", "params_kept")])
def test_missing_field(tiny_spec, path):
    d = make_plan(tiny_spec).to_dict()
    sub = d
    for k in path[:-1]:
        sub = sub[k]
    del sub[path[-1]]
    with pytest.raises(PlanError, match=f"plan is missing the field '{path[-1]}'"):
        Plan.from_dict(d)


def test_unknown_config_type(tiny_spec):
    d = make_plan(tiny_spec).to_dict()
    d["weights"]["allocation"]["type"] = "MagicAllocator"
    with pytest.raises(ConfigError, match="unknown config type 'MagicAllocator'; known: .*Flrc.*Uniform"):
        Plan.from_dict(d)
    with pytest.raises(ConfigError, match="unknown config type None"):
        config_from_dict({"ratio": 0.5})


def test_out_of_range_value_in_a_plan(tiny_spec):
    d = make_plan(tiny_spec).to_dict()
    d["weights"]["allocation"]["ratio"] = 1.5
    with pytest.raises(ConfigError, match=r"ratio must be in \(0, 1\), got 1.5"):
        Plan.from_dict(d)
    d = make_plan(tiny_spec).to_dict()
    d["schedule"]["form"]["points"] = [[3, 1.0], [1, 0.5]]
    with pytest.raises(ConfigError, match="sorted by step"):
        Plan.from_dict(d)


def test_load_errors(tmp_path):
    with pytest.raises(PlanError, match="no plan file"):
        Plan.load(tmp_path / "nope.json")
    with pytest.raises(PlanError, match="no plan file"):
        Plan.load(tmp_path)  # a folder without lrexport.json
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "lrexport-plan", "version": 1,')  # truncated
    with pytest.raises(PlanError, match="invalid JSON"):
        Plan.load(bad)


def test_load_json_that_is_not_an_object(tmp_path):
    p = tmp_path / "lrexport.json"
    p.write_text("[1, 2, 3]")
    with pytest.raises(PlanError, match="not an lrexport plan"):
        Plan.load(p)


def test_config_missing_required_field_is_a_clear_error(tiny_spec):
    d = make_plan(tiny_spec).to_dict()
    del d["weights"]["allocation"]["ratio"]
    with pytest.raises(LrexportError, match="ratio"):
        Plan.from_dict(d)
