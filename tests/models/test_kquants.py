"""k-quants (Q4_K, Q5_K, Q6_K): canao's quantizer writes ggml's blocks (the `gguf` package's reference
dequantizer reads them back bitwise as ours and as the C kernels' do), the C GEMVs equal a float
reference on every x86 build this machine runs and under qemu on aarch64, and SmolLM2 compiled at the
mixes tracks PyTorch on the same weights, with a k-quant GGUF's blocks copied as they are."""

import json
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from canao.compiler.build import KERNEL_DIR, compiler
from canao.compiler.decoder import CompiledDecoder, compile_decoder
from canao.models import kquants
from canao.compiler.decoder.pack import FORMATS, Source, row_bytes
from canao.compiler.targets import TARGETS, X86_VARIANTS, host_target, is_cross
from canao.errors import CanaoError
from canao.models import gguf_loader
from canao.models.gguf_convert import convert_gguf

KQ = kquants.FORMATS
TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
        "structure in Paris. Its base is square, measuring 125 metres on each side.")

# A GEMV and a dequantization through the kernels' own functions: argv type rows k n in out.
# in: weights, then n x k float activations; out: dequantized weights (dequant_panel), the activations
# as the kernels quantized them, y for all n tokens at once, y for each token alone.
HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include "canao_decoder_kernels.h"

#define DOT(N) switch (type) {                                                              \
    case WT_Q8_0: dot_q8_0_n(w, xq, xd, nb, N, k, nb, y); break;                            \
    case WT_Q4_1: dot_q4_1_n(w, xq, xd, xs, nb, N, k, nb, y); break;                        \
    case WT_Q4_K: dot_q4_k_n(w, xq, xd, xs, nb, N, k, nb, y); break;                        \
    case WT_Q5_K: dot_q5_k_n(w, xq, xd, xs, nb, N, k, nb, y); break;                        \
    default: dot_q6_k_n(w, xq, xd, xs, nb, N, k, nb, y); } break;

static void dot(int type, const uint8_t *w, const int8_t *xq, const float *xd, const float *xs, int k, int n, float *y) {
    const int nb = k / QK;
    switch (n) { case 1: DOT(1) case 2: DOT(2) case 3: DOT(3) case 4: DOT(4) case 5: DOT(5) case 6: DOT(6)
                 case 7: DOT(7) default: DOT(8) }
}

