"""The aarch64 target: cross-compiled artifacts (NEON, sdot int8), run by their static canao-run under
qemu-aarch64 -cpu max and compared with PyTorch. qemu runs are slow: short sequences, few inputs."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from canao.compiler import compile_model, load_artifact
from canao.compiler.standalone import bench_local, run_local
from canao.errors import CanaoError
from compiler_helpers import random_inputs, small_model

# CI installs both (scripts/setup.sh): there the tests must run, never skip
pytestmark = pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64"))
                                and not os.environ.get("CI"),
                                reason="needs gcc-aarch64-linux-gnu and qemu-user (scripts/apt-packages.txt)")

FP32_TOL = 1e-4
REDUCED_TOL = {"bf16": 5e-3, "int8": 5e-2}  # test_codegen's x86 tolerances, relative to max(1, max |logit|)


def _err(got, want):
    return max(np.abs(np.asarray(g) - w.numpy()).max() for g, w in zip(got, want))


def _batch(seq, pad, vocab, seed):
    """Two rows: random ids (one padded), token types 0/1."""
    a, b = random_inputs(seq, vocab=vocab, pad=pad, seed=seed), random_inputs(seq, vocab=vocab, seed=seed + 1)
    return tuple(torch.cat([x, y]) for x, y in zip(a, b))


@pytest.mark.parametrize("seed,hidden,heads,ffn,head_dim", [
    (11, 40, (3, 1, 2), (70, 9, 33), 8),   # per-layer heads and FFN widths of the search space, odd sizes
    (12, 32, (2,), (64,), 16),
])
def test_fp32_random_encoders_match_pytorch_under_qemu(tmp_path, seed, hidden, heads, ffn, head_dim):
    from canao.compiler.standalone import RunnerModel
    from canao.compiler.verify import verify

    model = small_model(hidden=hidden, heads=heads, ffn=ffn, head_dim=head_dim, seed=seed)
    summary = compile_model(model, tmp_path / "a", max_seq=24, target="aarch64", tune=True)
    assert "nothing measured" in summary["tuning"]["note"]  # x86 timings say nothing about the device
    for seq, pad, threads in ((1, 0, 1), (24, 5, 2)):
        ids, tt, mask = _batch(seq, pad, 100, seed + seq)
        with torch.no_grad():
            want = model(ids, tt, mask)
        assert _err(run_local(tmp_path / "a", ids, tt, mask, threads=threads), want) <= FP32_TOL
    # `canao compile --verify` of a cross artifact: the same check through canao-run under qemu
    cases = [("padded", *_batch(13, 4, 100, seed))]
    assert verify(model, RunnerModel(tmp_path / "a", threads=2), cases)["max_abs_err"] <= FP32_TOL


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_reduced_precision_under_qemu(model, tmp_path, precision):
    out = tmp_path / precision
    compile_model(model, out, max_seq=32, target="aarch64", precision=precision)
    for seq, threads in ((9, 1), (32, 2)):
        ids, tt, mask = _batch(seq, 3, 100, seq)
        with torch.no_grad():
            want = model(ids, tt, mask)
        err = _err(run_local(out, ids, tt, mask, threads=threads), want)
        assert 0 < err <= REDUCED_TOL[precision] * max(1.0, max(w.abs().max().item() for w in want))
    source = (out / "model.c").read_text()
    if precision == "int8":
        # s8 activations (no +128 offset, no column-sum correction), full-range weights, sdot in the binary
        assert "activations per row (s8, no offset)" in source and "[-127, 127]" in source
        assert "attention_rows_i8(" in source  # the int8 attention's s8 x s8 path (ATT_PMAX 127)
        objdump = shutil.which("aarch64-linux-gnu-objdump")
        if objdump:
            asm = subprocess.run([objdump, "-d", str(out / "canao-run")], capture_output=True, text=True).stdout
            assert "\tsdot\t" in asm


def test_teacher_cli_compile_and_bench_under_qemu(teacher_dir, teacher, tmp_path, capsys):
    from canao.cli import main

    out = tmp_path / "teacher"
    assert main(["compile", "--model", str(teacher_dir), "--out", str(out), "--target", "aarch64",
                 "--max-seq", "32", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target"]["name"] == "aarch64" and summary["target"]["arch"] == "aarch64"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runner"] == "canao-run" and "canao-run" in manifest["checksums"]
    assert not (out / "libcanao_model.so").exists()  # x86 Python cannot dlopen it: canao-run only
    elf = (out / "canao-run").read_bytes()[:20]
    assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == 183  # EM_AARCH64
    if shutil.which("file"):
        assert "statically linked" in subprocess.run(["file", str(out / "canao-run")], capture_output=True,
                                                     text=True).stdout
    model, tokenizer = teacher
    enc = tokenizer.encode("Which target runs on phones?", "The aarch64 target runs canao models on phones.")
    ids, tt = torch.tensor([enc.ids]), torch.tensor([enc.type_ids])
    with torch.no_grad():
        want = model(ids, tt, torch.ones_like(ids))
    assert _err(run_local(out, ids, tt, threads=2), want) <= FP32_TOL
    report = bench_local(out, 8, threads=1, runs=1, warmup=0)
    assert report["target"] == "aarch64" and report["runs"] == 1 and report["median_ms"] > 0


@pytest.fixture(scope="module")
def arm_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("arm") / "a"
    compile_model(small_model(hidden=24, heads=(2,), ffn=(30,), head_dim=8, seed=3), out, max_seq=8,
                  target="aarch64")
    return out


def test_loading_an_aarch64_artifact_here_says_where_it_runs(arm_artifact, capsys):
    with pytest.raises(CanaoError, match=r"built for aarch64.*run it on the device with canao-run"):
        load_artifact(arm_artifact)
    from canao.cli import main

    capsys.readouterr()
    assert main(["qa", "--model", str(arm_artifact), "--question", "q", "--context", "c"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "built for aarch64" in err and "canao-run" in err


def test_runner_without_qemu_is_a_clear_error(arm_artifact, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(CanaoError, match="install qemu-user"):
        run_local(arm_artifact, np.ones((1, 4), np.int64))
    # an explicit launcher list is used as given (here: none, so the kernel refuses the ARM binary)
    with pytest.raises(CanaoError):
        run_local(arm_artifact, np.ones((1, 4), np.int64), launcher=[])


def test_missing_cross_compiler_names_the_package(model, tmp_path, monkeypatch):
    monkeypatch.setenv("CANAO_AARCH64_CC", "aarch64-nonexistent-linux-gnu-gcc")
    with pytest.raises(CanaoError, match="aarch64-nonexistent-linux-gnu-gcc.*Debian package gcc-aarch64-nonexistent"):
        compile_model(model, tmp_path / "a", max_seq=8, target="aarch64")
    assert not (tmp_path / "a").exists()  # no half artifact under the final name
    monkeypatch.delenv("CANAO_AARCH64_CC")
    from canao.compiler.build import compiler
    from canao.compiler.targets import TARGETS

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(CanaoError, match="install the Debian package gcc-aarch64-linux-gnu"):
        compiler(TARGETS["aarch64"])
