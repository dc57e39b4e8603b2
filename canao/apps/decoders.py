"""Every decoder the apps run, by one name: a compiled canao artifact (native code) or a PyTorch model.

    model, tokenizer, info = load_causal_lm("smollm2")            # PyTorch, from the built-in GGUF
    model, tokenizer, info = load_causal_lm("out/smollm2-q4_1")   # a `canao compile` artifact

Both have the interface canao.models.decoders documents (`model(input_ids, cache, start_pos,
last_only=False)` -> logits, `new_cache`, `max_seq_len`).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..models import decoders
from ..models.bpe_tokenizer import BPETokenizer
from ..paths import resolve_model_path


def load_causal_lm(spec: str | Path, threads: int | None = None):
    """(model, tokenizer, info) from a compiled artifact folder, a .gguf file, a HF folder or a built-in name.

    threads: the compiled runtime's thread pool size (an artifact only; default: the artifact's own
    setting, else all cores). PyTorch models use PyTorch's setting. info: as canao.models.decoders,
    with format 'canao-artifact', engine, precision, target, kv_cache and size_mb for an artifact."""
    path = resolve_model_path(spec)
    if not decoders.is_compiled_artifact(path):
        return decoders.load_causal_lm(spec)
    start = time.perf_counter()
    model, tokenizer, info = _from_artifact(path, threads)
    info.update(path=str(path), load_ms=(time.perf_counter() - start) * 1000.0)
    return model, tokenizer, info


def _from_artifact(folder: Path, threads: int | None = None):
    """A decoder compiled by `canao compile` (native code; the tokenizer travels with it)."""
    from ..compiler.decoder.decoder_runtime import CompiledCausalLM, CompiledDecoder

    decoder = CompiledDecoder(folder, threads=threads)
    tokenizer = BPETokenizer.from_folder(folder)
    m = decoder.manifest
    info = {"format": "canao-artifact", "engine": "canao", "architecture": m["model"]["architecture"], "name": folder.name,
            "precision": m["precision"], "target": m["target"]["name"], "weight_types": {}, "params": 0,
            "context_length": decoder.max_ctx, "config": m["model"], "threads": decoder.threads,
            "kv_cache": m.get("kv_cache", "f32"), "size_mb": round(m["weights"]["bytes"] / 2**20, 1)}
    return CompiledCausalLM(decoder), tokenizer, info


__all__ = ["load_causal_lm"]
