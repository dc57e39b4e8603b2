"""Read GGUF files (llama.cpp's format) into float32 PyTorch tensors and model configs.

The `gguf` package parses the file and knows the quantized block layouts; this module adds
what a PyTorch model needs on top: metadata as plain Python values, dequantized tensors in
PyTorch's [out, in] orientation, llama.cpp tensor names mapped to our module names, and the
undoing of the Q/K row permutation llama.cpp's converter applies for its RoPE kernel.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CanaoError
from .limits import check_sizes

# Tensor types we dequantize. The reference numpy kernels in `gguf.quants` cover more
# (the other k-quants, IQ*), but these are the ones this project is tested on.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_ARCHS = ("llama", "qwen2", "phi3", "gpt2")
# run by canao.models.llama.Llama: Qwen2 is Llama with biases on q, k and v; Phi-3 is Llama with
# Q/K/V in one matrix and gate/up in another. Neither permutes Q/K rows in the file (llama.cpp
# rotates their heads in halves, "NEOX" style, as HF does).
LLAMA_FAMILY = ("llama", "qwen2", "phi3")


@dataclass
class GGUFFile:
    """An opened GGUF: its metadata (plain Python values) and its tensors by name."""

    path: Path
    metadata: dict = field(repr=False)
    tensors: dict = field(repr=False)  # name -> gguf.ReaderTensor (memory-mapped, not yet decoded)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str):
        if key not in self.metadata:
            raise CanaoError(f"{self.path}: GGUF metadata key '{key}' is missing; the file is incomplete or not a model")
        return self.metadata[key]


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse the header, metadata and tensor index; tensor data stays memory-mapped."""
    import gguf  # imported here so that the package loads without it for encoder-only work

    path = Path(path)
    if not path.is_file():
        raise CanaoError(f"GGUF file not found: {path}")
    check_structure(path)
    try:
        reader = gguf.GGUFReader(str(path))
        metadata = {name: f.contents() for name, f in reader.fields.items()}
        tensors = {t.name: t for t in reader.tensors}
    except Exception as exc:  # the reader raises ValueError, struct/numpy errors, IndexError... on bad bytes
        raise CanaoError(
            f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}); it is corrupt or truncated, "
            "download or convert it again"
        ) from None
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)


# value type -> bytes of one scalar (8: string, 9: array are variable)
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS


class _Bounded:
    """Reads little-endian fields of a file, refusing any count or length the remaining bytes cannot hold."""

    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path, self.pos = f, size, path, 0

    def fail(self, what: str):
        raise CanaoError(f"{self.path}: not a valid GGUF file ({what} at byte {self.pos}); it is corrupt or "
                         "truncated, download or convert it again")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"{n} bytes needed, {self.size - self.pos} left")
        data = self.f.read(n)
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"{n} bytes needed, {self.size - self.pos} left")
        self.f.seek(n, 1)
        self.pos += n

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self, limit: int | None = None) -> bytes:
        n = self.u64()
        if limit is not None and n > limit:
            self.fail(f"a name of {n} bytes")
        return self.take(n)

    def value(self, vtype: int, depth: int = 0) -> None:
        if vtype in _SCALAR_BYTES:
            self.skip(_SCALAR_BYTES[vtype])
        elif vtype == 8:
            self.skip(self.u64())
        elif vtype == 9 and depth < 2:
            etype, count = self.u32(), self.u64()
            least = _SCALAR_BYTES.get(etype, 8 if etype == 8 else 12 if etype == 9 else 0)
            if least == 0:
                self.fail(f"array of unknown value type {etype}")
            if count * least > self.size - self.pos:  # before the loop: a huge count must not spin
                self.fail(f"an array of {count} values")
            if etype in _SCALAR_BYTES:
                self.skip(count * least)
            else:
                for _ in range(count):
                    self.value(etype, depth + 1)
        else:
            self.fail(f"value type {vtype}")