int main(int argc, char **argv) {
    (void)argc;
    const int type = atoi(argv[1]), rows = atoi(argv[2]), k = atoi(argv[3]), n = atoi(argv[4]);
    const long rb = (long)k / block_weights(type) * block_bytes(type);
    uint8_t *w = malloc(rows * rb);
    float *x = malloc(sizeof(float) * n * k), *panel = malloc(sizeof(float) * NR * k), *out = malloc(sizeof(float) * rows * k);
    int8_t *xq = malloc(n * k);
    float *xd = malloc(sizeof(float) * n * k / QK), *xs = malloc(sizeof(float) * n * k / QK);
    FILE *f = fopen(argv[5], "rb");
    if (fread(w, 1, rows * rb, f) != (size_t)(rows * rb) || fread(x, sizeof(float), n * k, f) != (size_t)(n * k)) return 1;
    fclose(f);
    f = fopen(argv[6], "wb");
    for (int r0 = 0; r0 < rows; r0 += NR) {
        const int nr = rows - r0 < NR ? rows - r0 : NR;
        dequant_panel(type, w, rb, r0, nr, k, panel);
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < k; c++) out[(long)(r0 + r) * k + c] = panel[(long)c * NR + r];
    }
    fwrite(out, sizeof(float), (size_t)rows * k, f);
    for (int t = 0; t < n; t++) {
        quantize_row_q8(x + t * k, k, xq + t * k, xd + t * (k / QK), xs + t * (k / QK));
        for (int c = 0; c < k; c++) out[c] = xq[t * k + c] * xd[t * (k / QK) + c / QK];
        fwrite(out, sizeof(float), k, f);
    }
    float y[8];
    for (int r = 0; r < rows; r++) {
        dot(type, w + r * rb, xq, xd, xs, k, n, y);
        fwrite(y, sizeof(float), n, f);
    }
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < n; t++) {
            dot(type, w + r * rb, xq + t * k, xd + t * (k / QK), xs + t * (k / QK), k, 1, y);
            fwrite(y, sizeof(float), 1, f);
        }
    fclose(f);
    return 0;
}
"""

HAVE_QEMU = bool(shutil.which("qemu-aarch64") and shutil.which("aarch64-linux-gnu-gcc"))


def _builds():
    """Every kernel build this machine runs: the host's, AVX2 where the host is wider, the portable C
    path (the AVX2 flags with __AVX2__ undefined) and aarch64 under qemu where installed."""
    host = host_target()
    builds = [(host.name, host, [])]
    if host.arch == "x86_64":
        if host.name != "avx2":
            builds.append(("avx2", TARGETS["avx2"], []))
        builds.append(("portable", TARGETS["avx2"], ["-U__AVX2__"]))
    if HAVE_QEMU and host.arch != "aarch64":
        builds.append(("aarch64", TARGETS["aarch64"], ["-static"]))
    return builds


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    root = tmp_path_factory.mktemp("kq-harness")
    (root / "harness.c").write_text(HARNESS)
    exes = {}
    for name, target, extra in _builds():
        exe = root / f"harness-{name}"
        subprocess.run([compiler(target), "-O2", *target.cflags, *extra, "-I", str(KERNEL_DIR), "-include",
                        target.vec_header, str(root / "harness.c"), "-o", str(exe), "-lm"], check=True)
        exes[name] = (["qemu-aarch64", "-cpu", "max"] if is_cross(target) else []) + [str(exe)]

    def run(build, fmt, rows_bytes, x):
        rows, k, n = rows_bytes.shape[0], x.shape[1], x.shape[0]
        (root / "in.bin").write_bytes(rows_bytes.tobytes() + x.astype(np.float32).tobytes())
        subprocess.run([*exes[build], str(FORMATS[fmt]), str(rows), str(k), str(n), str(root / "in.bin"),
                        str(root / "out.bin")], check=True)
        out = np.fromfile(root / "out.bin", np.float32)
        sizes = np.cumsum([rows * k, n * k, rows * n])
        w, xdq, y_n, y_1 = np.split(out, sizes)
        return w.reshape(rows, k), xdq.reshape(n, k), y_n.reshape(rows, n), y_1.reshape(rows, n)

    return run


def _weights(rows, k, seed):
    """Gaussian rows with the cases a quantizer can trip on: an outlier, an all-zero row, a constant
    positive row, an all-negative row, and tiny values."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, k)).astype(np.float32) * 0.02
    w[0, 5] = 0.5
    w[1] = 0.0
    w[2] = 0.01
    w[3] = -np.abs(w[3])
    w[4] *= 1e-4
    return w


def _rmse(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)))


# reconstruction error relative to Q4_1 (gguf's reference quantizer) on the same weights; ggml's own
# k-quants are about 0.9 / 0.45 / 0.23 of Q4_1 on Gaussian weights
RMSE_VS_Q4_1 = {"Q4_K": 0.97, "Q5_K": 0.5, "Q6_K": 0.25}


@pytest.fixture(scope="module")
def real_rows():
    """Real weights: 2048 rows of SmolLM2's Q8_0 embedding, 512 of their 576 columns."""
    t = gguf_loader.open_gguf(Source("smollm2").path).tensors["token_embd.weight"]
    raw = np.asarray(t.data, np.uint8).reshape(int(t.shape[1]), -1)[:2048]
    return gguf.quants.dequantize(raw, t.tensor_type)[:, :512].copy()


