import json

import numpy as np
import pytest

from canao.compress.oracle import LatencyOracle
from canao.compress.predictor import MIN_OWN, LatencyPredictor, _Model, _nnls_relative, calibration_set, features, holdout_error
from canao.compress.space import Arch, SearchSpace
from canao.models.bert import BertConfig

TEACHER = BertConfig()


def synthetic(space, n, coef, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for a in calibration_set(space, n, seed):
        y = float(features(a, TEACHER) @ coef) * (1 + noise * rng.standard_normal())
        out.append((a, {"p95_ms": y, "median_ms": y}))
    return out


def test_predictor_recovers_linear_costs_and_reports_holdout_error():
    space = SearchSpace.from_teacher(TEACHER, seq=[128, 384])
    coef = np.array([0.3, 0.02, 12.0, 9.0, 11.0])
    samples = synthetic(space, 40, coef)
    pred = LatencyPredictor(TEACHER)
    err = holdout_error(pred, samples)
    assert err["n"] == 11 and err["mape_pct"] < 3.0  # 30 % of the 38 inside the extremes
    fresh = synthetic(space, 20, coef, seed=1)
    assert pred.errors(fresh)["mape_pct"] < 3.0
    again = LatencyPredictor.from_dict(pred.to_dict(), TEACHER)
    assert again.predict(space.largest()) == pytest.approx(pred.predict(space.largest()))


def test_recalibration_for_a_slower_device():
    space = SearchSpace.from_teacher(TEACHER)
    coef = np.array([0.3, 0.02, 12.0, 9.0, 11.0])
    pred = LatencyPredictor(TEACHER).fit(synthetic(space, 30, coef))
    slow = synthetic(space, 6, coef * 2.5, seed=3)
    assert pred.errors(slow)["mape_pct"] > 50
    pred.recalibrate(slow)  # few samples: one scale factor
    assert pred.errors(synthetic(space, 10, coef * 2.5, seed=4))["mape_pct"] < 3.0


def test_torch_oracle_and_database(tmp_path):
    small = BertConfig(vocab_size=200, hidden_size=64, layer_heads=[4] * 2, layer_ffn=[128] * 2, head_dim=16)
    oracle = LatencyOracle(small, threads=1, backend="torch", db_path=tmp_path / "db.json", runs=5, warmup=1)
    a = Arch((2, 4), (64, 128), 32)
    m = oracle.measure(a)
    assert 0 < m["median_ms"] <= m["p95_ms"] and m["runs"] == 5
    again = LatencyOracle(small, threads=1, backend="torch", db_path=tmp_path / "db.json")
    assert again.cached(a) == m and again.measure(a) == m and again.measured_now == 0
    assert len(again.all_cached()) == 1
    # a measurement from another day is taken again, not trusted
    db = json.loads((tmp_path / "db.json").read_text())
    for v in db.values():
        v["when"] -= 2 * 24 * 3600
    (tmp_path / "db.json").write_text(json.dumps(db))
    stale = LatencyOracle(small, threads=1, backend="torch", db_path=tmp_path / "db.json", runs=5, warmup=1)
    assert stale.cached(a) is None and stale.all_cached() == []
    stale.measure(a)
    assert stale.measured_now == 1 and stale.cached(a) is not None


def test_two_searches_sharing_the_database_keep_each_others_entries(tmp_path):
    small = BertConfig(vocab_size=200, hidden_size=64, layer_heads=[4] * 2, layer_ffn=[128] * 2, head_dim=16)
    db = tmp_path / "db.json"
    first, second = (LatencyOracle(small, threads=1, backend="torch", db_path=db, runs=3, warmup=1) for _ in range(2))
    a, b = Arch((2, 4), (64, 128), 32), Arch((2,), (64,), 32)
    first.measure(a)
    second.measure(b)  # opened before `a` was written: its write must not drop it
    assert len(json.loads(db.read_text())) == 2
    assert second.cached(a) is not None  # and it sees the other's measurement from then on


def test_a_corrupt_database_is_kept_aside_not_overwritten(tmp_path, capsys):
    small = BertConfig(vocab_size=200, hidden_size=64, layer_heads=[4] * 2, layer_ffn=[128] * 2, head_dim=16)
    db = tmp_path / "db.json"
    db.write_text('{"canao|host|a": {"median_ms": 1.0')  # a torn write
    oracle = LatencyOracle(small, threads=1, backend="torch", db_path=db, runs=3, warmup=1)
    aside = list(tmp_path.glob("db.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text().startswith('{"canao|host|a"')
    assert "kept it as" in capsys.readouterr().err
    oracle.measure(Arch((2,), (64,), 32))
    assert len(json.loads(db.read_text())) == 1 and aside[0].exists()


def test_compiler_oracle_measures_compiled_code(tmp_path):
    small = BertConfig(vocab_size=200, hidden_size=64, layer_heads=[4] * 2, layer_ffn=[128] * 2, head_dim=16)
    oracle = LatencyOracle(small, threads=1, backend="canao", db_path=tmp_path / "db.json", runs=5, warmup=1)
    m = oracle.measure(Arch((2,), (64,), 32))
    assert m["backend"] == "canao" and m["compile_s"] > 0 and 0 < m["median_ms"] <= m["p95_ms"]


def test_timings_of_another_compiler_are_not_reused(tmp_path, monkeypatch):
    """A changed kernel or code generator makes the stored timings stale: the database keys them by
    the compiler's fingerprint, so a search after the change measures again."""
    import canao.compress.oracle as oracle_module

    small = BertConfig(vocab_size=200, hidden_size=64, layer_heads=[4] * 2, layer_ffn=[128] * 2, head_dim=16)
    arch = Arch((2,), (64,), 32)
    oracle = LatencyOracle(small, threads=1, backend="canao", db_path=tmp_path / "db.json", runs=3, warmup=1, rounds=1)
    oracle.measure(arch)
    again = LatencyOracle(small, threads=1, backend="canao", db_path=tmp_path / "db.json", runs=3, warmup=1, rounds=1)
    assert again.cached(arch) is not None and len(again.all_cached()) == 1
    monkeypatch.setattr(oracle_module, "compiler_fingerprint", lambda: "0123456789ab")
    assert again.cached(arch) is None and again.all_cached() == []
    again.measure(arch)
    assert again.measured_now == 1 and len(json.loads((tmp_path / "db.json").read_text())) == 2


def test_precision_scale_factor_with_few_measurements():
    space = SearchSpace.from_teacher(TEACHER, precisions=["fp32", "int8"])
    coef = np.array([0.3, 0.02, 12.0, 9.0, 11.0])
    archs = calibration_set(space, 12)
    assert sum(a.precision == "int8" for a in archs) == 12  # the same shapes in every precision
    int8 = [a for a in archs if a.precision == "int8"][:MIN_OWN - 1]  # too few for a model of its own
    samples = [(a, {"p95_ms": float(features(a, TEACHER) @ coef) * (0.4 if a.precision == "int8" else 1.0)})
               for a in [a for a in archs if a.precision == "fp32"] + int8]
    pred = LatencyPredictor(TEACHER).fit(samples)
    assert "int8" not in pred.models and pred.scale["int8"] == pytest.approx(0.4)
    a = space.largest()
    i8 = Arch(a.heads, a.ffn, a.seq, "int8")
    assert pred.predict(i8) == pytest.approx(0.4 * pred.predict(a))
    assert LatencyPredictor.from_dict(pred.to_dict(), TEACHER).predict(i8) == pytest.approx(pred.predict(i8))


def test_each_precision_gets_its_own_cost_model():
    """int8 speeds up the GEMMs but not attention: one factor on the fp32 model cannot fit that."""
    space = SearchSpace.from_teacher(TEACHER, precisions=["fp32", "int8"])
    coef = np.array([0.3, 0.02, 12.0, 9.0, 11.0])
    coef8 = np.array([0.3, 0.02, 3.0, 9.0, 2.5])
    truth = {"fp32": coef, "int8": coef8}
    samples = [(a, {"median_ms": float(features(a, TEACHER) @ truth[a.precision])}) for a in calibration_set(space, 16)]
    for _, m in samples:
        m["p95_ms"] = 1.1 * m["median_ms"]
    pred = LatencyPredictor(TEACHER)
    err = holdout_error(pred, samples)
    assert err["mape_pct"] < 1.0 and err["median"]["mape_pct"] < 1.0
    scale_only = LatencyPredictor(TEACHER).fit([s for s in samples if s[0].precision == "fp32"] +
                                               [s for s in samples if s[0].precision == "int8"][:3])
    fresh = [(a, {"median_ms": float(features(a, TEACHER) @ coef8)}) for a in calibration_set(space, 30, seed=5)
             if a.precision == "int8"]
    assert scale_only.errors(fresh, key="median_ms")["mape_pct"] > 5.0  # what the own model fixes
    assert pred.errors(fresh, key="median_ms")["mape_pct"] < 1.0
    assert pred.predict(fresh[0][0]) == pytest.approx(1.1 * pred.predict(fresh[0][0], "median_ms"))


def test_per_choice_corrections_catch_what_flops_miss():
    """A narrow FFN GEMM (N = 192) runs at a lower GFLOP/s: a cost the FLOP features cannot express."""
    space = SearchSpace.from_teacher(TEACHER, hidden_fracs=(1.0,))  # the corrections are per width: one width
    coef = np.array([0.3, 0.02, 12.0, 9.0, 11.0])

    def truth(a):
        return float(features(a, TEACHER) @ coef) + 4.0 * sum(f == 192 for f in a.ffn) + 2.5 * sum(h == 2 for h in a.heads)

    samples = [(a, {"median_ms": truth(a), "p95_ms": truth(a)}) for a in calibration_set(space, 60)]
    flops_only = LatencyPredictor(TEACHER)
    flops_only.models = {"fp32": _Model(_nnls_relative(np.stack([features(a, TEACHER) for a, _ in samples]),
                                                       np.array([m["median_ms"] for _, m in samples])))}
    flops_only.p95_ratio = {"fp32": 1.0}
    fresh = [(a, {"median_ms": truth(a), "p95_ms": truth(a)}) for a in calibration_set(space, 40, seed=9)]
    pred = LatencyPredictor(TEACHER).fit(samples)
    assert pred.errors(fresh)["mape_pct"] < 0.5 * flops_only.errors(fresh)["mape_pct"]
    assert pred.errors(fresh)["mape_pct"] < 2.0


def test_compiler_oracle_int8(tmp_path):
    small = BertConfig(vocab_size=200, hidden_size=64, layer_heads=[4] * 2, layer_ffn=[128] * 2, head_dim=16)
    oracle = LatencyOracle(small, threads=1, backend="canao", db_path=tmp_path / "db.json", runs=3, warmup=1, rounds=1)
    m = oracle.measure(Arch((4,), (128,), 32, "int8"))
    assert m["arch"]["precision"] == "int8" and m["median_ms"] > 0
