"""The encoder engines of `canao bench` (canao.baselines.encoder_engines), ExecuTorch and OpenVINO in detail.

OpenVINO installs with the `bench` extra (scripts/setup.sh), so its parity test always runs.
The ExecuTorch parity test runs ONLY when opted in with CANAO_TEST_BASELINES=1: it needs the
ExecuTorch venv ($CANAO_CACHE/venvs/executorch, about 520 MB, created on first use from PyPI)
and a 1-2 minute export; CI does not build that venv, so in CI it is skipped. The tests of the
error when that venv is missing and cannot be created (CANAO_OFFLINE=1) always run.
"""

import os

import numpy as np
import pytest
import torch

from canao.errors import CanaoError

opt_in = pytest.mark.skipif(os.environ.get("CANAO_TEST_BASELINES") != "1",
                            reason="opt-in: CANAO_TEST_BASELINES=1 (builds the ExecuTorch venv, ~520 MB)")


@pytest.fixture(scope="module")
def qa_teacher(teacher_dir):
    from canao.models.encoders import load_encoder

    return load_encoder(teacher_dir, task="qa")[0].eval()


def _inputs(model, seq, seed=0):
    ids = np.random.default_rng(seed).integers(1000, model.config.vocab_size, (1, seq)).astype(np.int64)
    return ids, np.zeros_like(ids), np.ones_like(ids)


def _reference(model, ids, tt, mask):
    with torch.inference_mode():
        start, end = model(*(torch.from_numpy(a) for a in (ids, tt, mask)))
    return start.numpy(), end.numpy()


def test_executorch_offline_without_venv_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from canao.cli import main
    from canao.baselines import executorch_engine

    monkeypatch.setenv("CANAO_CACHE", str(tmp_path))
    monkeypatch.setenv("CANAO_OFFLINE", "1")
    with pytest.raises(CanaoError, match=r"run `canao bench --engines executorch` once online") as err:
        executorch_engine.ensure_venv()
    assert str(tmp_path / "venvs" / "executorch") in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "venvs" / "executorch").exists()  # nothing half-made
    # through the CLI: exit 2, one line, no traceback
    code = main(["bench", "--model", "random:minilm", "--engines", "executorch", "--seq", "16", "--threads", "1",
                 "--out", str(tmp_path / "out")])
    err_text = capsys.readouterr().err
    assert code == 2
    assert "canao bench: error: executorch: its venv" in err_text and "Traceback" not in err_text


def test_openvino_missing_is_a_clear_error(monkeypatch):
    import sys

    from canao.baselines.encoder_bench import run_bench
    from canao.baselines.openvino_engine import OpenVINOModel

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(CanaoError, match=r"openvino is not installed: pip install 'canao\[bench\]'"):
        OpenVINOModel(torch.nn.Linear(1, 1))
    with pytest.raises(CanaoError, match="openvino is not installed"):
        run_bench(torch.nn.Linear(1, 1), None, ["openvino"], [16], [1])


def test_openvino_matches_pytorch_on_the_teacher(qa_teacher):
    from canao.baselines.openvino_engine import OpenVINOModel

    m = OpenVINOModel(qa_teacher, threads=1)
    assert m.threads == 1
    for seq in (128, 77):  # one compiled model, dynamic sequence length: no padding
        ids, tt, mask = _inputs(qa_teacher, seq)
        mask[:, seq - 5:] = 0
        got, want = m(ids, tt, mask), _reference(qa_teacher, ids, tt, mask)
        for g, w in zip(got, want):
            assert g.shape == w.shape == (1, seq)
            assert np.abs(g - w).max() <= 1e-3, (seq, np.abs(g - w).max())


@opt_in
def test_executorch_matches_pytorch_on_the_teacher(qa_teacher):
    from canao.baselines import executorch_engine

    path = executorch_engine.convert(qa_teacher, 128, "fp32", log=print)
    worker = executorch_engine.Worker()
    try:
        assert "executorch 1.5.1" in worker.version
        worker.load("128", path)
        assert worker.threads(1) == 1
        for seq in (128, 100):  # 100: padded to the program's 128, masked past the input
            ids, tt, mask = _inputs(qa_teacher, seq, seed=seq)
            got, want = worker.logits("128", ids, tt, mask), _reference(qa_teacher, ids, tt, mask)
            for g, w in zip(got, want):
                assert g.shape == w.shape == (1, seq)
                assert np.abs(g - w).max() <= 1e-3, (seq, np.abs(g - w).max())
        assert worker.run("128", ids, tt, mask) > 0
    finally:
        worker.close()