@pytest.mark.parametrize("fmt", KQ)
def test_blocks_dequantize_as_the_gguf_reference_and_beat_q4_1(fmt, harness, real_rows):
    w = _weights(40, 768, seed=1)
    blocks = kquants.quantize(w, fmt)
    assert blocks.shape == (40, 3 * kquants.BLOCK_BYTES[fmt]) and blocks.dtype == np.uint8
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[fmt])
    ours = kquants.dequantize(blocks, fmt)
    assert np.array_equal(ref, ours)
    c_dequant = harness(host_target().name, fmt, blocks, np.zeros((1, 768), np.float32))[0]
    assert np.array_equal(c_dequant, ref)
    assert not ours[1].any() and np.abs(ours[2] - 0.01).max() < 1e-4
    q41 = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1), gguf.GGMLQuantizationType.Q4_1)
    assert _rmse(ours, w) < RMSE_VS_Q4_1[fmt] * _rmse(q41, w)
    real = kquants.dequantize(kquants.quantize(real_rows, fmt), fmt)
    q41 = gguf.quants.dequantize(gguf.quants.quantize(real_rows, gguf.GGMLQuantizationType.Q4_1),
                                 gguf.GGMLQuantizationType.Q4_1)
    assert _rmse(real, real_rows) < RMSE_VS_Q4_1[fmt] * _rmse(q41, real_rows)


@pytest.mark.parametrize("build", [b[0] for b in _builds()])
def test_gemv_equals_a_float_reference_and_batches_bitwise(build, harness):
    rng = np.random.default_rng(2)
    k, rows, n = 512, 20, 5
    x = rng.standard_normal((n, k)).astype(np.float32)
    x[1] *= 1e3
    x[2, :100] = 0.0
    for fmt in (*KQ, "Q4_1", "Q8_0"):
        w = _weights(rows, k, seed=3)
        blocks = kquants.quantize(w, fmt) if fmt in KQ else gguf.quants.quantize(w, gguf.GGMLQuantizationType[fmt])
        assert blocks.shape[1] == row_bytes(fmt, k)
        deq, xdq, y_n, y_1 = harness(build, fmt, blocks, x)
        assert np.array_equal(deq, gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[fmt])), fmt
        ref = deq.astype(np.float64) @ xdq.T.astype(np.float64)
        scale = np.abs(deq).astype(np.float64) @ np.abs(xdq).T.astype(np.float64)
        assert (np.abs(y_n - ref) <= 1e-5 * scale + 1e-30).all(), (fmt, np.abs(y_n - ref).max())
        assert np.array_equal(y_n, y_1), fmt  # a token in a batch gets bitwise what it gets alone


def test_builds_this_machine_cannot_run_compile(tmp_path):
    """AVX-512 (vpdpbusd in dot_u8s8 with VNNI) where the host is AVX2: compiled, not run."""
    (tmp_path / "harness.c").write_text(HARNESS)
    ran = {b[0] for b in _builds()}
    for name in X86_VARIANTS:
        if name not in ran and host_target().arch == "x86_64":
            target = TARGETS[name]
            subprocess.run([compiler(target), "-O2", *target.cflags, "-I", str(KERNEL_DIR), "-include", target.vec_header,
                            "-c", str(tmp_path / "harness.c"), "-o", str(tmp_path / f"{name}.o")], check=True)


def test_rows_not_a_multiple_of_256_are_a_clear_error():
    with pytest.raises(CanaoError, match=r"blk.0.ffn_up.weight: rows of 576 .*Q4_K.*q8_0 or q4_1"):
        kquants.quantize(np.zeros((4, 576), np.float32), "Q4_K", "blk.0.ffn_up.weight")
    with pytest.raises(CanaoError, match=r"attn_q.weight: rows of 576 .*Q6_K"):
        Source("smollm2").matrix("layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", "Q6_K")


