"""The int8-teacher points of the search's Pareto plot (canao.compress.external).

The ONNX Runtime point and the skip/raise behaviour always run. The TFLite point runs ONLY when
opted in with CANAO_TEST_BASELINES=1: it needs the LiteRT venv ($CANAO_CACHE/venvs/litert, created
on first use from PyPI, a few minutes) and a conversion of the teacher (a minute or two, then cached).
"""

import os
import sys

import numpy as np
import pytest
import torch

from canao.errors import CanaoError

SEQ = 384
QUESTIONS = 12

opt_in = pytest.mark.skipif(os.environ.get("CANAO_TEST_BASELINES") != "1",
                            reason="opt-in: CANAO_TEST_BASELINES=1 (builds the LiteRT venv and converts the teacher)")


@pytest.fixture(scope="module")
def qa_slice(teacher, data_dir):
    """The first 12 dev questions, their windows at 384 (the search's stride) and the PyTorch teacher's F1."""
    from canao.tasks import squad

    model, tok = teacher
    model.eval()
    ex = squad.read_squad(data_dir / "squad" / "dev-v1.1.json", QUESTIONS)
    feats = squad.make_features(tok, ex, SEQ, min(128, (SEQ - 67) // 2))

    @torch.no_grad()
    def run_fn(ids, tt, mask):
        s, e = model(*(torch.as_tensor(a) for a in (ids, tt, mask)))
        return s.numpy(), e.numpy()

    s, e = squad.predict(run_fn, feats, 32)
    f1 = squad.squad_metrics(ex, squad.decode_spans(ex, feats, s, e))["f1"]
    assert f1 > 50  # a meaningful reference: the int8 points must come close to it
    return model, ex, feats, f1


POINT_KEYS = {"engine", "version", "precision", "quantization", "f1", "median_ms", "p95_ms", "runs", "seq", "threads",
              "per_question", "note"}


def _check_timing(t: dict):
    assert 0 < t["median_ms"] <= t["p95_ms"] < 60_000


def test_onnxruntime_int8_point_keeps_the_teachers_f1(qa_slice):
    from canao.compress.external import int8_teacher_points

    model, ex, feats, f1_torch = qa_slice
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lines = []
    points = int8_teacher_points(model, ex, feats, SEQ, 1, engines=("onnxruntime",), runs=10, warmup=2,
                                 log=lines.append)
    assert list(points) == ["teacher-int8-onnxruntime"]
    p = points["teacher-int8-onnxruntime"]
    assert set(p) == POINT_KEYS
    assert p["engine"] == "onnxruntime" and p["precision"] == "int8" and p["version"].startswith("onnxruntime 1.")
    assert (p["seq"], p["threads"], p["runs"]) == (SEQ, 1, 10)
    assert abs(p["f1"] - f1_torch) <= 5.0, (p["f1"], f1_torch)
    _check_timing(p)
    q = p["per_question"]
    _check_timing(q)
    # every window timed at its real length (dynamic shapes), shorter than the padded 384
    assert q["windows"] == q["runs"] == len(feats)
    assert q["mean_tokens"] == pytest.approx(float(feats.lengths().mean())) and q["mean_tokens"] < SEQ
    assert any("teacher-int8-onnxruntime: F1" in line for line in lines)
    # the teacher is left as it was (a CPU copy is exported and quantized)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unavailable_engines_are_skipped_not_raised(qa_slice, monkeypatch):
    from canao.baselines import litert
    from canao.compress.external import int8_teacher_points

    model, ex, feats, _ = qa_slice
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError

    def no_venv(log=None):
        raise CanaoError("litert: could not install ai-edge-litert==2.3.0: ERROR: No matching distribution found\n"
                         "(network unreachable)")

    monkeypatch.setattr(litert, "ensure_venv", no_venv)
    points = int8_teacher_points(model, ex, feats, SEQ, 1)
    assert set(points) == {"teacher-int8-onnxruntime", "teacher-int8-tflite"}
    for name, why in (("teacher-int8-onnxruntime", "onnxruntime is not installed"),
                      ("teacher-int8-tflite", "could not install ai-edge-litert")):
        assert list(points[name]) == ["skipped"], points[name]
        assert why in points[name]["skipped"] and "\n" not in points[name]["skipped"]


def test_a_real_error_raises(qa_slice, monkeypatch):
    from canao.baselines import encoder_engines
    from canao.compress.external import int8_teacher_points

    model, ex, feats, _ = qa_slice

    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("export failed")

    monkeypatch.setattr(encoder_engines, "OnnxRuntimeEngine", Broken)
    with pytest.raises(RuntimeError, match="export failed"):
        int8_teacher_points(model, ex, feats, SEQ, 1, engines=("onnxruntime",))
    with pytest.raises(CanaoError, match="unknown engine"):
        int8_teacher_points(model, ex, feats, SEQ, 1, engines=("tensorrt",))


@opt_in
def test_tflite_int8_point_keeps_the_teachers_f1(qa_slice):
    from canao.compress.external import int8_teacher_points

    model, ex, feats, f1_torch = qa_slice
    points = int8_teacher_points(model, ex, feats, SEQ, 1, engines=("tflite",), runs=10, warmup=2, log=print)
    p = points["teacher-int8-tflite"]
    assert set(p) == POINT_KEYS
    assert p["engine"] == "tflite" and p["precision"] == "int8" and "ai-edge-litert 2.3.0" in p["version"]
    assert (p["seq"], p["threads"]) == (SEQ, 1)
    assert abs(p["f1"] - f1_torch) <= 5.0, (p["f1"], f1_torch)
    _check_timing(p)
    # static [1, 384] input: per question is the padded figure
    assert p["per_question"]["padded_to"] == SEQ and p["per_question"]["median_ms"] == p["median_ms"]
    assert "static" in p["note"]


@opt_in
def test_litert_worker_returns_the_logits(qa_slice):
    """Worker.logits (the F1 path) matches PyTorch for the fp32 conversion; run() still gives milliseconds."""
    from canao.baselines import litert

    model, _, feats, _ = qa_slice
    path = litert.convert(model, SEQ, "fp32", log=print)
    worker = litert.Worker()
    try:
        worker.load("fp32", path, 1)
        n = int(feats.lengths()[0])
        args = tuple(a[:1, :n] for a in (feats.input_ids, feats.token_type_ids, feats.attention_mask))
        start, end = worker.logits("fp32", *args)
        with torch.no_grad():
            want = [t.numpy() for t in model(*(torch.as_tensor(a) for a in args))]
        assert start.shape == end.shape == (1, n)  # padded to 384 inside, cut to the input's length
        assert np.abs(start - want[0]).max() <= 1e-3 and np.abs(end - want[1]).max() <= 1e-3
        ms = worker.run("fp32", *args)
        assert isinstance(ms, float) and ms > 0
    finally:
        worker.close()
