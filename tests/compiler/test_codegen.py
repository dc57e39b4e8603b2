import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canao.compiler import compile_model, load_artifact
from canao.errors import CanaoError
from canao.compiler.targets import TARGETS, host_target
from compiler_helpers import random_inputs, small_model

FP32_TOL = 1e-4


def _max_err(got, want):
    return max((torch.as_tensor(a) - b).abs().max().item() for a, b in zip(got, want))


@pytest.mark.parametrize("seq,pad", [(1, 0), (2, 0), (7, 0), (33, 5), (64, 10)])
def test_compiled_matches_pytorch_at_every_length(model, compiled, seq, pad):
    ids, tt, mask = random_inputs(seq, pad=pad, seed=seq)
    with torch.no_grad():
        want = model(ids, tt, mask)
    assert _max_err(compiled.run(ids, tt, mask), want) <= FP32_TOL


def test_batch_threads_and_numpy_inputs(model, compiled):
    ids, tt, mask = random_inputs(20, pad=3)
    ids = torch.cat([ids, ids.flip(1)])
    tt, mask = torch.cat([tt, tt]), torch.cat([mask, mask.flip(1)])
    with torch.no_grad():
        want = model(ids, tt, mask)
    for threads in (1, 2, 3):
        compiled.set_threads(threads)
        start, end = compiled.run(ids.numpy(), tt.numpy(), mask.numpy())
        assert isinstance(start, np.ndarray) and start.dtype == np.float32 and start.shape == (2, 20)
        assert _max_err((start, end), want) <= FP32_TOL
    compiled.set_threads(2)


def test_longer_than_max_seq_is_refused(compiled):
    ids, tt, mask = random_inputs(65)
    with pytest.raises(CanaoError, match="max-seq"):
        compiled.run(ids, tt, mask)