@pytest.mark.parametrize("seq,message", [
    ("12,abc", "--seq 12,abc: give lengths, 'squad' or 'squad-unpadded', comma-separated"),
    ("squad-unpadded", "--seq squad-unpadded needs a checkpoint with a tokenizer, not a random model"),
])
def test_bench_bad_sequence_settings_are_one_line_errors(tmp_path, capsys, seq, message):
    from canao.cli import main

    code = main(["bench", "--model", "random:minilm", "--engines", "canao", "--seq", seq, "--threads", "1",
                 "--out", str(tmp_path / "out")])
    err_text = capsys.readouterr().err
    assert code == 2 and f"canao bench: error: {message}" in err_text and "Traceback" not in err_text
    assert not (tmp_path / "out" / "artifact-fp32").exists()  # refused before compiling anything


def test_executorch_refuses_squad_unpadded():
    from canao.baselines.encoder_engines import ExecuTorchEngine

    eng = ExecuTorchEngine.__new__(ExecuTorchEngine)  # no venv needed: the setting is refused before any conversion
    with pytest.raises(CanaoError, match="needs a program per length"):
        eng.setup("squad-unpadded", [])


@pytest.fixture(scope="module")
def tiny_compiled(tmp_path_factory):
    """A two-layer random encoder and its fp32 artifact (random weights: only the engines are under test)."""
    from canao.compiler import compile_model
    from canao.models.bert import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(hidden_size=64, layer_heads=[2, 2], layer_ffn=[128, 128],
                                                head_dim=32)).eval()
    out = tmp_path_factory.mktemp("tiny") / "artifact-fp32"
    compile_model(model, out, precision="fp32", max_seq=32, tune=False)
    return model, out


def test_engines_share_one_interface_and_agree(tiny_compiled):
    """canao, PyTorch and ONNX Runtime behind open_engine: the same logits (fp32), milliseconds from time_ms."""
    from canao.baselines.encoder_engines import open_engine

    model, artifact = tiny_compiled
    ids, tt, mask = _inputs(model, 24, seed=3)
    tt[:, 12:] = 1
    mask[:, 20:] = 0
    want = _reference(model, ids, tt, mask)
    engines = [open_engine("canao", model, "fp32", artifact), open_engine("pytorch", model),
               open_engine("onnxruntime", model, "fp32")]
    try:
        for eng in engines:
            eng.setup(24, [(ids, tt, mask)])
            eng.prepare(1)
            got = eng.run(ids, tt, mask)
            for g, w in zip(got, want):
                assert np.asarray(g).shape == (1, 24)
                assert np.abs(np.asarray(g) - w).max() <= 1e-4, (eng.name, np.abs(np.asarray(g) - w).max())
            assert eng.time_ms(ids, tt, mask) > 0 and eng.padded_to is None
    finally:
        for eng in engines:
            eng.close()
    assert not engines[2].folder.exists()  # ONNX Runtime's exported files are removed on close
    with pytest.raises(CanaoError, match="canao runs fp32, bf16, int8, not q4_1"):
        open_engine("canao", model, "q4_1", artifact)
    with pytest.raises(CanaoError, match=r"is a fp32 artifact, not int8"):
        open_engine("canao", model, "int8", artifact)
    with pytest.raises(CanaoError, match="unknown engine 'tensorrt'; available: canao, pytorch"):
        open_engine("tensorrt", model)


def test_run_bench_interleaves_the_engines(tiny_compiled):
    from canao.baselines.encoder_bench import markdown, run_bench

    model, artifact = tiny_compiled
    report = run_bench(model, {"fp32": artifact}, ["canao", "pytorch", "onnxruntime"], [16, 32], [1], runs=20,
                       warmup=2, precisions=["fp32"])
    rows = report["results"]
    assert [(r["engine"], r["seq"]) for r in rows] == [
        (e, s) for s in (16, 32) for e in ("canao", "pytorch", "onnxruntime")]
    for r in rows:
        assert r["runs"] == 20 and 0 < r["median_ms"] <= r["p90_ms"] and r["mean_tokens"] == r["seq"]
        assert r["padded_to"] is None and r["threads"] == 1
    table = markdown(report)
    assert "| 32 | 1 |" in table and "canao fp32" in table and "x onnxruntime fp32" in table
    # a precision an engine lacks is skipped and said so; canao without an artifact of that precision is an error
    report = run_bench(model, None, ["pytorch"], [16], [1], runs=20, warmup=1, precisions=["int8"])
    assert report["results"] == [] and report["skipped"] == ["pytorch int8"]
    with pytest.raises(CanaoError, match="the canao engine needs a compiled artifact"):
        run_bench(model, {"fp32": artifact}, ["canao"], [16], [1], precisions=["int8"])
