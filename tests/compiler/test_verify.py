"""`canao compile --verify`: fp32 by the logits, bf16 / int8 by SQuAD F1 against the fp32 PyTorch model."""

import json
import re

import pytest

from canao.compiler.verify import F1_TOLERANCE, f1_verdict


def test_f1_rule_is_one_sided_and_per_precision():
    ref = {"f1": 70.0, "em": 60.0}
    ok = f1_verdict(ref, {"f1": 70.0 - F1_TOLERANCE["int8"], "em": 59.0}, "int8", 300)
    assert ok["ok"] and ok["f1_delta"] == pytest.approx(-F1_TOLERANCE["int8"]) and ok["questions"] == 300
    assert not f1_verdict(ref, {"f1": 70.0 - F1_TOLERANCE["int8"] - 0.01, "em": 59.0}, "int8", 300)["ok"]
    assert f1_verdict(ref, {"f1": 75.0, "em": 65.0}, "bf16", 300)["ok"]  # better than fp32 passes
    assert not f1_verdict(ref, {"f1": 69.6, "em": 60.0}, "bf16", 300)["ok"]  # bf16 allows 0.3 only


def test_int8_compile_verifies_by_squad_f1(teacher_dir, data_dir, tmp_path, capsys, monkeypatch):
    """The real teacher compiled to int8, judged by SQuAD F1 on dev questions (40 instead of the command's 300,
    for time: at 40 one question moves F1 by 2.5, so the verdict may go either way; the figures may not)."""
    from canao.cli import main
    from canao.compiler import verify

    monkeypatch.setattr(verify, "F1_QUESTIONS", 40)
    code = main(["compile", "--model", str(teacher_dir), "--out", str(tmp_path / "int8"), "--precision", "int8",
                 "--verify", "--data", str(data_dir), "--no-tuning-db", "--json"])
    captured = capsys.readouterr()
    if code == 0:
        f1 = json.loads(captured.out)["verify"]["f1"]
        assert f1["ok"] and f1["questions"] == 40 and f1["precision"] == "int8"
        assert f1["f1_fp32"] > 50 and f1["f1"] >= f1["f1_fp32"] - F1_TOLERANCE["int8"]
    else:  # refused: one line with both figures, and a drop beyond the tolerance but not a broken model
        # (after the retry with fp32 attention products, which names the int8 products' F1 too)
        m = re.search(r"verification failed: int8 F1 ([\d.]+) vs fp32 ([\d.]+) on 40 questions "
                      r"(?:with fp32 attention products \([\d.]+ with int8 ones; |\()allowed drop 0.5\)", captured.err)
        assert code == 2 and m and "Traceback" not in captured.err, captured.err
        got, ref = float(m.group(1)), float(m.group(2))
        assert ref > 50 and ref - 10 < got < ref - F1_TOLERANCE["int8"]


def test_int8_verify_retries_with_fp32_attention_products(teacher_dir, data_dir, tmp_path, capsys, monkeypatch):
    """With the default attention precision, a failed int8 F1 check compiles again with fp32 attention
    products before giving up; the error then names both attempts. (A rule nothing can meet forces both
    to fail here; the real case: the teacher at --max-seq 128, int8 products -1.9 F1, fp32 ones -0.2.)"""
    from canao.cli import main
    from canao.compiler import verify

    monkeypatch.setattr(verify, "F1_QUESTIONS", 40)
    monkeypatch.setitem(verify.F1_TOLERANCE, "int8", -100.0)
    code = main(["compile", "--model", str(teacher_dir), "--out", str(tmp_path / "int8"), "--precision", "int8",
                 "--max-seq", "128", "--verify", "--data", str(data_dir), "--no-tuning-db"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "with int8 attention products; compiling again with fp32 attention products" in err
    m = re.search(r"verification failed: int8 F1 ([\d.]+) vs fp32 ([\d.]+) on 40 questions with fp32 attention "
                  r"products \(([\d.]+) with int8 ones; allowed drop -100.0\)", err)
    assert m and all(float(x) > 50 for x in m.groups()), err
    # an attention precision the user chose is not second-guessed: one attempt, one plain error
    code = main(["compile", "--model", str(teacher_dir), "--out", str(tmp_path / "int8b"), "--precision", "int8",
                 "--attention", "int8", "--max-seq", "128", "--verify", "--data", str(data_dir), "--no-tuning-db"])
    err = capsys.readouterr().err
    assert code == 2 and "compiling again" not in err and "on 40 questions (allowed drop -100.0)" in err