def check_structure(path: Path) -> None:
    """Walk the header, metadata and tensor index with every count, length, dimension and offset checked
    against the file's size, before the `gguf` package (which trusts them) reads it: a crafted count makes
    its reader loop for hours or allocate without bound."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Bounded(f, size, path)
        if r.take(4) != b"GGUF":
            r.fail("no GGUF magic")
        version = r.u32()
        if version not in (2, 3):
            r.fail(f"GGUF version {version}; canao reads versions 2 and 3")
        n_tensors, n_kv = r.u64(), r.u64()
        if n_tensors * 32 + n_kv * 13 > size:  # the least a tensor entry / a key-value pair takes
            r.fail(f"{n_tensors} tensors and {n_kv} metadata entries in {size} bytes")
        alignment = 32
        for _ in range(n_kv):
            key = r.string(limit=1 << 16)
            vtype = r.u32()
            if key == b"general.alignment" and vtype == 4:
                alignment = r.u32()
                if alignment == 0 or alignment & (alignment - 1):
                    r.fail(f"alignment {alignment}")
            else:
                r.value(vtype)
        spans = []
        for _ in range(n_tensors):
            name = r.string(limit=1 << 16)
            n_dims = r.u32()
            if not 1 <= n_dims <= _MAX_DIMS:
                r.fail(f"tensor {name[:64]!r} with {n_dims} dimensions")
            dims = [r.u64() for _ in range(n_dims)]
            ttype, offset = r.u32(), r.u64()
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                r.fail(f"tensor {name[:64]!r} of unknown type {ttype}")
            count = 1
            for d in dims:
                count *= d
            if count == 0 or count > size * 8 or count % block:
                r.fail(f"tensor {name[:64]!r} of shape {dims}")
            spans.append((name, offset, count // block * block_bytes))
        data_start = -(-r.pos // alignment) * alignment
        for name, offset, nbytes in spans:
            if data_start + offset + nbytes > size:
                r.fail(f"tensor {name[:64]!r} ends past the end of the file")


def dequantize(gf: GGUFFile, name: str) -> torch.Tensor:
    """One tensor as float32, shaped the PyTorch way (GGUF lists dimensions innermost first)."""
    from gguf import quants

    if name not in gf.tensors:
        raise CanaoError(f"{gf.path}: tensor '{name}' is missing; the file does not hold a complete {gf.architecture} model")
    t = gf.tensors[name]
    kind = t.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise CanaoError(
            f"{gf.path}: tensor '{name}' has type {kind}, which canao does not read; "
            f"re-quantize the model to one of {', '.join(SUPPORTED_TYPES)} (e.g. llama-quantize ... Q8_0)"
        )
    shape = tuple(int(d) for d in reversed(t.shape))
    try:
        values = quants.dequantize(t.data, t.tensor_type)
        array = np.asarray(values, dtype=np.float32).reshape(shape)
    except Exception as exc:
        raise CanaoError(f"{gf.path}: tensor '{name}' could not be decoded ({exc}); the file is corrupt") from None
    # Copy: the reader's arrays are read-only views of the memory map.
    return torch.from_numpy(array.copy())


def reverse_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation.

    HF Llama rotates halves of each head (rotate_half); llama.cpp rotates adjacent pairs, so its
    converter reorders each head's rows from [x0..x(d/2-1), y0..] to [x0, y0, x1, y1, ...].
    Going back: split each head's rows into (d/2, 2) and transpose to (2, d/2).
    """
    rows = w.shape[0]
    head_dim = rows // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- llama


