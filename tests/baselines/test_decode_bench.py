"""`canao bench` on a decoder (canao.baselines.decode_bench): decode steps and time to first token
per engine, and the compiled decoder's thread split, on a 2-layer cut of SmolLM2's real weights."""

import json
import re

import numpy as np
import pytest

from canao.cli import main
from canao.compiler.decoder import CompiledDecoder, compile_decoder
from canao.models.gguf_convert import convert_gguf


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    return convert_gguf("smollm2", tmp_path_factory.mktemp("cut") / "smollm2-2layers.gguf", None, layers=2)


def test_bench_reports_decode_and_ttft_rows_per_engine(cut, tmp_path, capsys):
    code = main(["bench", "--model", str(cut), "--engines", "canao,pytorch", "--precision", "q4_1,fp32",
                 "--seq", "8,24", "--threads", "1,2", "--runs", "20", "--out", str(tmp_path), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((tmp_path / "bench.json").read_text())
    assert report["skipped"] == ["pytorch q4_1"]
    rows = {(r["engine"], r["precision"], r["seq"], r["threads"], r["phase"]): r for r in report["results"]}
    for engine in ("canao q4_1", "canao fp32", "pytorch fp32"):
        name, prec = engine.split()
        for seq in (8, 24):
            for th in (1, 2):
                decode, ttft = rows[(name, prec, seq, th, "decode")], rows[(name, prec, seq, th, "ttft")]
                assert decode["runs"] == 20 and ttft["runs"] == 5
                assert 0 < decode["median_ms"] <= decode["p90_ms"]
                assert decode["tokens_per_s"] == pytest.approx(1000 / decode["median_ms"])
    assert len(rows) == 3 * 2 * 2 * 2
    # the engines decode the same model: compiled fp32 generates PyTorch's greedy tokens
    assert report["greedy"]["canao fp32"] == report["greedy"]["pytorch fp32"]
    assert len(report["greedy"]["canao q4_1"]) == 32
    assert "| 24 | 2 | decode |" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--seq", "squad"], "a decoder is benchmarked at context lengths"),
    (["--engines", "canao,tflite"], r"unknown decoder engine\(s\) \['tflite'\]; available: canao, llama.cpp"),
    (["--precision", "int8"], "no engine runs precision int8"),
    (["--seq", "9000"], "exceeds the model's context of 8192 tokens"),
])
def test_bench_decoder_errors_name_the_problem(cut, tmp_path, capsys, args, message):
    code = main(["bench", "--model", str(cut), "--engines", "canao", "--threads", "1", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 2 and "canao bench: error:" in err and "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize("precision", ["q4_1", "q8_0"])
def test_two_threads_compute_what_one_computes(cut, tmp_path, precision):
    """A decode step's GEMVs split their rows into one contiguous run per claimed item; rows are
    independent, so every thread count gives the same logits bit for bit."""
    folder = compile_decoder(str(cut), tmp_path / precision, precision=precision, max_seq=64)["artifact"]
    ids = [6403, 1980, 253, 655, 28, 281, 253, 1165]
    logits = {}
    for threads in (1, 2):
        dec = CompiledDecoder(folder, threads=threads)
        dec.feed(ids)
        logits[threads] = [dec.feed([t]).copy() for t in (260, 3426, 28)]  # decode steps
        dec.close()
    for one, two in zip(logits[1], logits[2]):
        np.testing.assert_array_equal(one, two)


def test_every_precision_canao_compiles_is_benchmarked():
    """`canao bench` on a k-quant artifact refused it ("no engine runs precision q4_k_m") while
    `canao compile` made it: the bench's list follows the compiler's."""
    from canao.baselines.decode_bench import ENGINE_PRECISIONS
    from canao.compiler.decoder.compile import DECODER_PRECISIONS

    assert set(ENGINE_PRECISIONS["canao"]) == set(DECODER_PRECISIONS)