def test_manifest_records_target_memory_and_fusion(compiled):
    m = compiled.manifest
    assert m["precision"] == "fp32" and m["max_seq"] == 64 and m["target"]["name"] == host_target().name
    assert 0 < m["memory"]["arena_peak_bytes"] < m["memory"]["arena_naive_bytes"]
    assert m["fusion"]["kernels_after"] == len([k for k in m["kernels"] if not k.endswith("pack_kt")])
    assert m["phases"] == 3  # embeddings + QKV, then one phase per layer: one barrier each
    assert {"model.c", "libcanao_model.so", "weights.bin"} <= set(m["checksums"])


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(layers=st.integers(1, 3), data=st.data())
def test_random_architectures_of_the_search_space(tmp_path_factory, layers, data):
    head_dim = data.draw(st.sampled_from([8, 16]))
    hidden = data.draw(st.sampled_from([24, 32, 40]))
    heads = data.draw(st.lists(st.integers(1, 4), min_size=layers, max_size=layers))
    ffn = data.draw(st.lists(st.integers(1, 70), min_size=layers, max_size=layers))
    model = small_model(hidden=hidden, heads=heads, ffn=ffn, head_dim=head_dim, seed=layers)
    out = tmp_path_factory.mktemp("prop") / "a"
    compile_model(model, out, max_seq=40)
    cm = load_artifact(out, threads=2)
    for seq in (3, data.draw(st.integers(1, 40))):
        ids, tt, mask = random_inputs(seq, pad=seq // 3)
        with torch.no_grad():
            want = model(ids, tt, mask)
        assert _max_err(cm.run(ids, tt, mask), want) <= FP32_TOL


@pytest.mark.parametrize("block_rows,threads", [(6, 2), (6, 3), (12, 1)])
def test_small_row_blocks_taken_by_several_threads(model, artifact_dir, monkeypatch, block_rows, threads):
    """Many row blocks, taken dynamically: every phase's blocks in any order give the same result."""
    monkeypatch.setenv("CANAO_BLOCK_ROWS", str(block_rows))
    monkeypatch.setenv("CANAO_BLOCKS_PER_THREAD", "3")
    cm = load_artifact(artifact_dir, threads=threads)
    ids, tt, mask = random_inputs(61, pad=7, seed=5)
    with torch.no_grad():
        want = model(ids, tt, mask)
    for _ in range(3):
        assert _max_err(cm.run(ids, tt, mask), want) <= FP32_TOL
    cm.close()


@pytest.mark.parametrize("target,precision,instruction", [
    ("avx512", "int8", "vpmaddubsw"),
    ("avx512_vnni", "int8", "vpdpbusd"), ("avx512_vnni", "bf16", "vdpbf16ps")])
def test_avx512_code_compiles(model, tmp_path, target, precision, instruction):
    """This CPU may lack AVX-512: those builds are compiled (not run), and use the instruction they are for."""
    import subprocess

    from canao.compiler.build import BASE_FLAGS, compiler, copy_support_files
    from canao.compiler.codegen.c import generate
    from canao.compiler.frontend import capture
    from canao.compiler.passes import optimize
    from canao.compiler.targets import TARGETS

    g, _ = optimize(capture(model, 32), 32)
    prog = generate(g, TARGETS[target], 32, precision=precision)
    (tmp_path / "model.c").write_text(prog.source)
    copy_support_files(tmp_path)
    flags = [f for f in BASE_FLAGS if f not in ("-shared", "-O3")] + ["-O1", *TARGETS[target].cflags]
    for src, out in (("model.c", "-S"), ("canao_runtime.c", "-c")):
        proc = subprocess.run([compiler(), *flags, out, "-I", str(tmp_path), str(tmp_path / src),
                               "-o", str(tmp_path / (src + ".out"))], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[:2000]
    assert instruction in (tmp_path / "model.c.out").read_text()


@pytest.mark.parametrize("precision,tol", [("bf16", 5e-3), ("int8", 5e-2)])
def test_reduced_precision_runs_here_close_to_pytorch(model, tmp_path, precision, tol):
    """bf16 weights (widened on AVX2) and int8 (vpmaddubsw/vpmaddwd on AVX2) at several lengths and threads."""
    out = tmp_path / precision
    summary = compile_model(model, out, max_seq=64, precision=precision, tune=False)
    fp32_bytes = sum(p.numel() for p in model.parameters()) * 4
    assert summary["memory"]["weight_bytes"] < (0.75 if precision == "bf16" else 0.5) * fp32_bytes
    cm = load_artifact(out, threads=2)
    for seq, threads in ((9, 1), (64, 2)):
        cm.set_threads(threads)
        ids, tt, mask = random_inputs(seq, pad=2, seed=seq)
        with torch.no_grad():
            want = model(ids, tt, mask)
        err = _max_err(cm.run(ids, tt, mask), want)
        assert 0 < err <= tol * max(1.0, max(w.abs().max().item() for w in want))
    cm.close()


@pytest.mark.parametrize("seq,pad,threads", [(7, 0, 1), (33, 5, 2), (64, 10, 2)])
def test_int8_attention_alone_stays_close_to_pytorch(model, tmp_path_factory, seq, pad, threads):
    """fp32 GEMMs with the int8 attention (quantized Q, K, V and probabilities, fp32 softmax): the
    error is the attention's own, at lengths that end inside a vector and a key panel."""
    out = tmp_path_factory.getbasetemp() / "fp32-int8-attention"
    if not (out / "manifest.json").exists():
        summary = compile_model(model, out, max_seq=64, precision="fp32", attention="int8", tune=False)
        assert summary["attention"] == "int8"
    cm = load_artifact(out, threads=threads)
    assert cm.manifest["attention"] == "int8" and "attention_rows_i8(" in (out / "model.c").read_text()
    ids, tt, mask = random_inputs(seq, pad=pad, seed=seq)
    with torch.no_grad():
        want = model(ids, tt, mask)
    err = _max_err(cm.run(ids, tt, mask), want)
    assert 1e-5 < err <= 5e-3 * max(1.0, max(w.abs().max().item() for w in want)), err
    cm.close()


def test_int8_models_default_to_int8_attention_and_fp32_attention_is_a_choice(model, tmp_path):
    from canao.compiler.codegen.c import generate
    from canao.compiler.frontend import capture
    from canao.compiler.passes import optimize

    g, _ = optimize(capture(model, 32), 32)
    assert generate(g, host_target(), 32, precision="int8").attention == "int8"
    assert generate(g, host_target(), 32, precision="bf16").attention == "fp32"
    fp32_att = generate(g, host_target(), 32, precision="int8", attention="fp32")
    assert fp32_att.attention == "fp32" and "attention_rows_i8(" not in fp32_att.source
    with pytest.raises(CanaoError, match="attention precision 'int4'"):
        generate(g, host_target(), 32, precision="int8", attention="int4")


def test_int8_packing_layout_and_column_sums():
    from canao.compiler.codegen.weights import quantize_int8

    rng = np.random.default_rng(0)
    w = rng.normal(size=(10, 20)).astype(np.float32)
    packed, colsum, scales = quantize_int8(w, 16, 63)
    assert packed.shape == (2, 3, 16, 4) and packed.dtype == np.int8 and np.abs(packed).max() == 63
    # unpack: [panel][k/4][col][k%4] -> [k][col]
    q = packed.transpose(1, 3, 0, 2).reshape(12, 32)
    assert (q[10:] == 0).all() and (q[:, 20:] == 0).all()
    np.testing.assert_allclose(q[:10, :20] * scales[:20], w, atol=scales.max() / 2 + 1e-6)
    assert (colsum == 128 * q.astype(np.int32).sum(0)).all()


X86 = [name for name, t in TARGETS.items() if t.arch == "x86_64"]


@pytest.mark.parametrize("target", X86)
@pytest.mark.parametrize("precision,tol", [("fp32", FP32_TOL), ("bf16", 5e-3), ("int8", 5e-2)])
def test_every_x86_target_this_cpu_runs_matches_pytorch(model, tmp_path, target, precision, tol):
    """Not only the host's own pick: an AVX-512 machine also builds and runs the AVX2 code (and the
    AVX-512 code without VNNI), so CI on either kind of host checks every path it can execute."""
    from canao.compiler.targets import host_arch, missing_features

    if host_arch() != "x86_64":
        pytest.skip(f"not an x86-64 host: the {target} build cannot run here")
    lacking = missing_features(TARGETS[target])
    if lacking:
        pytest.skip(f"this CPU lacks {', '.join(lacking)}: the {target} build is only compiled here "
                    "(test_avx512_code_compiles), not run")
    out = tmp_path / f"{target}-{precision}"
    summary = compile_model(model, out, max_seq=48, precision=precision, target=target, tune=False)
    assert summary["target"]["name"] == target
    cm = load_artifact(out, threads=2)
    assert cm.manifest["target"]["name"] == target
    for seq, threads in ((7, 1), (48, 2)):
        cm.set_threads(threads)
        ids, tt, mask = random_inputs(seq, pad=2, seed=seq)
        with torch.no_grad():
            want = model(ids, tt, mask)
        err = _max_err(cm.run(ids, tt, mask), want)
        assert err <= tol * max(1.0, max(w.abs().max().item() for w in want)), (target, precision, err)
    cm.close()
