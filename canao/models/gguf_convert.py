"""Re-quantize a GGUF file to another weight type (e.g. SmolLM2's Q4_1 -> Q8_0), in Python.

Every block-quantized tensor of another type is dequantized and quantized again with the
`gguf` package's reference kernels (canao's own quantizer for the k-quants; the mixes Q4_K_M,
Q5_K_M and Q6_K choose a type per tensor as llama.cpp does, kquants.mix_format); float tensors
(norms) and tensors already of the target type are copied byte for byte, and so is every
metadata field (tokenizer, chat template, hyper-parameters) except general.file_type, which is set to match the new weights.
The result loads in llama.cpp and in canao.models.decoders alike.

    path = converted("smollm2", "Q8_0")        # cached under $CANAO_CACHE/gguf by source checksum
    convert_gguf(src, dst, qtype="Q8_0")        # explicit destination
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import CanaoError
from ..fileio import file_digest
from ..paths import resolve_model_path

# Types canao's own loader reads back (gguf_loader.SUPPORTED_TYPES) that gguf.quants or canao can write.
TARGET_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K")
BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")  # re-quantized; F32/F16/BF16 stay
FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q4_K_M": "MOSTLY_Q4_K_M",
              "Q5_K_M": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K"}


def convert_gguf(src: str | os.PathLike, dst: str | os.PathLike, qtype: str | None = "Q8_0",
                 layers: int | None = None) -> Path:
    """Write `dst`: `src` with every block-quantized weight re-quantized to `qtype`
    (None: every tensor copied as it is).

    layers: keep only the first `layers` transformer blocks (blk.0 .. blk.N-1, and
    <arch>.block_count set to match): a small model of the same family for quick tests.
    """
    import gguf
    from gguf import quants

    from . import kquants

    if qtype is not None and qtype not in TARGET_TYPES:
        raise CanaoError(f"cannot convert GGUF weights to '{qtype}'; choose one of {', '.join(TARGET_TYPES)}")
    src, dst = resolve_model_path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CanaoError(f"{dst}: the converted file must not overwrite its source; give another destination")
    try:
        reader = gguf.GGUFReader(str(src))
    except Exception as exc:
        raise CanaoError(f"{src}: not a readable GGUF file ({type(exc).__name__}: {exc}); download it again") from None
    mix = qtype.lower() if qtype in ("Q4_K_M", "Q5_K_M", "Q6_K") else None
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise CanaoError(f"{src}: GGUF file has no general.architecture; it is not a model file")
    block_key = f"{arch_field.contents()}.block_count"
    if layers is not None:
        total = reader.get_field(block_key)
        if total is None or not 1 <= layers <= total.contents():
            raise CanaoError(f"{src}: cannot keep {layers} layers of a model with "
                             f"{total.contents() if total else 'no'} blocks; choose 1..{total.contents() if total else 0}")

    def kept(name: str) -> bool:
        if layers is None or not name.startswith("blk."):
            return True
        return int(name.split(".")[1]) < layers

    tensors = [t for t in reader.tensors if kept(t.name)]
    n_layers = layers or reader.get_field(block_key).contents()
    names = {t.name for t in tensors}

    def type_of(t):
        """The type tensor t is written as."""
        if qtype is None or t.tensor_type.name not in BLOCK_TYPES:
            return t.tensor_type
        if mix is None:
            return gguf.GGMLQuantizationType[qtype]
        if t.tensor_type.name in kquants.MIXES[mix]:  # as compiling at the mix does: kept
            return t.tensor_type
        # llama.cpp: a tied embedding is the output matrix; an untied one gets the mix's base format
        name = "output.weight" if t.name == "token_embd.weight" and "output.weight" not in names else t.name
        return gguf.GGMLQuantizationType[kquants.mix_format(mix, name, int(t.shape[0]), n_layers)]

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch=arch_field.contents(), endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():
        # the writer adds the architecture itself; GGUF.* are the reader's virtual fields
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE and qtype:
            value = int(gguf.LlamaFileType[FILE_TYPES[qtype]])
        if field.name == block_key and layers is not None:
            value = layers
        writer.add_key_value(field.name, value, vtype, sub_type=sub)

    def requantized(t) -> bool:
        return type_of(t) != t.tensor_type

    for t in tensors:
        if requantized(t):
            target = type_of(t)
            rows = tuple(int(d) for d in reversed(t.shape))  # numpy order: [..., row length]
            if rows[-1] % gguf.GGML_QUANT_SIZES[target][0]:
                raise CanaoError(f"{src}: tensor '{t.name}' rows of {rows[-1]} do not split into {qtype} blocks")
            byte_shape = quants.quant_shape_to_byte_shape(rows, target)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=target)
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for t in tensors:
            if requantized(t):
                dense = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
                target = type_of(t)
                data = kquants.quantize(dense, target.name, t.name) if target.name in kquants.FORMATS else \
                    quants.quantize(dense, target)
            else:
                data = t.data
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        writer.close()
        tmp.replace(dst)  # atomic: a crash never leaves a half-written file under the final name
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst



def converted(src: str | os.PathLike, qtype: str = "Q8_0", log=None) -> Path:
    """`src` (a path or built-in name) re-quantized to `qtype`, cached by the source's checksum."""
    from ..paths import cache_dir

    path = resolve_model_path(src)
    out = cache_dir() / "gguf" / f"{path.stem}-{file_digest(path)[:16]}.{qtype}.gguf"
    if not out.exists():
        if log:
            log(f"gguf: converting {path.name} to {qtype} -> {out}")
        convert_gguf(path, out, qtype)
    return out


__all__ = ["convert_gguf", "converted", "TARGET_TYPES"]