def test_mix_formats_follow_llama_cpp():
    more = [i for i in range(30) if kquants.use_more_bits(i, 30)]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert kquants.mix_format("q4_k_m", "blk.5.attn_v.weight", 1024, 30) == "Q6_K"
    assert kquants.mix_format("q4_k_m", "blk.6.attn_v.weight", 1024, 30) == "Q4_K"
    assert kquants.mix_format("q5_k_m", "blk.6.ffn_down.weight", 1024, 30) == "Q5_K"
    assert kquants.mix_format("q5_k_m", "output.weight", 1024, 30) == "Q6_K"
    assert kquants.mix_format("q4_k_m", "blk.6.attn_q.weight", 576, 30) == "Q4_1"  # llama.cpp: Q5_0
    assert kquants.mix_format("q6_k", "blk.6.attn_q.weight", 576, 30) == "Q8_0"


HF_TO_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
              "up_proj": "ffn_up", "down_proj": "ffn_down"}


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_m"])
def test_llama_folder_with_256_wide_rows_uses_every_format_and_equals_pytorch(mix, tmp_path):
    """A random Llama from a HF folder whose rows all split into super-blocks: the mix's base format,
    Q6_K on some V / down projections (V rows a GEMV of their own) and on the untied output. A prompt
    runs the panel GEMM on the dequantized weights (equal to PyTorch on the same weights to fp32
    rounding); decode steps run the int8 GEMVs."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from canao.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    n = 8
    cfg = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_layers=n, num_heads=4, num_kv_heads=2,
                      head_dim=64, max_seq_len=64, tie_embeddings=False)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    folder = tmp_path / "llama"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 300, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": n,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 64,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}))
    tok = Tokenizer(models.BPE())  # any byte-level BPE: the model never decodes text here
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    summary = compile_decoder(folder, tmp_path / mix, precision=mix, max_seq=64, kv_cache="f32")
    base = kquants.MIXES[mix][0]
    assert summary["weights"]["matrix_formats"] == {base: 7 * n - 8, "Q6_K": 8}  # V and down on layers 0, 3, 6, 7
    assert summary["weights"]["output_format"] == "Q6_K" and summary["weights"]["requantized"] == 7 * n + 2
    # PyTorch on the weights as packed
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "embed_tokens.weight":
                q8 = gguf.GGMLQuantizationType.Q8_0
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q8), q8)))
            elif p.dim() == 2:
                parts = name.split(".")
                gname = "output.weight" if name == "lm_head.weight" else f"blk.{parts[1]}.{HF_TO_GGUF[parts[3]]}.weight"
                fmt = kquants.mix_format(mix, gname, p.shape[1], n)
                p.copy_(torch.from_numpy(kquants.dequantize(kquants.quantize(p.numpy(), fmt), fmt)))
    ids = list(np.random.default_rng(0).integers(0, 300, 24))
    with torch.inference_mode():
        ref = model(torch.tensor([ids]), model.new_cache(64), 0)[0].numpy()
    decoder = CompiledDecoder(summary["artifact"], threads=2)
    assert np.abs(decoder.forward_all(ids[:16], 0) - ref[:16]).max() < 1e-4 * np.abs(ref[:16]).max()
    for pos in range(16, 24):
        got = decoder.forward([ids[pos]], pos)
        assert np.abs(got - ref[pos]).max() < 0.03 * np.abs(ref[pos]).max(), pos


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2 written as Q4_K_M and Q6_K GGUFs by canao's converter (k-quant tensors through gguf's
    GGUFWriter), each compiled at its mix (so its blocks are copied) and its PyTorch model."""
    from canao.apps.generate import Generator

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("kq-smol")
    out = {}
    for mix in ("q4_k_m", "q6_k"):
        path = convert_gguf("smollm2", root / f"smollm2-{mix}.gguf", mix.upper())
        out[mix] = (path, compile_decoder(path, root / mix, precision=mix, max_seq=64), Generator.load(str(path), threads=1))
    return out