def llama_config(gf: GGUFFile):
    from .llama import LlamaConfig

    arch = gf.architecture
    if arch not in LLAMA_FAMILY:
        raise CanaoError(f"{gf.path}: GGUF architecture '{arch}' is not one of {', '.join(LLAMA_FAMILY)}")
    n_embd = int(gf.require(f"{arch}.embedding_length"))
    n_head = int(gf.require(f"{arch}.attention.head_count"))
    check_sizes(gf.path, hidden_size=n_embd, num_heads=n_head)  # before they are divided
    head_dim = int(gf.get(f"{arch}.attention.key_length", n_embd // n_head))
    rope_dims = int(gf.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise CanaoError(f"{gf.path}: partial rotary embedding ({rope_dims} of {head_dim} dims) is not supported")
    if gf.get(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise CanaoError(f"{gf.path}: RoPE scaling '{gf.get(f'{arch}.rope.scaling.type')}' is not supported")
    if gf.get(f"{arch}.expert_count"):
        raise CanaoError(f"{gf.path}: mixture-of-experts {arch} models are not supported")
    if "rope_factors_long.weight" in gf.tensors:
        raise CanaoError(f"{gf.path}: LongRoPE (rope_factors_long, the 128k Phi-3 variants) is not supported; "
                         "use a 4k-context model")
    context = int(gf.get(f"{arch}.context_length", 2048))
    window = gf.get(f"{arch}.attention.sliding_window")
    if window:  # Phi-3's window: full attention is the same while the sequence fits it
        context = min(context, int(window) + 1)
    has_output = "output.weight" in gf.tensors
    biases = "blk.0.attn_q.bias" in gf.tensors
    vocab = gf.get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(gf.require("tokenizer.ggml.tokens"))
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=n_embd,
        intermediate_size=int(gf.require(f"{arch}.feed_forward_length")),
        num_layers=int(gf.require(f"{arch}.block_count")),
        num_heads=n_head,
        num_kv_heads=int(gf.get(f"{arch}.attention.head_count_kv", n_head)),
        head_dim=head_dim,
        rms_norm_eps=float(gf.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(gf.get(f"{arch}.rope.freq_base", 10000.0)),
        max_seq_len=context,
        tie_embeddings=not has_output,
        attention_bias=biases and "blk.0.attn_output.bias" in gf.tensors,
        qkv_bias=biases and "blk.0.attn_output.bias" not in gf.tensors,
    )


LLAMA_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


LLAMA_BIAS_NAMES = {"attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
                    "attn_v.bias": "self_attn.v_proj.bias", "attn_output.bias": "self_attn.o_proj.bias"}


def file_rows(gf: GGUFFile, config, gguf_name: str) -> tuple[str, int, int | None]:
    """Where the rows of a llama-style tensor name are in the file: (tensor, first row, end row or
    None for all). Phi-3 files fuse Q/K/V (attn_qkv) and gate/up (ffn_up holds gate, then up)."""
    if gf.architecture != "phi3" or gguf_name.split(".")[-2] not in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"):
        return gguf_name, 0, None
    block, part = gguf_name.rsplit(".", 2)[0], gguf_name.split(".")[-2]
    q, kv, ffn = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.intermediate_size
    spans = {"attn_q": ("attn_qkv", 0, q), "attn_k": ("attn_qkv", q, q + kv), "attn_v": ("attn_qkv", q + kv, q + 2 * kv),
             "ffn_gate": ("ffn_up", 0, ffn), "ffn_up": ("ffn_up", ffn, 2 * ffn)}
    fused, start, end = spans[part]
    return f"{block}.{fused}.weight", start, end


def permuted_heads(gf: GGUFFile, config, gguf_name: str) -> int:
    """How many heads llama.cpp's converter permuted the rows of this tensor in (0: none): Q and K of
    the llama architecture; Qwen2's converter leaves them as HF has them."""
    if gf.architecture != "llama":
        return 0
    part = gguf_name.split(".")[-2]
    return config.num_heads if part == "attn_q" else config.num_kv_heads if part == "attn_k" else 0


def llama_state_dict(gf: GGUFFile, config) -> dict[str, torch.Tensor]:
    """GGUF tensors renamed to `canao.models.llama.Llama` parameter names."""
    state = {
        "embed_tokens.weight": dequantize(gf, "token_embd.weight"),
        "norm.weight": dequantize(gf, "output_norm.weight"),
    }
    if not config.tie_embeddings:
        state["lm_head.weight"] = dequantize(gf, "output.weight")
    names = dict(LLAMA_BLOCK_NAMES)
    if config.attention_bias or config.qkv_bias:
        names.update((k, v) for k, v in LLAMA_BIAS_NAMES.items() if config.attention_bias or k != "attn_output.bias")
    for i in range(config.num_layers):
        for src, dst in names.items():
            name, start, end = file_rows(gf, config, f"blk.{i}.{src}")
            w = dequantize(gf, name)[start:end]
            heads = permuted_heads(gf, config, f"blk.{i}.{src}")
            state[f"layers.{i}.{dst}"] = reverse_permute(w, heads) if heads else w
    return state


# ---------------------------------------------------------------- gpt2


def gpt2_config(gf: GGUFFile):
    from .gpt2 import GPT2Config

    n_embd = int(gf.require("gpt2.embedding_length"))
    vocab = len(gf.require("tokenizer.ggml.tokens"))
    return GPT2Config(
        vocab_size=int(gf.get("gpt2.vocab_size", vocab)),
        n_positions=int(gf.require("gpt2.context_length")),
        n_embd=n_embd,
        n_layer=int(gf.require("gpt2.block_count")),
        n_head=int(gf.require("gpt2.attention.head_count")),
        n_inner=int(gf.get("gpt2.feed_forward_length", 4 * n_embd)),
        layer_norm_epsilon=float(gf.get("gpt2.attention.layer_norm_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in gf.tensors,
    )


GPT2_BLOCK_NAMES = {
    "attn_norm.weight": "ln_1.weight",
    "attn_norm.bias": "ln_1.bias",
    "attn_qkv.weight": "attn.c_attn.weight",
    "attn_qkv.bias": "attn.c_attn.bias",
    "attn_output.weight": "attn.c_proj.weight",
    "attn_output.bias": "attn.c_proj.bias",
    "ffn_norm.weight": "ln_2.weight",
    "ffn_norm.bias": "ln_2.bias",
    "ffn_up.weight": "mlp.c_fc.weight",
    "ffn_up.bias": "mlp.c_fc.bias",
    "ffn_down.weight": "mlp.c_proj.weight",
    "ffn_down.bias": "mlp.c_proj.bias",
}


def gpt2_state_dict(gf: GGUFFile, config) -> dict[str, torch.Tensor]:
    """GGUF tensors renamed to `canao.models.gpt2.GPT2` parameter names.

    llama.cpp stores GPT-2's matrices as ordinary [out, in] linear weights (its converter
    transposes HF's Conv1D), which is the layout our nn.Linear layers use, so no transpose here.
    """
    state = {
        "wte.weight": dequantize(gf, "token_embd.weight"),
        "wpe.weight": dequantize(gf, "position_embd.weight"),
        "ln_f.weight": dequantize(gf, "output_norm.weight"),
        "ln_f.bias": dequantize(gf, "output_norm.bias"),
    }
    if not config.tie_embeddings:
        state["lm_head.weight"] = dequantize(gf, "output.weight")
    for i in range(config.n_layer):
        for src, dst in GPT2_BLOCK_NAMES.items():
            state[f"h.{i}.{dst}"] = dequantize(gf, f"blk.{i}.{src}")
    return state


def check_architecture(gf: GGUFFile) -> str:
    arch = gf.architecture
    if arch not in SUPPORTED_ARCHS:
        raise CanaoError(
            f"{gf.path}: GGUF architecture '{arch}' is not supported; canao runs {', '.join(SUPPORTED_ARCHS)} "
            "(convert a supported model, e.g. SmolLM2 or GPT-2)"
        )
    return arch
