"""Compile a Llama-family decoder (GGUF file, HF folder or built-in name) into an artifact:
model.c (generated constants) + decoder runtime and kernels, a shared library, the packed
weights, the tokenizer, and a manifest (kind "decoder")."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ...errors import CanaoError
from .. import artifact
from ..build import KERNEL_DIR, _cached, _run_cc, compiler, object_flags
from ..targets import get_target, is_cross
from .codegen import generate
from .pack import PRECISION_FORMATS, Source, arch_shapes, pack_gpt2, pack_llama

DECODER_PRECISIONS = tuple(PRECISION_FORMATS)
KV_CACHE_TYPES = ("f32", "f16")
DECODER_FILES = ("canao_lm.h", "canao_decoder.c", "canao_decoder_kernels.h", "canao_pool.h", "canao_weights.h",
                 "canao_stats.h")
RUNNER_SOURCE = "canao_lm_run.c"


def _build(folder: Path, target) -> list[str]:
    """model.c (which includes the decoder runtime) into the shared library (host targets) and the
    standalone canao-run (statically linked for another machine)."""
    cc, flags = compiler(target), object_flags(target)
    headers = [folder / n for n in (*DECODER_FILES, target.vec_header)]
    model = _cached("lm-model", cc, flags, [folder / "model.c", *headers], ".o",
                    lambda o: _run_cc([cc, *flags, "-c", "-I", str(folder), str(folder / "model.c"), "-o", str(o)]))
    main = _cached("lm-main", cc, flags, [folder / RUNNER_SOURCE, folder / "canao_lm.h", folder / "canao_stats.h"], ".o",
                   lambda o: _run_cc([cc, *flags, "-c", "-I", str(folder), str(folder / RUNNER_SOURCE), "-o", str(o)]))
    written = []
    if not is_cross(target):
        lib = _cached("lm-lib", cc, [], [model], ".so",
                      lambda o: _run_cc([cc, "-shared", "-pthread", str(model), "-o", str(o), "-lm"]))
        shutil.copyfile(lib, folder / artifact.LIBRARY)
        written.append(artifact.LIBRARY)
    link = ["-static"] if is_cross(target) else []
    exe = _cached("lm-run", cc, link, [model, main], "",
                  lambda o: _run_cc([cc, *link, "-pthread", str(model), str(main), "-o", str(o), "-lm"]))
    shutil.copyfile(exe, folder / artifact.RUNNER)
    os.chmod(folder / artifact.RUNNER, 0o755)
    return [*written, artifact.RUNNER]


def _save_tokenizer(src: Source, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json, so the artifact needs nothing else to chat."""
    from ...models.bpe_tokenizer import BPETokenizer

    from ...models import gguf_loader

    if src.path.is_file():
        tok = BPETokenizer.from_gguf(src.gguf if src.gguf is not None else gguf_loader.open_gguf(src.path))
    else:
        tok = BPETokenizer.from_folder(src.path)
    tok.tokenizer.save(str(folder / "tokenizer.json"))
    config = {name: tok.token(i) for name, i in
              (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id)) if i is not None}
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


def compile_decoder(spec, out, precision: str = "q4_1", max_seq: int = 2048, target: str = "host",
                    threads: int | None = None, log=None, kv_cache: str | None = None) -> dict:
    """kv_cache: f16 (llama.cpp's default: half the cache bytes each step reads) for the quantized
    precisions, f32 for fp32 (the reference path), unless given."""
    if precision not in DECODER_PRECISIONS:
        raise CanaoError(f"decoder precision '{precision}' is not available; choose one of {', '.join(DECODER_PRECISIONS)}")
    kv_cache = kv_cache or ("f32" if precision == "fp32" else "f16")
    if kv_cache not in KV_CACHE_TYPES:
        raise CanaoError(f"KV cache type '{kv_cache}' is not available; choose one of {', '.join(KV_CACHE_TYPES)}")
    if max_seq < 2:
        raise CanaoError(f"--max-seq {max_seq} must be at least 2")
    tgt = get_target(target)
    times = {}
    t0 = time.perf_counter()
    src = Source(spec)
    arch = arch_shapes(src)
    max_ctx = min(max_seq, arch["max_positions"])
    packed, formats = (pack_llama if src.arch == "llama" else pack_gpt2)(src, precision, max_ctx)
    times["pack_ms"] = (time.perf_counter() - t0) * 1e3
    source = generate(arch, packed, tgt, max_ctx, str(src.path), kv_cache)
    final, tmp = artifact.begin_folder(out)
    (tmp / "model.c").write_text(source)
    for name in (*DECODER_FILES, RUNNER_SOURCE, tgt.vec_header):
        shutil.copyfile(KERNEL_DIR / name, tmp / name)
    artifact.write_weights(tmp / artifact.WEIGHTS, bytes(packed.blob))
    _save_tokenizer(src, tmp)
    t0 = time.perf_counter()
    _build(tmp, tgt)
    times["cc_ms"] = (time.perf_counter() - t0) * 1e3
    info = {
        "kind": "decoder",
        "runner": artifact.RUNNER,
        "target": {"name": tgt.name, "features": list(tgt.features), "cflags": list(tgt.cflags)},
        "precision": precision,
        "max_seq": max_ctx,
        "kv_cache": kv_cache,
        "threads": threads,
        "model": {**arch, "config": src.config.to_dict(), "source": str(src.path)},
        "weights": {**formats, "bytes": len(packed.blob), "copied_from_source": packed.copied_raw,
                    "requantized": packed.requantized},
    }
    manifest = artifact.finish_folder(tmp, final, info)
    return {"artifact": str(final), "kind": "decoder", "precision": precision, "max_seq": max_ctx, "kv_cache": kv_cache,
            "target": manifest["target"]["name"], "weights": info["weights"], "times": times}
