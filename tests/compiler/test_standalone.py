"""canao-run, the artifact's standalone C program, and its Python driver canao.compiler.standalone (host artifact)."""

import json
import subprocess

import numpy as np
import pytest
import torch

from canao.compiler.standalone import bench_local, run_local
from canao.errors import CanaoError
from compiler_helpers import random_inputs


def _run(artifact_dir, *args):
    return subprocess.run([str(artifact_dir / "canao-run"), *map(str, args)], capture_output=True, text=True)


def test_canao_run_equals_compiled_model_and_pytorch(model, compiled, artifact_dir):
    ids, tt, mask = random_inputs(29, pad=4, seed=3)
    ids, tt, mask = torch.cat([ids, ids.flip(1)]), torch.cat([tt, tt]), torch.cat([mask, mask.flip(1)])
    want = compiled.run(ids.numpy(), tt.numpy(), mask.numpy())
    for threads in (1, 2):
        got = run_local(artifact_dir, ids, tt, mask, threads=threads)
        assert len(got) == 2 and all(g.shape == (2, 29) and g.dtype == np.float32 for g in got)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)
    with torch.no_grad():
        ref = model(ids, tt, mask)
    assert max(np.abs(g - r.numpy()).max() for g, r in zip(got, ref)) <= 1e-4
    # defaults: token types 0, mask all ones
    got = run_local(artifact_dir, ids[:1])
    want = compiled.run(ids[:1].numpy(), np.zeros((1, 29), np.int64), np.ones((1, 29), np.int64))
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6)


def test_raw_file_contract(compiled, artifact_dir, tmp_path):
    """--out holds start_logits [B, S] then end_logits [B, S], float32, nothing else."""
    ids = np.random.default_rng(0).integers(1, 100, (3, 11)).astype(np.int64)
    ids.tofile(tmp_path / "ids.i64")
    proc = _run(artifact_dir, artifact_dir / "weights.bin", "--ids", tmp_path / "ids.i64", "--batch", 3, "--seq", 11,
                "--out", tmp_path / "out.f32", "--threads", 2)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr
    out = np.fromfile(tmp_path / "out.f32", np.float32)
    assert out.size == 2 * 3 * 11
    start, end = compiled.run(ids)
    np.testing.assert_allclose(out.reshape(2, 3, 11), np.stack([start, end]), rtol=0, atol=1e-6)


def test_bench_prints_one_json_line(artifact_dir):
    proc = _run(artifact_dir, artifact_dir / "weights.bin", "--bench", "--seq", 16, "--threads", 1,
                "--warmup", 1, "--runs", 4)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert set(report) == {"seq", "threads", "runs", "warmup", "median_ms", "p90_ms", "p95_ms", "min_ms", "mean_ms",
                           "target"}
    assert (report["seq"], report["threads"], report["runs"], report["warmup"]) == (16, 1, 4, 1)
    assert 0 < report["min_ms"] <= report["median_ms"] <= report["p90_ms"] <= report["p95_ms"]
    assert report["target"] in ("avx2", "avx512", "avx512_vnni")
    assert bench_local(artifact_dir, 8, threads=2, runs=2, warmup=0)["threads"] == 2


def test_help_and_clear_errors(artifact_dir, tmp_path):
    assert _run(artifact_dir, "--help").returncode == 0
    assert "--bench" in _run(artifact_dir, "--help").stdout
    w = artifact_dir / "weights.bin"
    np.arange(1, 11, dtype=np.int64).tofile(tmp_path / "ids.i64")
    np.full(10, 5000, np.int64).tofile(tmp_path / "big.i64")
    cases = [
        ((tmp_path / "nope.bin", "--bench", "--seq", 4), "cannot read weights file"),
        ((w, "--bench"), "--seq is required"),
        ((w, "--bench", "--seq", 65), "max sequence 64"),
        ((w, "--seq", 10, "--out", tmp_path / "o"), "--ids and --out are required"),
        ((w, "--ids", tmp_path / "missing.i64", "--seq", 10, "--out", tmp_path / "o"), "cannot open --ids file"),
        ((w, "--ids", tmp_path / "ids.i64", "--seq", 9, "--out", tmp_path / "o"), "expected 72"),
        ((w, "--ids", tmp_path / "big.i64", "--seq", 10, "--out", tmp_path / "o"), "outside 0..99"),
        ((w, "--bench", "--seq", 4, "--threads", "x"), "--threads needs an integer"),
        ((w, "--bench", "--seq", 4, "--frobnicate", 1), "unknown option --frobnicate"),
    ]
    for args, message in cases:
        proc = _run(artifact_dir, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("canao-run: ") and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
    # a weights file of the wrong size is the model's refusal (exit 1), not an argument error
    (tmp_path / "short.bin").write_bytes(b"CANAOW01" + b"\0" * 100)
    proc = _run(artifact_dir, tmp_path / "short.bin", "--bench", "--seq", 4)
    assert proc.returncode == 1 and "expects" in proc.stderr
    with pytest.raises(CanaoError, match="outside 0..99"):
        run_local(artifact_dir, np.full((1, 10), 5000))


def test_manifest_lists_the_runner(compiled):
    assert compiled.manifest["runner"] == "canao-run" and "canao-run" in compiled.manifest["checksums"]
    assert compiled.manifest["target"]["arch"] == "x86_64"


def test_profile_times_every_kernel(artifact_dir):
    """CANAO_PROFILE=1: a table of thread-CPU ms per kernel (same-shaped layers summed) on stderr at close;
    without it, nothing."""
    import os

    args = [artifact_dir / "weights.bin", "--bench", "--seq", 16, "--threads", 2, "--warmup", 1, "--runs", 2]
    proc = subprocess.run([str(artifact_dir / "canao-run"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "CANAO_PROFILE": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("canao profile: 3 runs, "), proc.stderr
    rows = [line.split() for line in lines[1:]]
    assert any("attention" in r for r in rows) and any("layernorm" in r for r in rows)
    assert any(r[4] == "matmul" and r[5].startswith("K") and r[6].startswith("N") for r in rows)  # GEMM shapes
    assert rows[-1][-2:] == ["join", "waits"]
    assert abs(sum(float(r[2].rstrip("%")) for r in rows) - 100) < 1.0
    plain = _run(artifact_dir, *args)
    assert plain.returncode == 0 and plain.stderr == ""