def _compare(pytorch, artifact, n=32):
    """The artifact's logits (a 4-token prefill, then decode steps) against PyTorch's on the same weights."""
    ids = pytorch.tokenizer.encode(TEXT)[:n]
    with torch.inference_mode():
        ref = pytorch.model(torch.tensor([ids]), pytorch.model.new_cache(len(ids)), 0)[0].numpy()[3:]
    decoder = CompiledDecoder(artifact, threads=2)
    got = [decoder.forward(ids[:4], 0).copy()]
    for pos in range(4, len(ids)):
        got.append(decoder.forward([ids[pos]], pos).copy())
    return np.stack(got), ref


def test_smollm2_q4_k_m_from_its_file_is_raw_and_tracks_pytorch(smol):
    path, summary, pytorch = smol["q4_k_m"]
    tensors = gguf_loader.open_gguf(path).tensors
    kinds = {n: t.tensor_type.name for n, t in tensors.items()}
    # 576-wide rows fall back (Q4_1, Q8_0); the 1536-wide down projections are Q4_K or Q6_K
    assert kinds["blk.5.ffn_down.weight"] == "Q6_K" and kinds["blk.6.ffn_down.weight"] == "Q4_K"
    assert kinds["blk.5.attn_v.weight"] == "Q8_0" and kinds["blk.6.attn_v.weight"] == "Q4_1"
    w = summary["weights"]
    assert w["copied_from_source"] == 211 and w["requantized"] == 0
    assert w["matrix_formats"] == {"Q4_1": 166, "Q8_0": 14, "Q4_K": 16, "Q6_K": 14}
    # the file's blocks are in weights.bin as they are, and quantizing SmolLM2's own Q4_1 matrices
    # (compiling smollm2 at q4_k_m) gives the same blocks
    blob = (Path(summary["artifact"]) / "weights.bin").read_bytes()
    assert np.asarray(tensors["blk.5.attn_v.weight"].data).tobytes() in blob  # Q8_0 V rows after Q4_1 Q and K
    smollm2 = Source("smollm2")
    for i, fmt in ((5, "Q6_K"), (6, "Q4_K")):
        blocks = np.asarray(tensors[f"blk.{i}.ffn_down.weight"].data, np.uint8)
        assert blocks.tobytes() in blob
        rows, raw = smollm2.matrix(f"layers.{i}.mlp.down_proj.weight", f"blk.{i}.ffn_down.weight", fmt)
        assert not raw and np.array_equal(rows, blocks.reshape(rows.shape))
    got, ref = _compare(pytorch, summary["artifact"])
    assert np.abs(got - ref).max() < 2.0  # only the GEMVs' int8 activations differ
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_smollm2_q6_k_tracks_pytorch(smol):
    path, summary, pytorch = smol["q6_k"]
    w = summary["weights"]
    assert w["copied_from_source"] == 211 and w["matrix_formats"] == {"Q8_0": 180, "Q6_K": 30}
    got, ref = _compare(pytorch, summary["artifact"])
    assert np.abs(got - ref).max() < 1.0
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


@pytest.mark.skipif(not HAVE_QEMU, reason="needs qemu-user and gcc-aarch64-linux-gnu (scripts/setup.sh installs both)")
def test_aarch64_q4_k_m_under_qemu_matches_x86(smol, tmp_path):
    """The mixed formats' NEON dispatch: the same greedy tokens and logits (to the fp16 KV cache's rounding)."""
    path, summary, _ = smol["q4_k_m"]
    arm = compile_decoder(path, tmp_path / "arm", precision="q4_k_m", max_seq=64, target="aarch64")["artifact"]
    prompt = [1, 9690, 198, 2683]
    subprocess.run(["qemu-aarch64", "-cpu", "max", f"{arm}/canao-run", f"{arm}/weights.bin", "--ids",
                          ",".join(map(str, prompt)), "--generate", "1", "--logits", str(tmp_path / "arm.f32")],
                   check=True, capture_output=True)
    decoder = CompiledDecoder(summary["artifact"], threads=1)
    expected = decoder.forward(prompt, 0).copy()
    got = np.fromfile(tmp_path / "arm.f32", np.float32)
    assert np.abs(got - expected).max() < 0.1 and got.argmax() == expected.argmax()
